"""Image quality metrics (torchmetrics' functional SSIM / MS-SSIM / PSNR) on images in [0, 1].

One place for them: the training losses, validation and `neurocodec eval` all call these.

MS-SSIM needs the image to survive its downsamplings: with the standard 11-pixel window and 5 scales,
both sides must exceed (11 - 1) * 2**4 = 160 pixels. Smaller images (training crops) use the first
scales that fit, with the standard weights renormalised; `ms_ssim_scales` says how many.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import (multiscale_structural_similarity_index_measure,
                                           peak_signal_noise_ratio, structural_similarity_index_measure)

MS_SSIM_BETAS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)  # Wang et al. 2003
KERNEL = 11


def ms_ssim_scales(height: int, width: int) -> int:
    n = len(MS_SSIM_BETAS)
    while n > 1 and min(height, width) <= (KERNEL - 1) * 2 ** (n - 1):
        n -= 1
    return n


def ssim(x: torch.Tensor, y: torch.Tensor, reduction: str = "elementwise_mean") -> torch.Tensor:
    """SSIM of x against reference y ([B, C, H, W], data range 1)."""
    return structural_similarity_index_measure(x.float(), y.float(), data_range=1.0, reduction=reduction)


def ms_ssim(x: torch.Tensor, y: torch.Tensor, reduction: str = "elementwise_mean") -> torch.Tensor:
    """MS-SSIM (as many scales as the size allows, see module doc) of x against reference y."""
    n = ms_ssim_scales(*x.shape[-2:])
    if n < 2:  # too small for a second scale: plain SSIM
        return ssim(x, y, reduction)
    betas = torch.tensor(MS_SSIM_BETAS[:n])
    betas = tuple(float(b) for b in betas / betas.sum())
    # normalize="relu": negative contrast terms at coarse scales would give NaN gradients (fractional powers)
    return multiscale_structural_similarity_index_measure(x.float(), y.float(), data_range=1.0, betas=betas,
                                                          kernel_size=KERNEL, reduction=reduction, normalize="relu")


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PSNR in dB per image ([B]) of x against reference y, data range 1 (8-bit images: MSE over 0..1)."""
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def quantize_8bit(x: torch.Tensor) -> torch.Tensor:
    """What a PNG stores: round to 8 bits (so our scores are those of the file a user gets)."""
    return (x.clamp(0, 1) * 255).round() / 255


__all__ = ["ssim", "ms_ssim", "psnr", "ms_ssim_scales", "quantize_8bit", "peak_signal_noise_ratio"]
