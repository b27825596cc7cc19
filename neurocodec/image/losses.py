"""Losses of the image codec, weighted by the config's `loss:` section (weight 0: computed and logged only).

  l1           mean absolute error on pixels ([0, 1] range)
  ssim         1 - SSIM
  ms_ssim      1 - MS-SSIM (as many scales as the crop allows; see `metrics.py`)
  perceptual   distance between features of a network YOU supply (`perceptual_model`: a TorchScript file,
               e.g. a VGG/LPIPS trunk you exported with `torch.jit.save`); nothing is downloaded
  adversarial  generator hinge / least-squares loss against the PatchGAN
  feature      feature matching on the PatchGAN's feature maps
  quantizer    the quantizer's own commitment / entropy losses
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .metrics import ms_ssim, ssim

WEIGHTS = ("l1", "ssim", "ms_ssim", "perceptual", "adversarial", "feature", "quantizer")


@dataclass
class ImageLossConfig:
    l1: float = 1.0
    ssim: float = 0.0
    ms_ssim: float = 0.5
    perceptual: float = 0.0
    adversarial: float = 0.1
    feature: float = 0.0
    quantizer: float = 1.0
    adversarial_kind: str = "hinge"  # hinge | lsgan
    perceptual_model: str | None = None  # TorchScript file: images [B, 3, H, W] in [-1, 1] -> tensor or list of tensors

    def __post_init__(self) -> None:
        if self.adversarial_kind not in ("hinge", "lsgan"):
            raise ValueError(f"adversarial_kind must be hinge or lsgan, got {self.adversarial_kind!r}")
        for name in WEIGHTS:
            if getattr(self, name) < 0:
                raise ValueError(f"loss weight {name} must be >= 0")
        if self.perceptual > 0 and not self.perceptual_model:
            raise ValueError("loss.perceptual > 0 needs loss.perceptual_model (a TorchScript file of your feature network)")


class PerceptualLoss(nn.Module):
    """Mean L1 between (unit-normalised per channel) features of a frozen user-supplied network."""

    def __init__(self, path: str) -> None:
        super().__init__()
        if not Path(path).is_file():
            raise UserError(f"loss.perceptual_model: {path} does not exist")
        try:
            net = torch.jit.load(path, map_location="cpu")
        except (RuntimeError, ValueError) as err:
            raise UserError(f"loss.perceptual_model: {path} is not a TorchScript file ({err})") from None
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)

    def train(self, mode: bool = True):  # the feature network stays in eval mode
        super().train(mode)
        self.net.eval()
        return self

    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = self.net(x * 2 - 1)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            real_f = self._features(real)
        total = fake.new_zeros(())
        for f, r in zip(self._features(fake), real_f):
            norm = lambda t: t / (t.pow(2).sum(1, keepdim=True).sqrt() + 1e-8)  # noqa: E731 (LPIPS-style)
            total = total + F.l1_loss(norm(f), norm(r))
        return total / max(len(real_f), 1)


def reconstruction_losses(fake: torch.Tensor, real: torch.Tensor, config: ImageLossConfig,
                          perceptual: PerceptualLoss | None) -> dict[str, torch.Tensor]:
    losses = {"l1": F.l1_loss(fake, real)}
    if config.ssim > 0:
        losses["ssim"] = 1 - ssim(fake, real)
    if config.ms_ssim > 0:
        losses["ms_ssim"] = 1 - ms_ssim(fake, real)
    if perceptual is not None:
        losses["perceptual"] = perceptual(fake, real)
    return losses
