import numpy as np
import pytest
import soundfile as sf
import torch

torch.set_num_threads(1)  # the suite runs on 2 cores; one thread per test process keeps timings sane


@pytest.fixture(autouse=True)
def grad_mode_on():
    """The CLI commands turn autograd off for their process (`torch.set_grad_enabled(False)`); tests call them
    in-process, so each test starts with autograd on again, as a fresh process would."""
    torch.set_grad_enabled(True)
    yield


def synthetic_speechlike(seconds: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """A deterministic voiced-like test signal: a gliding harmonic tone with noise bursts and pauses."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    f0 = 120 + 60 * np.sin(2 * np.pi * 0.7 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = (np.sin(2 * np.pi * 2.3 * t) > -0.3).astype(float)
    noise = rng.standard_normal(len(t)) * (np.sin(2 * np.pi * 1.1 * t) > 0.6)
    return (0.25 * voiced * envelope + 0.05 * noise).astype(np.float32)


@pytest.fixture
def speech_wav(tmp_path):
    """Path to a 1.3 s mono 16 kHz WAV (float) of the synthetic signal."""
    path = tmp_path / "clip.wav"
    sf.write(path, synthetic_speechlike(1.3), 16000, subtype="FLOAT")
    return path
