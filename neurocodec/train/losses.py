"""Reconstruction and adversarial losses for codec training, with their weights in the config's `loss:` section.

A weight of 0 means the loss is still computed and logged, but takes no part in the gradient. The
quantizer's own loss (commitment / codebook terms, already weighted inside vector-quantize-pytorch) is
`CodecOutput.quantizer_loss`, scaled by `loss.quantizer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import torchaudio
from torch import nn


@dataclass
class LossConfig:
    mel: float = 15.0  # multi-resolution log-mel L1 (DAC style)
    stft: float = 0.0  # multi-scale STFT: spectral convergence + log-magnitude L1
    waveform: float = 0.0  # L1 on samples
    feature: float = 2.0  # feature matching (L1 between discriminator feature maps of real and fake)
    adversarial: float = 1.0  # generator adversarial loss
    quantizer: float = 1.0  # CodecOutput.quantizer_loss (commitment etc.)
    semantic: float = 1.0  # semanticodec: cross-entropy of the student's semantic-token prediction (CodecOutput.aux_losses)
    distill: float = 1.0  # xy_single: 1 - cosine(projected semantic branch, teacher features) (CodecOutput.aux_losses)
    pesq: float = 0.0  # PESQ's disturbance terms, differentiable (torch-pesq); computed only while its weight is > 0
    # The PESQ loss leaves out each crop's first milliseconds (and its reference's): the stream-start transient is
    # left to the other losses. An int, not a float: stage overrides take the float fields as loss weights.
    # Why: PESQ aligns each signal's level over the whole clip, so a loud start burst turns the rest of the output
    # down and lowers PESQ's (asymmetric, additive-noise) disturbance; a PESQ loss that sees the crop start learns
    # such a burst within a few thousand steps, zero-state or primed crops alike (day 27, heldout_speakers.md).
    pesq_skip_ms: int = 60
    adversarial_kind: str = "hinge"  # hinge | lsgan
    mel_windows: list[int] = field(default_factory=lambda: [32, 64, 128, 256, 512, 1024, 2048])
    mel_bins: list[int] = field(default_factory=lambda: [5, 10, 20, 40, 80, 160, 320])
    stft_n_ffts: list[int] = field(default_factory=lambda: [512, 1024, 2048])

    def __post_init__(self) -> None:
        if self.adversarial_kind not in ("hinge", "lsgan"):
            raise ValueError(f"adversarial_kind must be hinge or lsgan, got {self.adversarial_kind!r}")
        if len(self.mel_windows) != len(self.mel_bins):
            raise ValueError("mel_windows and mel_bins must have the same length")
        for name in ("mel", "stft", "waveform", "feature", "adversarial", "quantizer", "pesq"):
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0")
        if self.pesq_skip_ms < 0:
            raise ValueError(f"pesq_skip_ms must be >= 0, got {self.pesq_skip_ms}")


class MultiResolutionMelLoss(nn.Module):
    """Mean over resolutions of L1 between log10 mel spectrograms (window w, hop w/4, n_mels m)."""

    def __init__(self, sample_rate: int, windows: list[int], bins: list[int]) -> None:
        super().__init__()
        self.mels = nn.ModuleList(
            torchaudio.transforms.MelSpectrogram(sample_rate=sample_rate, n_fft=w, win_length=w, hop_length=w // 4,
                                                 n_mels=m, power=1.0, center=True, f_min=0.0, f_max=sample_rate / 2)
            for w, m in zip(windows, bins))

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        fake, real = fake.float(), real.float()  # spectra in fp32 also under bf16 autocast
        loss = fake.new_zeros(())
        for mel in self.mels:
            loss = loss + F.l1_loss(mel(fake).clamp_min(1e-5).log10(), mel(real).clamp_min(1e-5).log10())
        return loss / len(self.mels)


class MultiScaleSTFTLoss(nn.Module):
    """Spectral convergence + log-magnitude L1 averaged over FFT sizes (hop n_fft/4)."""

    def __init__(self, n_ffts: list[int]) -> None:
        super().__init__()
        self.n_ffts = list(n_ffts)
        for n in self.n_ffts:
            self.register_buffer(f"window{n}", torch.hann_window(n), persistent=False)

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        fake, real = fake.float().squeeze(1), real.float().squeeze(1)
        loss = fake.new_zeros(())
        for n in self.n_ffts:
            w = getattr(self, f"window{n}")
            sf = torch.stft(fake, n, n // 4, n, w, return_complex=True).abs().clamp_min(1e-7)
            sr = torch.stft(real, n, n // 4, n, w, return_complex=True).abs().clamp_min(1e-7)
            convergence = torch.linalg.norm(sr - sf) / torch.linalg.norm(sr).clamp_min(1e-7)
            loss = loss + convergence + F.l1_loss(sf.log(), sr.log())
        return loss / len(self.n_ffts)


class DifferentiablePesqLoss(nn.Module):
    """PESQ (ITU-T P.862) as a loss: torch-pesq's 0.1 * d_sym + 0.0309 * d_asym, the disturbance terms that PESQ
    subtracts from 4.5 before its MOS mapping, per clip, averaged over the batch. Lower is better; it moves with
    the real PESQ-WB of our decoded speech (Pearson 0.96 over 36 held-out clips of the default model, day 22).

    The library has no time alignment (our output is sample-aligned with its input, so none is needed) and
    divides by each clip's level: clips whose reference or output is digitally silent are left out, and a batch
    of only those gives 0. It runs in float64, outside autocast: in float32 its 6th powers of values clamped at
    1e-20 underflow in windows without disturbance, and their gradient is NaN. A clip whose value or gradient is
    still not finite is left out of the step (counted in `bad_clips`), so that one odd crop cannot put NaN into
    the weights; a run with PESQ at weight 1 did so after 1,900 steps before this guard.
    """

    def __init__(self, sample_rate: int, silence_rms: float = 1e-5) -> None:
        super().__init__()
        # Imported here: runs without loss.pesq (and the GPU kit's device, whose wheels list is short) never need it.
        from torch_pesq import PesqLoss

        self.pesq = PesqLoss(1.0, sample_rate=sample_rate).double()
        self.silence_rms = silence_rms
        self.bad_clips = 0  # clips left out because their PESQ value or gradient was not finite, since construction

    def _clean_gradient(self, grad: torch.Tensor) -> torch.Tensor:
        bad = ~torch.isfinite(grad).all(dim=1, keepdim=True)  # [B, 1]: a clip's gradient is used whole or not at all
        if bool(bad.any()):
            self.bad_clips += int(bad.sum())
            grad = grad.masked_fill(bad, 0.0)
        return grad

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=fake.device.type, enabled=False):
            fake, real = fake.flatten(1).double(), real.flatten(1).double()  # [B, 1, T] mono -> [B, T]
            rms = lambda x: x.square().mean(dim=1).sqrt()  # noqa: E731
            keep = (rms(real) > self.silence_rms) & (rms(fake) > self.silence_rms)
            if not bool(keep.any()):
                return fake.sum().float() * 0.0
            fake = fake[keep]
            if fake.requires_grad:
                fake.register_hook(self._clean_gradient)
            per_clip = self.pesq(real[keep], fake)
            finite = torch.isfinite(per_clip)
            if not bool(finite.all()):
                self.bad_clips += int((~finite).sum())
                if not bool(finite.any()):
                    return fake.sum().float() * 0.0
            return per_clip[finite].mean().float()


def feature_matching_loss(fmaps_real: list[list[torch.Tensor]], fmaps_fake: list[list[torch.Tensor]]) -> torch.Tensor:
    """L1 between feature maps, each layer normalised by the real map's mean magnitude (as audiocraft),
    averaged over layers and sub-discriminators so the weight does not depend on how many there are."""
    total, count = None, 0
    for real_maps, fake_maps in zip(fmaps_real, fmaps_fake):
        for r, f in zip(real_maps, fake_maps):
            r = r.detach()
            term = F.l1_loss(f, r) / r.abs().mean().clamp_min(1e-5)
            total = term if total is None else total + term
            count += 1
    return total / max(count, 1)


def generator_adversarial_loss(logits_fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    losses = [(-l).mean() if kind == "hinge" else (l - 1).pow(2).mean() for l in logits_fake]
    return sum(losses) / len(losses)


def discriminator_loss(logits_real: list[torch.Tensor], logits_fake: list[torch.Tensor], kind: str) -> torch.Tensor:
    losses = []
    for r, f in zip(logits_real, logits_fake):
        if kind == "hinge":
            losses.append(F.relu(1 - r).mean() + F.relu(1 + f).mean())
        else:
            losses.append((r - 1).pow(2).mean() + f.pow(2).mean())
    return sum(losses) / len(losses)
