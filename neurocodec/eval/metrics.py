"""Objective quality metrics on a reference / degraded pair of mono signals.

PESQ (ITU-T P.862.2 wide band at 16 kHz, P.862 narrow band at 8 kHz) comes from the `pesq` package and
STOI from `pystoi`, ViSQOL v3 (speech mode) from `visqol-python`; mel distance and SI-SDR are computed here
with torchaudio because they are a few lines on top of its mel filterbank. All functions take 1-D float
arrays/tensors at `sample_rate` and compare the common length (align the signals first: see `align`).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torchaudio

PESQ_RATES = {16000: "wb", 8000: "nb"}


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _common(ref, deg) -> tuple[np.ndarray, np.ndarray]:
    ref, deg = _np(ref), _np(deg)
    n = min(len(ref), len(deg))
    return ref[:n], deg[:n]


def pesq_score(ref, deg, sample_rate: int) -> float:
    """PESQ MOS-LQO: wide band at 16 kHz, narrow band at 8 kHz (other rates: resample first)."""
    from pesq import pesq

    if sample_rate not in PESQ_RATES:
        raise ValueError(f"PESQ needs 8 or 16 kHz audio, got {sample_rate} Hz")
    ref, deg = _common(ref, deg)
    return float(pesq(sample_rate, ref, deg, PESQ_RATES[sample_rate]))


def stoi_score(ref, deg, sample_rate: int, extended: bool = False) -> float:
    from pystoi import stoi

    ref, deg = _common(ref, deg)
    return float(stoi(ref, deg, sample_rate, extended=extended))


VISQOL_RATE = 16000  # ViSQOL's speech mode works on 16 kHz audio
VISQOL_MIN_SECONDS = 0.65  # visqol-python 3.8 fails with an IndexError below about 0.64 s (measured)
_VISQOL = None


def visqol_score(ref, deg, sample_rate: int) -> float:
    """ViSQOL v3 MOS-LQO in speech mode (1..5), with the deep-lattice mapper of Google's C++ default.

    A second full-reference opinion beside PESQ: a codec trained with PESQ in its loss can learn what PESQ rewards
    without sounding better, and ViSQOL (a different auditory model: gammatone spectrogram patches, NSIM) does not
    share PESQ's blind spots. From `visqol-python`, a port of Google's ViSQOL with the models bundled, because
    Google's C++ builds only with Bazel (`speequal`, which packages it, has no wheel for this machine). Its numba
    kernels make it ~0.1 s per second of audio; other rates are resampled to 16 kHz first. Clips under
    VISQOL_MIN_SECONDS raise ValueError.
    """
    global _VISQOL
    if _VISQOL is None:
        from visqol import VisqolApi

        api = VisqolApi()
        api.create(mode="speech", use_lattice_model=True)
        _VISQOL = api
    ref, deg = _common(ref, deg)
    if len(ref) < VISQOL_MIN_SECONDS * sample_rate:
        raise ValueError(f"ViSQOL needs at least {VISQOL_MIN_SECONDS} s of audio; this pair has "
                         f"{len(ref) / sample_rate:.2f} s")
    if sample_rate != VISQOL_RATE:
        from ..audio import resample

        ref, deg = (resample(torch.from_numpy(x).float().unsqueeze(0), sample_rate, VISQOL_RATE)[0].double().numpy()
                    for x in (ref, deg))
    return float(_VISQOL.measure_from_arrays(ref, deg, VISQOL_RATE).moslqo)


def si_sdr(ref, deg) -> float:
    """Scale-invariant signal-to-distortion ratio in dB."""
    ref, deg = _common(ref, deg)
    ref = ref - ref.mean()
    deg = deg - deg.mean()
    scale = np.dot(deg, ref) / max(np.dot(ref, ref), 1e-12)
    target = scale * ref
    noise = deg - target
    return float(10 * np.log10(max(np.dot(target, target), 1e-12) / max(np.dot(noise, noise), 1e-12)))


_MEL_CACHE: dict[int, torchaudio.transforms.MelSpectrogram] = {}


def mel_distance(ref, deg, sample_rate: int) -> float:
    """Mean absolute difference of log10 mel spectrograms (80 bands, 1024-point FFT, hop 256)."""
    if sample_rate not in _MEL_CACHE:
        _MEL_CACHE[sample_rate] = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=1024, hop_length=256, n_mels=80, power=1.0)
    mel = _MEL_CACHE[sample_rate]
    ref, deg = _common(ref, deg)
    r = torch.log10(mel(torch.from_numpy(ref).float()).clamp_min(1e-5))
    d = torch.log10(mel(torch.from_numpy(deg).float()).clamp_min(1e-5))
    return float((r - d).abs().mean())


def align(ref, deg, max_shift: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Shift `deg` by the lag (|lag| <= max_shift samples) that maximises its cross-correlation with `ref`.

    Classic codecs delay their output (Opus by its look-ahead, Codec2 by its frame); scoring without
    alignment would penalise the delay, not the coding. Returns the aligned pair and the lag found.
    """
    ref, deg = _np(ref), _np(deg)
    n = min(len(ref), len(deg))
    best_lag, best = 0, -np.inf
    # FFT cross-correlation, restricted to the allowed lags.
    size = 1 << int(np.ceil(np.log2(2 * n)))
    corr = np.fft.irfft(np.fft.rfft(deg[:n], size) * np.conj(np.fft.rfft(ref[:n], size)), size)
    for lag in range(-max_shift, max_shift + 1):
        value = corr[lag % size]
        if value > best:
            best, best_lag = value, lag
    if best_lag >= 0:
        deg = deg[best_lag:]
    else:
        deg = np.concatenate([np.zeros(-best_lag), deg])
    m = min(len(ref), len(deg))
    return ref[:m], deg[:m], best_lag


