"""Reading and writing audio: soundfile for files, torchaudio for resampling."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio.functional as AF

from .errors import AudioError


def to_mono(audio: np.ndarray) -> np.ndarray:
    """[N, C] -> [N] by averaging channels."""
    return audio.mean(axis=1) if audio.ndim == 2 else audio


def check_samples(wav: torch.Tensor, where: str) -> None:
    if wav.numel() == 0:
        raise AudioError(f"{where}: no audio samples")
    if not bool(torch.isfinite(wav).all()):
        raise AudioError(f"{where}: audio contains NaN or Inf samples")


def resample(wav: torch.Tensor, orig_sr: int, target_sr: int) -> torch.Tensor:
    if orig_sr == target_sr:
        return wav
    return AF.resample(wav, orig_sr, target_sr)


def load_audio(path: str | Path, sample_rate: int) -> torch.Tensor:
    """Mono float32 audio [1, N] at `sample_rate` (mixed down and resampled as needed)."""
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError) as err:
        raise AudioError(f"{path}: cannot read audio ({err})") from None
    wav = torch.from_numpy(np.ascontiguousarray(to_mono(data))).unsqueeze(0)
    check_samples(wav, str(path))
    return resample(wav, sr, sample_rate)


def save_audio(path: str | Path, wav: torch.Tensor, sample_rate: int) -> None:
    """Write [1, N] or [N] float audio; the format follows the extension (WAV as 16-bit PCM, FLAC, ...)."""
    data = wav.detach().cpu().reshape(-1).numpy().astype(np.float32)
    subtype = "PCM_16" if str(path).lower().endswith((".wav", ".flac")) else None
    sf.write(str(path), np.clip(data, -1.0, 1.0), sample_rate, subtype=subtype)
