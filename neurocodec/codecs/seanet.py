"""Causal SEANet encoder and decoder (the Encodec / SoundStream convolutional backbone), streamable.

Every layer is causal with zero padding and no normalisation over time, so the encoder emits frame t as
soon as sample (t + 1) * hop - 1 has arrived and the decoder emits a frame's samples as soon as its codes
arrive: the algorithmic latency is one frame.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .streaming import (SampleCounter, StreamingContainer, StreamingConv1d, StreamingConvTranspose1d, StreamingHighPass,
                        StreamingLSTM, StreamingTransformer)


@dataclass
class BottleneckConfig:
    kind: str = "none"  # none | lstm | transformer
    num_layers: int = 2
    num_heads: int = 4  # transformer
    context: int = 50  # transformer: frames of attention window (bounded cache)

    def __post_init__(self) -> None:
        if self.kind not in ("none", "lstm", "transformer"):
            raise ValueError(f"bottleneck kind {self.kind!r} is not one of none, lstm, transformer")


@dataclass
class SEANetConfig:
    channels: int = 32  # channels after the first conv; doubled at every downsampling
    strides: list[int] = field(default_factory=lambda: [2, 4, 5, 8])  # encoder order; the decoder reverses it
    dimension: int = 512  # latent channels (what the quantizer sees)
    n_residual_layers: int = 1
    # Residual blocks per decoder stage; 0: n_residual_layers. The decoder alone can be deeper: the served
    # encoder's cost stays, and blocks added to a trained model start as the identity (--init_from).
    decoder_residual_layers: int = 0
    residual_kernel_size: int = 3
    dilation_base: int = 2
    compress: int = 2  # residual blocks' hidden channels = channels / compress
    kernel_size: int = 7
    last_kernel_size: int = 7
    norm: str = "weight_norm"  # none | weight_norm (weights only; nothing normalises over time)
    bottleneck: BottleneckConfig = field(default_factory=BottleneckConfig)
    # Encoder input high-pass cutoff in Hz (streaming.StreamingHighPass: DC offsets and rumble); 0: none.
    input_highpass_hz: float = 0.0
    # Decoder activations ELU followed by a gated Snake (ELUSnake): a periodic term for the harmonics of voiced
    # speech. Grown into a trained ELU decoder (--init_from) it starts with its gates shut, as the identity.
    # Grown into the default model on day 25 it scored slightly below the same training without it.
    decoder_snake: bool = False

    def __post_init__(self) -> None:
        if not self.strides or any(s < 1 for s in self.strides):
            raise ValueError(f"strides must be positive integers, got {self.strides}")
        if self.n_residual_layers < 0 or self.decoder_residual_layers < 0:
            raise ValueError(f"residual layer counts must be >= 0, got n_residual_layers={self.n_residual_layers}, "
                             f"decoder_residual_layers={self.decoder_residual_layers}")
        if self.input_highpass_hz < 0:
            raise ValueError(f"input_highpass_hz must be 0 (none) or a cutoff in Hz, got {self.input_highpass_hz}")

    @property
    def hop_length(self) -> int:
        hop = 1
        for s in self.strides:
            hop *= s
        return hop


def _bottleneck(config: BottleneckConfig, channels: int) -> nn.Module:
    if config.kind == "lstm":
        return StreamingLSTM(channels, config.num_layers)
    if config.kind == "transformer":
        return StreamingTransformer(channels, config.num_layers, config.num_heads, config.context)
    return nn.Identity()


class ELUSnake(nn.Module):
    """ELU, then Snake with a per-channel gate: y = elu(x); y + gate * sin(alpha y)^2 / alpha.

    Snake (Ziyin et al., NeurIPS 2020) is the periodic activation of BigVGAN and DAC, whose papers credit it with
    sharper harmonics and better generalisation to unseen voices. It is not in torch.nn, hence here. The
    gate (not in DAC's form) lets a trained ELU network grow it: with the gate at 0 this is exactly the ELU it
    replaces (`start_as_identity`), and the gate's gradient, sin(alpha y)^2 / alpha, is not zero, so it opens
    as training finds it useful. Elementwise and stateless: streaming needs nothing from it."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(1, channels, 1))
        self.gate = nn.Parameter(torch.ones(1, channels, 1))

    def start_as_identity(self) -> None:
        with torch.no_grad():
            self.gate.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = nn.functional.elu(x)
        return y + self.gate * torch.sin(self.alpha * y).pow(2) / (self.alpha + 1e-9)


def _activation(channels: int, snake: bool) -> nn.Module:
    return ELUSnake(channels) if snake else nn.ELU()


class ResidualBlock(StreamingContainer):
    def __init__(self, channels: int, kernel_size: int, dilation: int, compress: int, norm: str,
                 snake: bool = False) -> None:
        super().__init__()
        hidden = max(1, channels // compress)
        # The activations take the ELUs' places, so a file without them loads by the same layer names.
        self.block = nn.Sequential(
            _activation(channels, snake),
            StreamingConv1d(channels, hidden, kernel_size, dilation=dilation, norm=norm),
            _activation(hidden, snake),
            StreamingConv1d(hidden, channels, 1, norm=norm),
        )

    def start_as_identity(self) -> None:
        """Pass the input through unchanged, still trainable: the branch's last conv gets zero weight (weight
        norm's magnitude g = 0, its direction kept, so the gradient reaches g at once) and zero bias."""
        last = self.block[-1].conv
        with torch.no_grad():
            if hasattr(last, "parametrizations"):
                last.parametrizations.weight.original0.zero_()
            else:
                last.weight.zero_()
            last.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Causal stride-1 convs emit exactly as many samples as they receive, so the skip lines up in
        # streaming too.
        return x + self.block(x)


class SEANetEncoder(StreamingContainer):
    def __init__(self, c: SEANetConfig, sample_rate: int) -> None:
        super().__init__()
        # Outside `model`: the layers' names (and so the checkpoints) are the same with or without it.
        self.input_filter = StreamingHighPass(c.input_highpass_hz, sample_rate) if c.input_highpass_hz else nn.Identity()
        layers: list[nn.Module] = [StreamingConv1d(1, c.channels, c.kernel_size, norm=c.norm)]
        ch = c.channels
        for stride in c.strides:
            for j in range(c.n_residual_layers):
                layers.append(ResidualBlock(ch, c.residual_kernel_size, c.dilation_base ** j, c.compress, c.norm))
            layers += [nn.ELU(), StreamingConv1d(ch, ch * 2, kernel_size=2 * stride, stride=stride, norm=c.norm)]
            ch *= 2
        layers += [_bottleneck(c.bottleneck, ch), nn.ELU(),
                   StreamingConv1d(ch, c.dimension, c.last_kernel_size, norm=c.norm)]
        self.model = nn.Sequential(*layers)
        self.counter = SampleCounter()  # streaming only: how far into its current frame each session is
        # Zero conv biases: PyTorch's default bias init (U(+-1/sqrt(fan_in)), large for narrow convs) makes
        # the latent mostly an input-independent offset (norm ~0.27 vs ~0.012 of speech-dependent spread for
        # grvq_4cb:tiny), and early optimiser steps move that offset 10-100x further than the spread, faster
        # than EMA codebooks can follow: training collapsed to ~8 of 1024 codes per batch.
        for module in self.modules():
            if isinstance(module, nn.Conv1d) and module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, wav: torch.Tensor) -> torch.Tensor:  # [B, 1, N] -> [B, D, N // hop]
        return self.model(self.input_filter(self.counter(wav)))


class SEANetDecoder(StreamingContainer):
    def __init__(self, c: SEANetConfig) -> None:
        super().__init__()
        ch = c.channels * 2 ** len(c.strides)
        layers: list[nn.Module] = [StreamingConv1d(c.dimension, ch, c.kernel_size, norm=c.norm),
                                   _bottleneck(c.bottleneck, ch)]
        for stride in reversed(c.strides):
            layers += [_activation(ch, c.decoder_snake),
                       StreamingConvTranspose1d(ch, ch // 2, kernel_size=2 * stride, stride=stride, norm=c.norm)]
            ch //= 2
            for j in range(c.decoder_residual_layers or c.n_residual_layers):
                layers.append(ResidualBlock(ch, c.residual_kernel_size, c.dilation_base ** j, c.compress, c.norm,
                                            snake=c.decoder_snake))
        layers += [_activation(ch, c.decoder_snake), StreamingConv1d(ch, 1, c.last_kernel_size, norm=c.norm)]
        self.model = nn.Sequential(*layers)

    def forward(self, latent: torch.Tensor) -> torch.Tensor:  # [B, D, T] -> [B, 1, T * hop]
        return self.model(latent)