def pause_level_db(ref, deg, sample_rate: int, frame_ms: float = 20.0, below_db: float = 35.0) -> float | None:
    """How much louder than the original the output is in the clip's pauses, in dB: the output's power over the
    original's, pooled over the `frame_ms` frames at least `below_db` dB under the clip's loudest frame. 0 means
    pauses as quiet as the original; +10, ten dB of added noise. None when the clip has no such frame.

    Why: PESQ, STOI and mel distance hardly see hiss or buzz in pauses (frames that quiet weigh little in them),
    yet a listener hears it at once; a loss that targets PESQ (loss.pesq) can fill pauses with noise while those
    scores rise (days 22-25 of docs/default_model/heldout_speakers.md)."""
    ref, deg = _common(ref, deg)
    size = max(1, int(round(sample_rate * frame_ms / 1000)))
    n = len(ref) // size
    if n == 0:
        return None
    ref_power = (ref[:n * size].astype(np.float64).reshape(n, size) ** 2).mean(axis=1)
    deg_power = (deg[:n * size].astype(np.float64).reshape(n, size) ** 2).mean(axis=1)
    quiet = 10 * np.log10(ref_power + 1e-12) <= 10 * np.log10(ref_power.max() + 1e-12) - below_db
    if not quiet.any():
        return None
    return float(10 * np.log10((deg_power[quiet].sum() + 1e-12) / (ref_power[quiet].sum() + 1e-12)))


STREAM_START_LEVELS_DBFS = (-60.0, -40.0, -30.0)


@torch.no_grad()
def stream_start_overshoot_db(codec, level_dbfs: float, seeds: int = 5, seconds: float = 0.2) -> float:
    """How many dB louder than its input a codec's output is, in its loudest frame of the first `seconds`, when a
    stream opens on white noise at `level_dbfs` (the worst of `seeds` draws). About 0 for a codec without a start
    transient: steady frames of the same noise come out within about 1 dB of the input's level.

    Why: a stream that starts from zero state (`model.stream_start: none`) gives its first encoder frame a step from
    silence to the signal. Day 26 found models that turn that step into a click: the shipped model gave the first
    20 ms of -30 dBFS noise +17 dB, and 4,000 steps of the PESQ-loss recipe pushed it to full scale. A microphone
    stream that opens on room noise clicks, and per-clip scores hardly see it (clips start in near silence; PESQ-WB
    even rewarded one such burst, day 27). Priming (codecs/stream_start.py) brings it to about 0 dB; this measure
    guards that. Every frame of the first 200 ms counts, not only the first: the PESQ loss skips a crop's first
    60 ms (LossConfig.pesq_skip_ms), so a burst it learnt would sit just after them."""
    frame = codec.frame_size
    n = max(2, int(round(seconds * codec.sample_rate / frame))) * frame
    # training measures its validation codec where it lives (a GPU); anything else that encodes and decodes: the CPU
    device = next(codec.parameters()).device if isinstance(codec, torch.nn.Module) else torch.device("cpu")
    worst = -math.inf
    for seed in range(seeds):
        noise = np.random.default_rng(seed).standard_normal(n) * 10 ** (level_dbfs / 20)
        wav = torch.from_numpy(noise.astype(np.float32)).view(1, 1, -1).to(device)
        out = codec.decode(codec.encode(wav))[0, 0, :n].double().cpu().numpy()
        for start in range(0, n, frame):
            worst = max(worst, _level_db(out[start:start + frame]) - _level_db(noise[start:start + frame]))
    return float(worst)


def _level_db(x: np.ndarray) -> float:
    return 10 * math.log10(float(np.mean(x ** 2)) + 1e-20)
