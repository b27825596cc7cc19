"""PatchGAN discriminator (pix2pix / VQGAN's NLayerDiscriminator): a conv stack whose output is a map of
logits, one per overlapping patch, so the adversarial loss judges local texture rather than the whole image.

Returns `[(logits, feature_maps)]` like the audio discriminators (`neurocodec.train.discriminators`), so the
same hinge / least-squares and feature-matching losses (`neurocodec.train.losses`) apply unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .model import _groups

KINDS = ("patch",)


@dataclass
class PatchDiscConfig:
    kinds: list[str] = field(default_factory=lambda: ["patch"])  # [] trains without a discriminator
    channels: int = 64  # first layer width (doubles per layer, up to max_channels)
    max_channels: int = 512
    layers: int = 3  # stride-2 layers: receptive field 70 px for 3 (pix2pix)
    scales: int = 1  # >1: also judge x2, x4, ... downsampled images (multi-scale PatchGAN)

    def __post_init__(self) -> None:
        unknown = [k for k in self.kinds if k not in KINDS]
        if unknown:
            raise ValueError(f"disc.kinds {unknown} unknown for images; known: {', '.join(KINDS)}")
        if self.layers < 1 or self.scales < 1 or self.channels < 1:
            raise ValueError("disc.layers, disc.scales and disc.channels must be >= 1")


class PatchDiscriminator(nn.Module):
    def __init__(self, c: PatchDiscConfig) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, c.channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2))]
        cin = c.channels
        for i in range(1, c.layers + 1):
            cout = min(c.channels * 2 ** i, c.max_channels)
            stride = 2 if i < c.layers else 1
            # GroupNorm rather than BatchNorm: batch statistics differ between real and fake batches and
            # between DDP processes; group statistics are per image.
            layers.append(nn.Sequential(nn.Conv2d(cin, cout, 4, stride=stride, padding=1),
                                        nn.GroupNorm(_groups(cout), cout), nn.LeakyReLU(0.2)))
            cin = cout
        self.layers = nn.ModuleList(layers)
        self.out = nn.Conv2d(cin, 1, 4, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        fmaps = []
        for layer in self.layers:
            x = layer(x)
            fmaps.append(x)
        return self.out(x), fmaps


class ImageDiscriminators(nn.Module):
    """One PatchGAN per scale; input images in [0, 1] (mapped to [-1, 1] here)."""

    def __init__(self, c: PatchDiscConfig) -> None:
        super().__init__()
        self.discs = nn.ModuleList([PatchDiscriminator(c) for _ in range(c.scales)])
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False)

    def forward(self, img: torch.Tensor) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
        x = img * 2 - 1
        outs = []
        for i, disc in enumerate(self.discs):
            if i:
                x = self.pool(x)
            outs.append(disc(x))
        return outs
