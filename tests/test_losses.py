"""The differentiable PESQ loss (loss.pesq): it must rank degradations as real PESQ-WB does, be zero for a
perfect copy, leave digitally silent clips out instead of turning the batch's loss into NaN, and refuse a
negative weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio
from pesq import pesq

from neurocodec.audio import load_audio
from neurocodec.train.losses import DifferentiablePesqLoss, LossConfig

DEMO_CLIP = Path(__file__).resolve().parents[1] / "data" / "demo" / "audio" / "fr_CA_f_June"


@pytest.fixture(scope="module")
def speech() -> torch.Tensor:
    """Two seconds of a real recorded voice from the bundled demo corpus, [1, T] at 16 kHz."""
    path = sorted(DEMO_CLIP.glob("*.flac"), key=lambda p: -p.stat().st_size)[0]
    wav = load_audio(path, 16000).reshape(1, -1)[:, :32000]
    assert wav.shape[1] == 32000
    return wav


def _degraded(speech: torch.Tensor) -> dict[str, torch.Tensor]:
    """Degradations of different kinds and strengths: white noise at three SNRs, and two low-passes."""
    gen = torch.Generator().manual_seed(0)
    noise = torch.randn(speech.shape, generator=gen)
    power = speech.square().mean()
    out = {f"noise {snr} dB": speech + noise * (power / 10 ** (snr / 10)).sqrt() for snr in (35, 20, 5)}
    for cutoff in (1000, 3000):
        out[f"low-pass {cutoff} Hz"] = torchaudio.functional.lowpass_biquad(speech, 16000, cutoff)
    return out


def test_pesq_loss_is_zero_for_a_perfect_copy_and_ranks_degradations_as_real_pesq_wb(speech):
    loss = DifferentiablePesqLoss(16000)
    assert float(loss(speech.clone(), speech)) == pytest.approx(0.0, abs=1e-4)
    degraded = _degraded(speech)
    ours = {name: float(loss(wav, speech)) for name, wav in degraded.items()}
    real = {name: pesq(16000, speech[0].numpy(), wav[0].numpy(), "wb") for name, wav in degraded.items()}
    assert all(v > 0.05 for v in ours.values()), ours
    # more noise, more loss; and over all five, the loss orders them as PESQ-WB does (lower loss, higher PESQ)
    assert ours["noise 35 dB"] < ours["noise 20 dB"] < ours["noise 5 dB"], ours
    names = list(degraded)
    by_loss = sorted(names, key=lambda n: ours[n])
    by_pesq = sorted(names, key=lambda n: -real[n])
    assert by_loss == by_pesq, (ours, real)


def test_pesq_loss_leaves_silent_clips_out_and_keeps_gradients_finite(speech):
    loss = DifferentiablePesqLoss(16000)
    noisy = (speech + 0.01 * torch.randn_like(speech)).requires_grad_()
    alone = loss(noisy, speech)
    # [B, 1, T] as the codec gives it; a digitally silent second clip (padding, a muted file) is left out
    fake = torch.cat([noisy, torch.zeros_like(noisy)]).unsqueeze(1)
    real = torch.cat([speech, torch.zeros_like(speech)]).unsqueeze(1)
    both = loss(fake, real)
    torch.testing.assert_close(both, alone)
    both.backward()
    assert torch.isfinite(noisy.grad).all() and noisy.grad.abs().sum() > 0
    silent = torch.zeros(2, 1, 16000, requires_grad=True)
    nothing = loss(silent, torch.zeros(2, 1, 16000))
    nothing.backward()
    assert float(nothing.detach()) == 0.0 and torch.isfinite(silent.grad).all()


def test_pesq_loss_runs_outside_bf16_autocast(speech):
    loss = DifferentiablePesqLoss(16000)
    noisy = speech + 0.01 * torch.randn_like(speech)
    expected = loss(noisy, speech)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = loss(noisy.bfloat16(), speech.bfloat16())
    assert got.dtype == torch.float32 and np.isfinite(float(got))
    assert float(got) == pytest.approx(float(expected), rel=0.1)  # only the inputs' rounding to bf16 differs


def test_a_negative_pesq_weight_is_refused():
    with pytest.raises(ValueError, match="pesq must be >= 0"):
        LossConfig(pesq=-1.0)


def test_a_clip_whose_pesq_value_or_gradient_is_not_finite_is_left_out_of_the_step(speech, monkeypatch):
    """One odd crop must not put NaN into the weights: its clip is dropped (value) or its gradient zeroed whole,
    the others train on, and the clips are counted."""
    loss = DifferentiablePesqLoss(16000)

    def stand_in(ref, deg):  # clip 1 is fake == real: sqrt at 0, NaN gradient; clip 2's value is NaN
        return (deg - ref).square().sum(dim=1).sqrt() + torch.tensor([0.0, 0.0, float("nan")], dtype=deg.dtype)

    monkeypatch.setattr(loss.pesq, "forward", stand_in)
    real = torch.cat([speech, speech, speech]).unsqueeze(1)
    fake = (real + torch.cat([0.01 * torch.randn_like(speech), torch.zeros_like(speech), 0.02 * torch.ones_like(speech)])
            .unsqueeze(1)).requires_grad_()
    value = loss(fake, real)
    expected = (fake[0] - real[0]).double().square().sum().sqrt() / 2  # clips 0 and 1 (whose value is 0)
    assert float(value) == pytest.approx(float(expected), rel=1e-5)
    value.backward()
    assert torch.isfinite(fake.grad).all()
    assert fake.grad[0].abs().sum() > 0 and fake.grad[1:].abs().sum() == 0
    assert loss.bad_clips == 2


def test_a_crop_that_ends_in_digital_silence_trains_without_being_dropped(speech):
    """A crop at the end of an utterance: half speech, half exact zeros. PESQ's disturbance is 0 in the silent
    windows, and in float32 the 6th powers of its 1e-20 floor underflow to a NaN gradient; the loss runs in float64
    so that such clips train instead of being dropped by the guard."""
    loss = DifferentiablePesqLoss(16000)
    real = torch.cat([speech[:, :16000], torch.zeros(1, 16000)], dim=1)
    fake = (real + torch.cat([0.01 * torch.randn(1, 16000), torch.zeros(1, 16000)], dim=1)).requires_grad_()
    loss(fake.unsqueeze(1), real.unsqueeze(1)).backward()
    assert loss.bad_clips == 0
    assert torch.isfinite(fake.grad).all() and fake.grad[:, :16000].abs().sum() > 0
    # the same clip through the library in float32 is what went wrong
    fake32 = fake.detach().clone().requires_grad_()
    loss.pesq.float()(real, fake32).sum().backward()
    assert not torch.isfinite(fake32.grad).all()
