"""Training and validation crops of the audio listed in a manifest.

`AudioSegmentDataset` yields float32 mono segments [1, segment_samples] at the codec's sample rate:

- train mode: a random crop of a file (the file is item `i` of the manifest, or, with a virtual epoch
  `length`, a file drawn with probability proportional to its duration so every second of audio is
  equally likely; `speaker_balance` moves that towards every speaker being equally likely), optionally played
  faster or slower by a factor drawn from `speed_factors` (pitch, formants and tempo move together, as if
  another, larger or smaller, speaker said it), RMS/peak gain normalisation, then a random gain drawn from
  `gain_db`;
- eval mode (`train=False`): a fixed list of crops tiling every file (seeded offsets), the same tensors on
  every call and in every process, gain-normalised but without random gain.

Only the frames a crop needs are read (`soundfile.read(start=, frames=)`), then mixed to mono and
resampled with torchaudio. Files that cannot be opened, are empty, or are shorter than `min_seconds` are
skipped at construction; a file that fails later, while reading a crop, is skipped from then on and
another file is used. Every skip is logged as a warning and recorded in `dataset.skipped` as
(path, reason). With DataLoader workers, a skip found inside a worker is recorded in that worker's copy.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torchaudio

from ..audio import to_mono
from ..errors import UserError
from .manifest import read_manifest

log = logging.getLogger(__name__)

# Gain normalisation: bring each crop to this RMS level, unless that would push its peak above PEAK_MAX
# or boost it by more than MAX_BOOST_DB.
TARGET_RMS_DB = -20.0
PEAK_MAX = 0.99
MAX_BOOST_DB = 20.0  # a crop that is mostly pause must not have its noise floor blown up
SILENCE_RMS = 1e-5  # below this a crop is treated as silence and left as it is
# Speed perturbation beyond an octave either way no longer sounds like a person (ASR recipes use 0.9-1.1).
MIN_SPEED, MAX_SPEED = 0.5, 2.0


@dataclass
class _File:
    path: str
    frames: int  # length in the file's own samples
    sample_rate: int
    duration: float
    speaker: str | None


def speaker_balanced_weights(durations: np.ndarray, speakers: list[str | None], balance: float) -> np.ndarray:
    """Sampling probability of each file: within a speaker proportional to duration; across speakers
    proportional to the speaker's total duration raised to `1 - balance`.

    balance 0: every second of audio equally likely (a speaker with 4x the audio gets 4x the crops);
    balance 1: every speaker equally likely; in between, the tempered sampling multilingual LMs use for
    languages (XLM-R's alpha = 1 - balance). Files without a speaker count as one speaker.
    """
    if not 0.0 <= balance <= 1.0:
        raise UserError(f"speaker_balance must be in [0, 1], got {balance}")
    durations = np.asarray(durations, dtype=np.float64)
    totals: dict[str | None, float] = {}
    for spk, d in zip(speakers, durations):
        totals[spk] = totals.get(spk, 0.0) + float(d)
    # A speaker's share ~ total^(1-balance); each of its files gets that share split by duration.
    scale = np.array([totals[spk] ** (1.0 - balance) / totals[spk] if totals[spk] > 0 else 0.0 for spk in speakers])
    weights = durations * scale
    return weights / weights.sum()


class AudioSegmentDataset(torch.utils.data.Dataset):
    def __init__(self, manifest: str | Path, sample_rate: int, segment_seconds: float, split: str | None = None,
                 train: bool = True, frame_size: int = 1, seed: int = 0, gain_db: tuple[float, float] = (-6.0, 0.0),
                 min_seconds: float | None = None, length: int | None = None, speaker_balance: float = 0.0,
                 speed_factors: tuple[float, ...] = (1.0,)):
        self.manifest = str(manifest)
        self.sample_rate = int(sample_rate)
        self.segment_seconds = float(segment_seconds)
        self.split = split
        self.train = bool(train)
        self.frame_size = int(frame_size)
        self.seed = int(seed)
        self.gain_db = (float(gain_db[0]), float(gain_db[1]))
        self.min_seconds = min_seconds
        self.length = length
        self.speed_factors = tuple(float(x) for x in speed_factors)
        if not self.speed_factors or not all(MIN_SPEED <= x <= MAX_SPEED for x in self.speed_factors):
            raise UserError(f"speed factors must be between {MIN_SPEED} and {MAX_SPEED}, got {list(speed_factors)}")
        if self.frame_size < 1:
            raise UserError(f"frame_size must be >= 1, got {frame_size}")
        if self.gain_db[0] > self.gain_db[1]:
            raise UserError(f"gain_db must be (low, high), got {gain_db}")
        if length is not None and length < 1:
            raise UserError(f"length must be >= 1, got {length}")
        # +1e-9: segment_seconds * sr is often a float a hair below an integer (0.29 * 16000 = 4639.999...).
        frames_per_segment = math.floor(self.segment_seconds * self.sample_rate / self.frame_size + 1e-9)
        self.segment_samples = frames_per_segment * self.frame_size
        if self.segment_samples <= 0:
            raise UserError(f"segment of {segment_seconds} s is shorter than one frame "
                            f"({self.frame_size} samples at {self.sample_rate} Hz)")

        self.skipped: list[tuple[str, str]] = []
        self.files: list[_File] = []
        utterances = read_manifest(manifest, split=split)
        for utt in utterances:
            try:
                info = sf.info(utt.path)
            except Exception as err:  # soundfile raises several types (LibsndfileError, RuntimeError, OSError)
                self._skip(utt.path, f"unreadable: {_one_line(err)}", announce=True)
                continue
            if info.frames <= 0 or info.samplerate <= 0:
                self._skip(utt.path, "empty: no audio frames", announce=True)
                continue
            duration = info.frames / info.samplerate
            if min_seconds is not None and duration < min_seconds:
                self._skip(utt.path, f"too short: {duration:.3f} s < min_seconds {min_seconds} s", announce=True)
                continue
            self.files.append(_File(utt.path, int(info.frames), int(info.samplerate), duration, utt.speaker))
        if self.skipped:
            log.warning("%s%s: skipped %d of %d files (reasons above; also in dataset.skipped)", self.manifest,
                        f" [{split}]" if split else "", len(self.skipped), len(utterances))
        if not self.files:
            where = f"split {split!r} of " if split else ""
            raise UserError(f"no usable audio in {where}manifest {self.manifest} "
                            f"({len(utterances)} listed, {len(self.skipped)} skipped)")
        self._bad: set[int] = set()  # files that failed while reading a crop
        self._resamplers: dict[int, torch.nn.Module] = {}
        self._durations = np.array([f.duration for f in self.files], dtype=np.float64)
        if speaker_balance and (not self.train or length is None):
            raise UserError("speaker_balance needs training crops drawn at random (train mode with a virtual epoch "
                            "length, data.epoch_length)")
        self._weights = speaker_balanced_weights(self._durations, [f.speaker for f in self.files], speaker_balance)
        self.crops: list[tuple[int, int]] = [] if self.train else self._eval_crops()

    # -- sizes -----------------------------------------------------------------------------------------
    def __len__(self) -> int:
        if not self.train:
            return len(self.crops)
        return self.length if self.length is not None else len(self.files)

    @property
    def total_seconds(self) -> float:
        return float(self._durations.sum())

    def speaker_shares(self) -> dict[str | None, float]:
        """Fraction of random training crops drawn from each speaker (largest first)."""
        shares: dict[str | None, float] = {}
        for f, w in zip(self.files, self._weights):
            shares[f.speaker] = shares.get(f.speaker, 0.0) + float(w)
        return dict(sorted(shares.items(), key=lambda kv: -kv[1]))

    # -- items -----------------------------------------------------------------------------------------
    def __getitem__(self, i: int) -> torch.Tensor:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._train_item(i) if self.train else self._eval_item(i)

    def _train_item(self, i: int) -> torch.Tensor:
        # Fresh randomness per call from torch's global RNG (seeded by Lightning's seed_everything and
        # different in every DataLoader worker), mixed with `seed` and the index so DDP ranks, which draw
        # different indices, get different crops.
        draw = int(torch.randint(0, 2**62, (1,)).item())
        rng = np.random.default_rng([self.seed, i, draw])
        idx = i % len(self.files) if self.length is None else self._pick_file(rng)
        if idx in self._bad:
            idx = self._pick_file(rng)
        # Drawn only when there is a choice, so runs without speed perturbation keep their crops.
        speed = self.speed_factors[int(rng.integers(len(self.speed_factors)))] if len(self.speed_factors) > 1 \
            else self.speed_factors[0]
        while True:
            f = self.files[idx]
            src_len = self._source_frames(f, speed)
            start = int(rng.integers(0, f.frames - src_len + 1)) if f.frames > src_len else 0
            wav = self._read(idx, start, src_len, speed)
            if wav is not None:
                gain = 10.0 ** (rng.uniform(*self.gain_db) / 20.0)
                return self._finish(wav, gain)
            idx = self._pick_file(rng)

    def _eval_item(self, i: int) -> torch.Tensor:
        # A crop whose file fails is replaced by the next readable crop, so the set stays deterministic.
        for k in range(len(self.crops)):
            idx, start = self.crops[(i + k) % len(self.crops)]
            if idx in self._bad:
                continue
            wav = self._read(idx, start, self._source_frames(self.files[idx]))
            if wav is not None:
                return self._finish(wav, 1.0)
        raise UserError(f"none of the files in {self.manifest} can be read any more")

    def _pick_file(self, rng: np.random.Generator) -> int:
        weights = self._weights.copy()
        if self._bad:
            weights[list(self._bad)] = 0.0
        if weights.sum() <= 0:
            raise UserError(f"none of the files in {self.manifest} can be read any more")
        return int(rng.choice(len(weights), p=weights / weights.sum()))

    def _eval_crops(self) -> list[tuple[int, int]]:
        """Non-overlapping crops tiling each file, the left-over shared out at a seeded offset."""
        rng = np.random.default_rng(self.seed)
        crops = []
        for idx, f in enumerate(self.files):
            src_len = self._source_frames(f)
            count = max(1, f.frames // src_len)
            spare = max(0, f.frames - count * src_len)
            offset = int(rng.integers(0, spare + 1))
            crops.extend((idx, offset + k * src_len) for k in range(count))
        if self.length is not None and self.length < len(crops):
            keep = np.sort(rng.choice(len(crops), size=self.length, replace=False))
            crops = [crops[k] for k in keep]
        return crops

    # -- reading ---------------------------------------------------------------------------------------
    def _source_frames(self, f: _File, speed: float = 1.0) -> int:
        """Frames to read from the file for one segment at the target rate (`speed` times as many when sped up)."""
        return math.ceil(self.segment_samples * f.sample_rate * speed / self.sample_rate)

    def _read(self, idx: int, start: int, frames: int, speed: float = 1.0) -> torch.Tensor | None:
        """Frames [start, start + frames) of file `idx` at the target rate, `speed` times faster; None if it fails.

        Speed perturbation (Ko et al., Interspeech 2015) is resampling from a rate the file does not have:
        read as if recorded at `speed` x its rate, the same samples play faster and higher.
        """
        f = self.files[idx]
        try:
            data, sr = sf.read(f.path, start=start, frames=frames, dtype="float32", always_2d=True)
            if data.shape[0] == 0:
                raise ValueError("no frames at the expected position (file shorter than its header says)")
            if not np.isfinite(data).all():
                raise ValueError("NaN or Inf samples")
        except Exception as err:  # any failure of this one file: skip it, keep training
            self._bad.add(idx)
            self._skip(f.path, f"read failed: {_one_line(err)}", announce=True)
            return None
        wav = torch.from_numpy(np.ascontiguousarray(to_mono(data))).unsqueeze(0)
        source_rate = round(sr * speed)
        if source_rate == self.sample_rate:
            return wav
        # One torchaudio resampler per source rate: building the sinc kernel costs more than applying it
        # to a one-second crop (about 3x faster than torchaudio.functional.resample per call).
        if source_rate not in self._resamplers:
            self._resamplers[source_rate] = torchaudio.transforms.Resample(source_rate, self.sample_rate)
        return self._resamplers[source_rate](wav)

    def _finish(self, wav: torch.Tensor, gain: float) -> torch.Tensor:
        """Trim or zero-pad to exactly one segment, then normalise the level and apply `gain`."""
        wav = wav[:, : self.segment_samples]
        if wav.shape[-1] < self.segment_samples:
            wav = torch.nn.functional.pad(wav, (0, self.segment_samples - wav.shape[-1]))
        rms = float(wav.pow(2).mean().sqrt())
        peak = float(wav.abs().max())
        if rms > SILENCE_RMS:
            scale = min(10.0 ** (TARGET_RMS_DB / 20.0) / rms, PEAK_MAX / peak, 10.0 ** (MAX_BOOST_DB / 20.0)) * gain
            peak *= scale
            if peak > PEAK_MAX:  # a positive gain_db must not clip
                scale *= PEAK_MAX / peak
            wav = wav * scale
        return wav.to(torch.float32).contiguous()

    def _skip(self, path: str, reason: str, announce: bool) -> None:
        self.skipped.append((path, reason))
        if announce:
            log.warning("skipping %s: %s", path, reason)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
