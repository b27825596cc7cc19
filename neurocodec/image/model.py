"""The image codec: VQGAN-style 2-D conv encoder -> the shared quantizer adapter -> conv decoder.

Images are float tensors `[B, 3, H, W]` with values in [0, 1] (grey images are expanded to RGB by the
loaders); the networks see them mapped to [-1, 1]. The encoder downsamples by `f = 2 ** (len(ch_mult) - 1)`
(8 or 16 in the shipped configs), so an image gives a token grid `codes [B, K, h, w]` with
`h = ceil(H / f)`, `w = ceil(W / f)`; sizes that are not multiples of `f` are padded at the bottom/right by
repeating the edge (the decoder returns the padded size; callers crop).

Bits per pixel (raw code indices, no entropy coding) = `sum_k log2(cardinality_k) * h * w / (H * W)`.

The quantizer is `neurocodec.codecs.quantizers.Quantizer` (grvq, rvq, fsq, rfsq, vq, lfq), fed the h*w
grid cells as a sequence (`ImageQuantizer` only flattens and unflattens the grid), so code order, usage
metrics and codebook handling are the audio codecs' own. Options of this family live in the config's
`model.image` section, validated by `ImageNetConfig` (unknown keys are errors).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..codecs.model import CodebookSelection, CodecConfig
from ..codecs.quantizers import Quantizer, QuantizedResult
from ..config import from_dict
from ..errors import CodesError, UserError


class ImageError(UserError):
    """An image that cannot be used (unreadable, wrong shape, not finite)."""


@dataclass
class ImageNetConfig:
    channels: int = 128  # width of the first level
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2])  # width multipliers; len-1 downsamplings
    num_res_blocks: int = 2  # residual blocks per level
    latent_dim: int = 8  # channels of the quantized latent (the quantizer's `dim`)
    mid_attention: bool = True  # one self-attention block at the lowest resolution (as VQGAN)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if not self.ch_mult or any(m < 1 for m in self.ch_mult):
            raise ValueError("ch_mult must be a non-empty list of positive integers")
        if self.channels < 1 or self.num_res_blocks < 0 or self.latent_dim < 1:
            raise ValueError("channels and latent_dim must be >= 1, num_res_blocks >= 0")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)


@dataclass
class ImageCodecOutput:
    image: torch.Tensor  # [B, 3, H, W] reconstruction in [0, 1] space (not clamped: losses see the raw output)
    codes: torch.Tensor  # [B, K, h, w]
    latent: torch.Tensor  # [B, D, h, w] encoder output before quantization
    quantizer_loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


def _groups(channels: int) -> int:
    for g in (32, 16, 8, 4, 2):
        if channels % g == 0:
            return g
    return 1


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(cin), cin, eps=1e-6)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = nn.GroupNorm(_groups(cout), cout, eps=1e-6)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the grid cells (VQGAN's mid block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(_groups(channels), channels, eps=1e-6)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(b, 3, c, h * w).transpose(-1, -2).unbind(1)  # [B, hw, C]
        out = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.proj(out.transpose(-1, -2).reshape(b, c, h, w))


class Encoder2d(nn.Module):
    def __init__(self, c: ImageNetConfig) -> None:
        super().__init__()
        widths = [c.channels * m for m in c.ch_mult]
        self.conv_in = nn.Conv2d(3, widths[0], 3, padding=1)
        blocks: list[nn.Module] = []
        cin = widths[0]
        for level, width in enumerate(widths):
            for _ in range(c.num_res_blocks):
                blocks.append(ResBlock(cin, width, c.dropout))
                cin = width
            if level < len(widths) - 1:
                blocks.append(nn.Conv2d(cin, cin, 4, stride=2, padding=1))  # exact /2 on even sizes
        self.down = nn.Sequential(*blocks)
        mid = [ResBlock(cin, cin, c.dropout)]
        if c.mid_attention:
            mid.append(AttnBlock(cin))
        mid.append(ResBlock(cin, cin, c.dropout))
        self.mid = nn.Sequential(*mid)
        self.norm_out = nn.GroupNorm(_groups(cin), cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, c.latent_dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.mid(self.down(self.conv_in(x))))))


class Decoder2d(nn.Module):
    def __init__(self, c: ImageNetConfig) -> None:
        super().__init__()
        widths = [c.channels * m for m in c.ch_mult]
        cin = widths[-1]
        self.conv_in = nn.Conv2d(c.latent_dim, cin, 3, padding=1)
        mid = [ResBlock(cin, cin, c.dropout)]
        if c.mid_attention:
            mid.append(AttnBlock(cin))
        mid.append(ResBlock(cin, cin, c.dropout))
        self.mid = nn.Sequential(*mid)
        blocks: list[nn.Module] = []
        for level in reversed(range(len(widths))):
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResBlock(cin, widths[level], c.dropout))
                cin = widths[level]
            if level > 0:
                blocks.append(Upsample(cin))
        self.up = nn.Sequential(*blocks)
        self.norm_out = nn.GroupNorm(_groups(cin), cin, eps=1e-6)
        self.conv_out = nn.Conv2d(cin, 3, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.conv_out(F.silu(self.norm_out(self.up(self.mid(self.conv_in(z))))))


class Upsample(nn.Module):
    """Nearest x2 then a 3x3 conv (no checkerboard artefacts of transposed convs)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ImageQuantizer(Quantizer):
    """The shared adapter on a grid: latents [B, D, h, w] <-> codes [B, K, h, w] (cells in raster order)."""

    def forward(self, z: torch.Tensor) -> QuantizedResult:
        if z.dim() == 3:
            return super().forward(z)
        b, d, h, w = z.shape
        q = super().forward(z.reshape(b, d, h * w))
        return QuantizedResult(z_q=q.z_q.reshape(b, d, h, w), codes=q.codes.reshape(b, -1, h, w), loss=q.loss,
                               metrics=q.metrics)

    @torch.no_grad()
    def encode(self, z: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        if z.dim() == 3:
            return super().encode(z, n_q)
        b, d, h, w = z.shape
        return super().encode(z.reshape(b, d, h * w), n_q).reshape(b, -1, h, w)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dim() == 3:
            return super().decode(codes)
        b, k, h, w = codes.shape
        return super().decode(codes.reshape(b, k, h * w)).reshape(b, -1, h, w)


class ImageCodec(CodebookSelection, nn.Module):
    """Image tokenizer with the codec interface adapted to 2-D: `encode(img) -> codes [B, K, h, w]`,
    `decode(codes) -> img`, `set_num_codebooks`, `cardinality`, `bits_per_token`, `bpp(H, W)`, `info()`."""

    def __init__(self, config: CodecConfig, sync_codebook: bool = False) -> None:
        super().__init__()
        self.config = config
        self.net_config = from_dict(ImageNetConfig, config.image, "model.image")
        self.encoder = Encoder2d(self.net_config)
        self.decoder = Decoder2d(self.net_config)
        self.quantizer = ImageQuantizer(self.net_config.latent_dim, config.quantizer, sync_codebook=sync_codebook)
        self._num_codebooks = self.quantizer.total_codebooks

    # -- description ----------------------------------------------------------------------------
    @property
    def downsample(self) -> int:
        return self.net_config.downsample

    @property
    def bits_per_token(self) -> float:
        """Bits of one grid cell (all codebooks in use): sum_k log2(cardinality_k)."""
        return sum(math.log2(c) for c in self.cardinality)

    def grid_size(self, height: int, width: int) -> tuple[int, int]:
        f = self.downsample
        return -(-height // f), -(-width // f)

    def bpp(self, height: int, width: int) -> float:
        """Bits per pixel of an H x W image: bits_per_token * grid cells / pixels (raw indices)."""
        h, w = self.grid_size(height, width)
        return self.bits_per_token * h * w / (height * width)

    def info(self) -> dict:
        return {
            "name": self.name,
            "family": self.config.family,
            "modality": "image",
            "downsample": self.downsample,
            "num_codebooks": self.num_codebooks,
            "total_codebooks": self.total_codebooks,
            "allowed_num_codebooks": self.allowed_num_codebooks(),
            "cardinality": self.cardinality,
            "bits_per_token": self.bits_per_token,
            "bpp_note": "bits per pixel = bits_per_token * ceil(H/f) * ceil(W/f) / (H * W)",
            "bpp_256x256": self.bpp(256, 256),
            "quantizer": self.config.quantizer.kind,
            "parameters": sum(p.numel() for p in self.parameters()),
        }

    # -- shapes ---------------------------------------------------------------------------------
    def _check_image(self, img: torch.Tensor) -> None:
        if img.dim() != 4 or img.shape[1] != 3:
            raise ImageError(f"expected RGB images of shape [B, 3, H, W], got {tuple(img.shape)}")
        if not bool(torch.isfinite(img).all()):
            raise ImageError("image contains NaN or Inf values")

    def pad_to_grid(self, img: torch.Tensor) -> torch.Tensor:
        """Repeat the last row/column up to whole multiples of the downsampling factor."""
        f = self.downsample
        ph, pw = (-img.shape[-2]) % f, (-img.shape[-1]) % f
        return img if ph == 0 and pw == 0 else F.pad(img, (0, pw, 0, ph), mode="replicate")

    # -- training -------------------------------------------------------------------------------
    def forward(self, img: torch.Tensor, teacher_features: torch.Tensor | None = None) -> ImageCodecOutput:
        """Training pass: img [B, 3, H, W] in [0, 1], H and W multiples of the downsampling factor."""
        f = self.downsample
        if img.shape[-1] % f or img.shape[-2] % f:
            raise ValueError(f"training images must be multiples of {f} pixels, got {tuple(img.shape[-2:])}")
        latent = self.encoder(img * 2 - 1)
        q = self.quantizer(latent)
        out = (self.decoder(q.z_q) + 1) / 2
        return ImageCodecOutput(image=out, codes=q.codes, latent=latent, quantizer_loss=q.loss, metrics=q.metrics)

    # -- inference ------------------------------------------------------------------------------
    def set_exact_encoding(self, exact: bool = True) -> None:
        """float64 encoder + quantizer at inference: codes then do not depend on batch size or kernels."""
        dtype = torch.float64 if exact else torch.float32
        self.encoder.to(dtype)
        self.quantizer.to(dtype)

    def warm_start_input(self, cells: int) -> torch.Tensor:
        """Pseudo-random images (float64) giving at least `cells` grid cells, for the k-means codebook warm
        start of config-only models (see `codecs.checkpoint.warm_start_codebooks`): smooth colour fields
        plus texture, so latents are spread like those of photos rather than of white noise."""
        f = self.downsample
        side = 8 * f
        n = -(-cells // 64)
        coarse = torch.rand(n, 3, 4, 4, dtype=torch.float64)
        img = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
        img = img + 0.1 * torch.randn(n, 3, side, side, dtype=torch.float64)
        return img.clamp(0, 1) * 2 - 1  # the encoder's input range

    @torch.no_grad()
    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Codes [B, K, ceil(H/f), ceil(W/f)] for images [B, 3, H, W] in [0, 1]."""
        self._check_image(img)
        dtype = next(self.encoder.parameters()).dtype
        latent = self.encoder(self.pad_to_grid(img).to(dtype) * 2 - 1)
        return self.quantizer.encode(latent, self.num_codebooks)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Images [B, 3, h*f, w*f] in [0, 1] (clamped) for codes [B, k, h, w]."""
        self.check_codes(codes)
        dtype = next(self.decoder.parameters()).dtype
        out = self.decoder(self.quantizer.decode(codes).to(dtype))
        return ((out + 1) / 2).clamp(0, 1)

    def check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 4:
            raise CodesError(f"image codes must have shape [B, K, h, w], got {tuple(codes.shape)}")
        if codes.shape[1] not in self.allowed_num_codebooks():
            raise CodesError(f"codes have {codes.shape[1]} codebooks; this model takes {self.allowed_num_codebooks()}")
        if codes.dtype.is_floating_point:
            raise CodesError("codes must be integers")
        cards = torch.tensor(self.quantizer.cardinalities[: codes.shape[1]], device=codes.device).view(1, -1, 1, 1)
        bad = (codes < 0) | (codes >= cards)
        if bool(bad.any()):
            b, k, y, x = (int(i) for i in bad.nonzero()[0])
            raise CodesError(f"code {int(codes[b, k, y, x])} at codebook {k}, cell ({y}, {x}) is out of range "
                             f"[0, {self.quantizer.cardinalities[k]})")
