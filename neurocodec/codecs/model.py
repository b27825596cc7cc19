"""The codec model: the interface every family implements, and the SEANet + quantizer family.

Interface (as audiocraft's / Moshi's `CompressionModel`): `sample_rate`, `frame_rate`, `frame_size`,
`num_codebooks` (in use), `total_codebooks`, `cardinality` (per codebook), `bitrate`,
`set_num_codebooks(n)`, `encode(wav) -> codes [B, K, T]`, `decode(codes) -> wav`, a training `forward`, and
streaming steps `encode_step` / `encode_flush` / `decode_step` inside `streaming(batch_size)` (or the
separate `encoder.streaming(...)` and `decoder.streaming(...)` contexts that a server keeps apart).

Stream start: with `model.stream_start: mirror` (the default) every stream, offline or streamed, is primed on a
stand-in for its missing past, which removes the click that a zero-state start makes (codecs/stream_start.py).

Bitrate = sum over codebooks in use of log2(cardinality_k) x frame_rate (bits of the raw code indices,
no entropy coding).

Exact encoding: float32 kernels round differently for different input shapes (a 7-sample chunk, a
1-frame step, a whole file, a batch of 1 or of 64 all take different code paths), so latents differ
by ~1e-7 between chunkings, and where two code vectors are that close to a latent the chosen code
flips. For codes that do not depend on chunking or batching, inference runs the encoder and the
nearest-code search in float64 (`set_exact_encoding`, on by default in `load_codec`): shape-dependent
rounding then sits ~1e-16 below any realistic tie. The decoder stays float32 (audio is compared with
a tolerance). Training runs in float32 (or bf16) as usual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ConfigError, from_dict
from ..errors import AudioError, CodesError
from .quantizers import Quantizer, QuantizerConfig
from .registry import Family
from .seanet import SEANetConfig, SEANetDecoder, SEANetEncoder
from .stream_start import MODES as STREAM_START_MODES
from .stream_start import StreamStart, with_stand_in
from .streaming import StreamingContainer


@dataclass
class CodecConfig:
    family: str = "seanet"
    sample_rate: int = 16000
    seed: int = 0  # a model built from config alone is initialised from this seed: same config, same weights
    seanet: SEANetConfig = field(default_factory=SEANetConfig)
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    semanticodec: dict = field(default_factory=dict)  # semanticodec family options, validated by codecs.semanticodec.SemantiCodecOptions
    xy_single: dict = field(default_factory=dict)  # xy_single family options, validated by codecs.xy_single.XYSingleConfig
    image: dict = field(default_factory=dict)  # image family options, validated by neurocodec.image.model.ImageNetConfig
    # How a stream (and a training crop) starts, audio families: "mirror" primes the encoder on the first frame
    # reversed and the decoder on the first code frame (codecs/stream_start.py); "none" starts from zero state.
    stream_start: str = "mirror"

    def __post_init__(self) -> None:
        if self.stream_start not in STREAM_START_MODES:
            raise ValueError(f"stream_start must be one of {list(STREAM_START_MODES)}, got {self.stream_start!r}")

    @classmethod
    def from_dict(cls, data: dict, where: str = "model") -> "CodecConfig":
        return from_dict(cls, data, where)


def check_branch_hop(branch: SEANetConfig, main: SEANetConfig, where: str) -> None:
    """A second encoder branch (semantic families) must emit frames at the codec's hop, or the branches'
    frames would not line up."""
    if branch.hop_length != main.hop_length:
        raise ConfigError(f"{where}.strides {branch.strides} (hop {branch.hop_length}) must give the same hop as "
                          f"model.seanet.strides {main.strides} (hop {main.hop_length})")


@dataclass
class CodecOutput:
    audio: torch.Tensor  # [B, 1, N] reconstruction
    codes: torch.Tensor  # [B, K, T]
    latent: torch.Tensor  # [B, D, T] encoder output before quantization
    quantizer_loss: torch.Tensor  # scalar
    metrics: dict[str, torch.Tensor]
    # Family-specific training losses (e.g. semantic distillation), each weighted by `loss.<name>` in the config.
    aux_losses: dict[str, torch.Tensor] = field(default_factory=dict)


class CodebookSelection:
    """The codebook-selection interface shared by the audio `Codec` and the `ImageCodec`: the codebooks
    in use (a prefix of the quantizer's, chosen by `set_num_codebooks`) and their cardinalities. The
    host class sets `config`, `quantizer` and `_num_codebooks` in its constructor."""

    config: CodecConfig
    quantizer: Quantizer
    _num_codebooks: int

    @property
    def name(self) -> str:
        return getattr(self, "_name", self.config.family)

    @property
    def total_codebooks(self) -> int:
        return self.quantizer.total_codebooks

    @property
    def num_codebooks(self) -> int:
        return self._num_codebooks

    @property
    def cardinality(self) -> list[int]:
        return self.quantizer.cardinalities[: self.num_codebooks]

    def allowed_num_codebooks(self) -> list[int]:
        return self.quantizer.allowed_num_codebooks()

    def set_num_codebooks(self, n: int) -> None:
        self.quantizer.check_num_codebooks(n)
        self._num_codebooks = n


class Codec(CodebookSelection, StreamingContainer):
    """SEANet encoder -> quantizer -> SEANet decoder, all causal."""

    # Families trained against a frozen semantic teacher set this; training then passes the teacher's
    # features at the codec frame rate to `forward(wav, teacher_features=...)`.
    uses_teacher = False

    def __init__(self, config: CodecConfig, sync_codebook: bool = False) -> None:
        super().__init__()
        self.config = config
        self.encoder = SEANetEncoder(config.seanet, config.sample_rate)
        self.decoder = SEANetDecoder(config.seanet)
        self.quantizer = Quantizer(config.seanet.dimension, config.quantizer, sync_codebook=sync_codebook)
        self._num_codebooks = self.quantizer.total_codebooks
        self.attach_stream_starts()

    def attach_stream_starts(self) -> None:
        """Per-session stream-start state inside the encoder's and the decoder's streaming contexts (no weights, so
        checkpoints are unchanged). Every family's constructor calls this once its encoder and decoder exist."""
        self.encoder.stream_start = StreamStart("encode", self.frame_size)
        self.decoder.stream_start = StreamStart("decode", self.frame_size)

    @property
    def primes_stream_start(self) -> bool:
        return self.config.stream_start == "mirror"

    # -- description ----------------------------------------------------------------------------
    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def frame_size(self) -> int:
        return self.config.seanet.hop_length

    @property
    def frame_rate(self) -> float:
        return self.sample_rate / self.frame_size

    @property
    def bitrate(self) -> float:
        """Bits per second of the code indices in use: sum_k log2(cardinality_k) * frame_rate."""
        return sum(math.log2(c) for c in self.cardinality) * self.frame_rate

    @property
    def algorithmic_latency(self) -> float:
        """Seconds from a sample's arrival until audio that depends on it can be output: one frame."""
        return self.frame_size / self.sample_rate

    def info(self) -> dict:
        return {
            "name": self.name,
            "family": self.config.family,
            "sample_rate": self.sample_rate,
            "frame_rate": self.frame_rate,
            "frame_size": self.frame_size,
            "num_codebooks": self.num_codebooks,
            "total_codebooks": self.total_codebooks,
            "allowed_num_codebooks": self.allowed_num_codebooks(),
            "cardinality": self.cardinality,
            "bitrate_bps": self.bitrate,
            "algorithmic_latency_ms": 1000.0 * self.algorithmic_latency,
            "stream_start": self.config.stream_start,
            "parameters": sum(p.numel() for p in self.parameters()),
        }

    # -- training -------------------------------------------------------------------------------
    def forward(self, wav: torch.Tensor, teacher_features: torch.Tensor | None = None) -> CodecOutput:
        """Training/validation pass on whole frames: wav [B, 1, N] with N a multiple of frame_size. Each crop is
        primed as a stream's start is at inference (see `encoder_offline`)."""
        if wav.shape[-1] % self.frame_size:
            raise ValueError(f"training input length {wav.shape[-1]} is not a multiple of the frame size {self.frame_size}")
        latent = self.encoder_offline(self.encoder, wav)
        q = self.quantizer(latent)
        audio = self.decoder_offline(q.z_q)
        return CodecOutput(audio=audio, codes=q.codes, latent=latent, quantizer_loss=q.loss, metrics=q.metrics)

    # -- offline inference ------------------------------------------------------------------------
    def _check_wav(self, wav: torch.Tensor) -> None:
        if wav.dim() != 3 or wav.shape[1] != 1:
            raise AudioError(f"expected mono audio of shape [B, 1, N], got {tuple(wav.shape)}")

    def pad_to_frames(self, wav: torch.Tensor) -> torch.Tensor:
        """Zero-pad the end to a whole number of frames, so the last partial frame is not lost."""
        rest = wav.shape[-1] % self.frame_size
        return wav if rest == 0 else nn.functional.pad(wav, (0, self.frame_size - rest))

    def num_frames(self, num_samples: int) -> int:
        return -(-num_samples // self.frame_size)

    def set_exact_encoding(self, exact: bool = True) -> None:
        """Run the encoder and the quantizer in float64 at inference; see the module docstring."""
        dtype = torch.float64 if exact else torch.float32
        self.encoder.to(dtype)
        self.quantizer.to(dtype)

    @property
    def encoder_dtype(self) -> torch.dtype:
        return next(self.encoder.parameters()).dtype

    def encode_latent(self, wav: torch.Tensor) -> torch.Tensor:
        """The encoder's output [B, D, N / hop] for whole-frame audio [B, 1, N], offline, as `encode` quantizes it."""
        return self.encoder_offline(self.encoder, wav.to(self.encoder_dtype))

    def encoder_offline(self, run, wav: torch.Tensor):
        """`run` (the encoder, or a view of it such as xy_single's `encoder.branches`) on whole-frame audio offline,
        primed as a stream starts (codecs/stream_start.py): the stand-in's frame is dropped from each output.
        Every family's training `forward` goes through it too (the module docstring there says why)."""
        if not self.primes_stream_start:
            return run(wav)
        out = run(with_stand_in("encode", wav, self.frame_size))
        return tuple(o[..., 1:] for o in out) if isinstance(out, tuple) else out[..., 1:]

    def decoder_offline(self, latent: torch.Tensor) -> torch.Tensor:
        """The decoder on quantized latents [B, D, T] offline, primed on the first frame (see `encoder_offline`)."""
        if not self.primes_stream_start:
            return self.decoder(latent)
        return self.decoder(with_stand_in("decode", latent, self.frame_size))[..., self.frame_size:]

    @torch.no_grad()
    def encode(self, wav: torch.Tensor) -> torch.Tensor:
        """Codes [B, K, ceil(N / frame_size)] for audio [B, 1, N] at `sample_rate`."""
        self._check_wav(wav)
        return self.quantizer.encode(self.encode_latent(self.pad_to_frames(wav)), self.num_codebooks)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Audio [B, 1, T * frame_size] for codes [B, k, T]."""
        self.check_codes(codes)
        return self.decoder_offline(self._dequantize(codes))

    def _dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantizer.decode(codes).to(next(self.decoder.parameters()).dtype)

    def _decode_unprimed(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(self._dequantize(codes))

    def check_codes(self, codes: torch.Tensor) -> None:
        if codes.dim() != 3:
            raise CodesError(f"codes must have shape [B, K, T], got {tuple(codes.shape)}")
        if codes.shape[1] not in self.allowed_num_codebooks():
            raise CodesError(f"codes have {codes.shape[1]} codebooks; this model takes {self.allowed_num_codebooks()}")
        if codes.dtype.is_floating_point:
            raise CodesError("codes must be integers")
        cards = torch.tensor(self.quantizer.cardinalities[: codes.shape[1]], device=codes.device).view(1, -1, 1)
        bad = (codes < 0) | (codes >= cards)
        if bool(bad.any()):
            b, k, t = (int(i) for i in bad.nonzero()[0])
            raise CodesError(f"code {int(codes[b, k, t])} at codebook {k}, frame {t} is out of range "
                             f"[0, {self.quantizer.cardinalities[k]})")

    # -- streaming ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_step(self, chunk: torch.Tensor) -> torch.Tensor:
        """Feed the next chunk of audio (any length) of each session; returns the frames it completes. A session's
        first step is primed (codecs/stream_start.py); before its first frame is whole, its samples are held."""
        self._check_wav(chunk)
        if not self.primes_stream_start:
            return self.encode_frames(chunk)
        return self.encoder.stream_start.step(chunk, self.encode_frames, self.encoder, empty=lambda: torch.zeros(
            chunk.shape[0], self.num_codebooks, 0, dtype=torch.long, device=chunk.device))

    @torch.no_grad()
    def encode_frames(self, chunk: torch.Tensor) -> torch.Tensor:
        """`encode_step` without stream-start priming: for callers that prime new sessions themselves (the server's
        batcher, the ONNX runner) and step whole frames."""
        self._check_wav(chunk)
        return self.quantizer.encode(self.encoder(chunk.to(self.encoder_dtype)), self.num_codebooks)

    @torch.no_grad()
    def encode_flush(self) -> torch.Tensor:
        """End of stream: zero-pad the partial frame (as offline `encode` does) and return its codes."""
        seen = self.encoder.counter.samples_seen()
        if self.primes_stream_start:  # a stream shorter than one frame is still held, not yet seen by the encoder
            seen = seen + self.encoder.stream_start.held_samples()
        pending = {int(p) for p in seen % self.frame_size}
        if len(pending) > 1:
            raise ValueError("encode_flush() needs every session at the same position within a frame")
        rest = pending.pop()
        device = next(self.parameters()).device
        if rest == 0:
            return torch.zeros(len(seen), self.num_codebooks, 0, dtype=torch.long, device=device)
        return self.encode_step(torch.zeros(len(seen), 1, self.frame_size - rest, device=device))

    @torch.no_grad()
    def decode_step(self, codes: torch.Tensor) -> torch.Tensor:
        """Feed the next frames of codes [B, k, t]; returns their t * frame_size samples per session. A session's
        first step is primed (codecs/stream_start.py)."""
        self.check_codes(codes)
        if not self.primes_stream_start:
            return self._decode_unprimed(codes)
        return self.decoder.stream_start.step(codes, self._decode_unprimed, self.decoder)

    @torch.no_grad()
    def decode_frames(self, codes: torch.Tensor) -> torch.Tensor:
        """`decode_step` without stream-start priming (see `encode_frames`)."""
        self.check_codes(codes)
        return self._decode_unprimed(codes)



# The family entry (pyproject.toml, entry point `neurocodec.families:seanet`; see codecs/registry.py).
FAMILY = Family(name="seanet", modality="audio", codec_class=Codec)
