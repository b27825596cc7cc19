"""GAN discriminators for codec training, any combination chosen in the config's `disc:` section.

Every sub-discriminator maps audio [B, 1, N] to `(logits, feature_maps)`: logits is one tensor (any shape,
per-patch real/fake scores), feature_maps the list of hidden activations used by the feature-matching
loss. `Discriminators` runs all selected families and returns one flat list of those pairs.

Families (our own implementations of the published architectures):
  mpd     multi-period (HiFi-GAN): audio folded into [N/p, p] images, 2-D convs along time; periods 2,3,5,7,11
  msd     multi-scale (MelGAN / HiFi-GAN): 1-D grouped convs on the raw audio and 2x, 4x average-pooled copies
  msstft  multi-scale STFT (Encodec MS-STFTD): 2-D convs over complex (real, imag) spectrograms at several FFT sizes
  mrd     multi-resolution, multi-band spectrogram (DAC / Vocos MRD): complex STFT split into frequency bands,
          each band with its own conv stack, concatenated along frequency
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

KINDS = ("mpd", "msd", "msstft", "mrd")
Output = tuple[torch.Tensor, list[torch.Tensor]]


@dataclass
class DiscConfig:
    kinds: list[str] = field(default_factory=lambda: ["mpd", "msd", "msstft"])  # any of mpd, msd, msstft, mrd
    channels: int = 32  # width of the first layer of each sub-discriminator (grows with depth)
    max_channels: int = 512
    periods: list[int] = field(default_factory=lambda: [2, 3, 5, 7, 11])  # mpd
    scales: int = 3  # msd: raw audio, then each further scale average-pooled by 2
    stft_n_ffts: list[int] = field(default_factory=lambda: [1024, 2048, 512, 256, 128])  # msstft (hop = n_fft / 4)
    mrd_n_ffts: list[int] = field(default_factory=lambda: [2048, 1024, 512])  # mrd (hop = n_fft / 4)
    mrd_bands: list[list[float]] = field(default_factory=lambda: [[0.0, 0.1], [0.1, 0.25], [0.25, 0.5],
                                                                  [0.5, 0.75], [0.75, 1.0]])

    def __post_init__(self) -> None:
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise ValueError(f"unknown discriminator kind(s) {bad}; choose from {', '.join(KINDS)}")
        if self.channels < 1 or self.max_channels < self.channels:
            raise ValueError("need 1 <= channels <= max_channels")


def _wn(module: nn.Module) -> nn.Module:
    return weight_norm(module)


def _widths(base: int, cap: int, n: int, growth: int) -> list[int]:
    return [min(cap, base * growth ** i) for i in range(n)]


class PeriodDiscriminator(nn.Module):
    def __init__(self, period: int, channels: int, max_channels: int) -> None:
        super().__init__()
        self.period = period
        widths = _widths(channels, max_channels, 4, 4)
        layers, c_in = [], 1
        for c in widths:
            layers.append(_wn(nn.Conv2d(c_in, c, (5, 1), (3, 1), padding=(2, 0))))
            c_in = c
        layers.append(_wn(nn.Conv2d(c_in, c_in, (5, 1), 1, padding=(2, 0))))
        self.convs = nn.ModuleList(layers)
        self.post = _wn(nn.Conv2d(c_in, 1, (3, 1), 1, padding=(1, 0)))

    def forward(self, x: torch.Tensor) -> Output:
        b, c, n = x.shape
        if n % self.period:
            x = F.pad(x, (0, self.period - n % self.period), mode="reflect")
        return _conv_stack(self.convs, self.post, x.view(b, c, -1, self.period))


def _conv_stack(convs: nn.ModuleList, post: nn.Module, x: torch.Tensor) -> Output:
    """HiFi-GAN discriminator body: leaky-ReLU convs then a 1-channel head; every activation is a feature map."""
    fmaps = []
    for conv in convs:
        x = F.leaky_relu(conv(x), 0.1)
        fmaps.append(x)
    x = post(x)
    fmaps.append(x)
    return x.flatten(1), fmaps


class ScaleDiscriminator(nn.Module):
    def __init__(self, channels: int, max_channels: int) -> None:
        super().__init__()
        c0 = channels
        widths = _widths(c0 * 2, max_channels, 4, 2)
        layers = [_wn(nn.Conv1d(1, c0, 15, 1, padding=7))]
        c_in = c0
        for c in widths:
            groups = max(1, min(c_in, c) // 4)
            while c_in % groups or c % groups:
                groups -= 1
            layers.append(_wn(nn.Conv1d(c_in, c, 41, 4, groups=groups, padding=20)))
            c_in = c
        layers.append(_wn(nn.Conv1d(c_in, c_in, 5, 1, padding=2)))
        self.convs = nn.ModuleList(layers)
        self.post = _wn(nn.Conv1d(c_in, 1, 3, 1, padding=1))

    def forward(self, x: torch.Tensor) -> Output:
        return _conv_stack(self.convs, self.post, x)


class MultiScale(nn.Module):
    def __init__(self, scales: int, channels: int, max_channels: int) -> None:
        super().__init__()
        self.discs = nn.ModuleList(ScaleDiscriminator(channels, max_channels) for _ in range(scales))

    def forward(self, x: torch.Tensor) -> list[Output]:
        outs = []
        for i, disc in enumerate(self.discs):
            if i:
                x = F.avg_pool1d(x, 4, 2, padding=2)
            outs.append(disc(x))
        return outs


def _complex_spec(x: torch.Tensor, n_fft: int, window: torch.Tensor) -> torch.Tensor:
    """[B, 1, N] -> [B, 2, frames, freqs]: real and imaginary parts as two image channels."""
    spec = torch.stft(x.squeeze(1).float(), n_fft, hop_length=n_fft // 4, win_length=n_fft, window=window,
                      center=True, normalized=True, return_complex=True)
    return torch.view_as_real(spec).permute(0, 3, 2, 1)


class STFTDiscriminator(nn.Module):
    """Encodec MS-STFTD branch: dilated 2-D convs over time, stride 2 over frequency."""

    def __init__(self, n_fft: int, channels: int, max_channels: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        widths = _widths(channels, max_channels, 4, 2)
        layers = [_wn(nn.Conv2d(2, channels, (3, 9), padding=(1, 4)))]
        c_in = channels
        for i, c in enumerate(widths):
            d = 2 ** i
            layers.append(_wn(nn.Conv2d(c_in, c, (3, 9), stride=(1, 2), dilation=(d, 1), padding=(d, 4))))
            c_in = c
        layers.append(_wn(nn.Conv2d(c_in, c_in, (3, 3), padding=(1, 1))))
        self.convs = nn.ModuleList(layers)
        self.post = _wn(nn.Conv2d(c_in, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: torch.Tensor) -> Output:
        z = _complex_spec(x, self.n_fft, self.window).to(x.dtype)
        fmaps = []
        for conv in self.convs:
            z = F.leaky_relu(conv(z), 0.2)
            fmaps.append(z)
        z = self.post(z)
        return z.flatten(1), fmaps


class BandDiscriminator(nn.Module):
    """DAC MRD branch: a complex spectrogram cut into frequency bands, one conv stack per band."""

    def __init__(self, n_fft: int, bands: list[list[float]], channels: int, max_channels: int) -> None:
        super().__init__()
        self.n_fft = n_fft
        self.register_buffer("window", torch.hann_window(n_fft), persistent=False)
        n_bins = n_fft // 2 + 1
        self.bands = [(int(lo * n_bins), max(int(lo * n_bins) + 1, int(hi * n_bins))) for lo, hi in bands]
        c = min(channels, max_channels)

        def stack() -> nn.ModuleList:
            return nn.ModuleList([
                _wn(nn.Conv2d(2, c, (3, 9), padding=(1, 4))),
                _wn(nn.Conv2d(c, c, (3, 9), stride=(1, 2), padding=(1, 4))),
                _wn(nn.Conv2d(c, c, (3, 9), stride=(1, 2), padding=(1, 4))),
                _wn(nn.Conv2d(c, c, (3, 9), stride=(1, 2), padding=(1, 4))),
                _wn(nn.Conv2d(c, c, (3, 3), padding=(1, 1))),
            ])

        self.stacks = nn.ModuleList(stack() for _ in self.bands)
        self.post = _wn(nn.Conv2d(c, 1, (3, 3), padding=(1, 1)))

    def forward(self, x: torch.Tensor) -> Output:
        z = _complex_spec(x, self.n_fft, self.window).to(x.dtype)
        fmaps, outs = [], []
        for (lo, hi), stack in zip(self.bands, self.stacks):
            h = z[..., lo:hi]
            for conv in stack:
                h = F.leaky_relu(conv(h), 0.1)
                fmaps.append(h)
            outs.append(h)
        h = self.post(torch.cat(outs, dim=-1))
        fmaps.append(h)
        return h.flatten(1), fmaps


class Discriminators(nn.Module):
    """All sub-discriminators selected by `DiscConfig.kinds`; forward returns a flat list of (logits, fmaps)."""

    def __init__(self, config: DiscConfig) -> None:
        super().__init__()
        self.config = c = config
        self.mpd = nn.ModuleList(PeriodDiscriminator(p, c.channels, c.max_channels) for p in c.periods) \
            if "mpd" in c.kinds else nn.ModuleList()
        self.msd = MultiScale(c.scales, c.channels, c.max_channels) if "msd" in c.kinds else None
        self.msstft = nn.ModuleList(STFTDiscriminator(n, c.channels, c.max_channels) for n in c.stft_n_ffts) \
            if "msstft" in c.kinds else nn.ModuleList()
        self.mrd = nn.ModuleList(BandDiscriminator(n, c.mrd_bands, c.channels, c.max_channels) for n in c.mrd_n_ffts) \
            if "mrd" in c.kinds else nn.ModuleList()

    def forward(self, x: torch.Tensor) -> list[Output]:
        outs = [d(x) for d in self.mpd]
        if self.msd is not None:
            outs.extend(self.msd(x))
        outs.extend(d(x) for d in self.msstft)
        outs.extend(d(x) for d in self.mrd)
        return outs
