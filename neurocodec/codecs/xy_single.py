"""`xy_single`: one codebook for speech language models (XY-Tokenizer style), streamable like every codec.

Two causal encoders read the same audio at the same hop (640 samples = 25 Hz, or 1280 = 12.5 Hz):

* a **semantic branch** (SEANet convolutions + a causal transformer with a bounded window) that is
  distilled to a frozen speech teacher (HuBERT / WavLM / ...): a 1x1 projection of its output is pulled
  towards the teacher's features with a cosine loss. The projection is used in training only; at
  inference the branch needs no teacher;
* an **acoustic branch** (a plain causal SEANet encoder) that keeps what the teacher ignores (speaker,
  pitch, channel).

Their outputs are concatenated and fused by a 1x1 conv into one latent, quantised into ONE codebook, and a
causal SEANet decoder turns the codes back into audio. One token per frame: 13 bits x 25 Hz = 325 bit/s.

Why LFQ with three usage terms for the single codebook (8192 entries = 13 sign bits; 16384 = 14 bits at
12.5 Hz): a learnt 8192-entry codebook (EMA VQ) sees a few hundred latents per CPU batch, so most entries go
many steps without a vote and usage hinges on dead-code expiry. A fixed grid (FSQ, LFQ) cannot drift away
from the encoder, but nothing makes the encoder fill it: with FSQ [8, 8, 8, 4, 4] a CPU hour ended at 2% of
the entries on the held-out speaker, the fused latent varying along few directions. LFQ's code is a product
of 13 bits, so its entropy is the sum of the bits' entropies when the bits are independent. Two terms push
there: the library's entropy term (confident bits, distinct codes within a batch) and
`lfq_balance.decorrelation_loss` (each bit centred, bits uncorrelated over the batch), which is well
estimated from a few hundred frames however large the codebook (`quantizer.decorrelation_weight`).
Pairwise independence still leaves higher-order dependence, so a third term, `lfq_balance.CodeBalance`
(`quantizer.code_balance_weight`), flattens the code distribution seen over the last ~100 batches
(docs/semantic/lab_log.md has the measurements).
`quantizer.kind: fsq` or `vq` (EMA VQ with k-means init and dead-code expiry) can still be chosen.

Streaming: `encoder` is one `StreamingContainer` holding both branches and the fusion, so
`encoder.streaming(B)`, `reset_streaming`, `set_exec_mask` and `set_exact_encoding` (float64 encoder and
quantizer) cover both branches at once, and `encode_step` / `encode_flush` / `decode_step` are inherited
from `Codec` unchanged. Both branches emit frame t as soon as sample (t + 1) * hop - 1 has arrived (causal
convs, same total stride), so their frames line up in every chunking.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, from_dict
from .model import Codec, CodecConfig, CodecOutput, check_branch_hop
from .quantizers import Quantizer
from .registry import Family
from .seanet import BottleneckConfig, SEANetConfig, SEANetDecoder, SEANetEncoder
from .streaming import SampleCounter, StreamingContainer, StreamingConv1d


def _semantic_default() -> SEANetConfig:
    return SEANetConfig(channels=16, strides=[4, 5, 8, 4], dimension=256,
                        bottleneck=BottleneckConfig(kind="transformer", num_layers=2, num_heads=4, context=50))


@dataclass
class XYSingleConfig:
    """`model.xy_single` of a config: the semantic branch and the distillation target."""

    semantic: SEANetConfig = field(default_factory=_semantic_default)  # same total stride as model.seanet
    teacher_dim: int = 768  # channels of the teacher's features (HuBERT/WavLM base: 768, large: 1024)

    def __post_init__(self) -> None:
        if self.teacher_dim < 1:
            raise ValueError(f"teacher_dim must be >= 1, got {self.teacher_dim}")


class XYEncoder(StreamingContainer):
    """Semantic + acoustic branches fused into one latent. `forward` gives the fused latent; `branches`
    also returns the semantic branch's output (training uses it for distillation)."""

    def __init__(self, acoustic: SEANetConfig, semantic: SEANetConfig, sample_rate: int) -> None:
        super().__init__()
        self.counter = SampleCounter()  # Codec.encode_flush reads how far into a frame each session is
        self.semantic = SEANetEncoder(semantic, sample_rate)
        self.acoustic = SEANetEncoder(acoustic, sample_rate)
        self.fuse = StreamingConv1d(semantic.dimension + acoustic.dimension, acoustic.dimension, 1, norm=acoustic.norm)
        nn.init.zeros_(self.fuse.conv.bias)  # as SEANetEncoder: no input-independent offset in the latent
        # BatchNorm of the fused latent. FSQ/LFQ round a projection of the latent on a FIXED grid. A fresh
        # encoder's speech-dependent spread is ~1e-2, and the first optimiser steps move its conv biases by
        # ~1e-3 each, so within 5 steps an input-independent offset dominated the latent and every frame fell
        # into 3-7 of the 8192 cells (with a per-frame LayerNorm too, and with LFQ). Batch statistics remove
        # that per-channel offset and keep unit spread while training. At inference it is a fixed per-channel
        # affine map (running statistics): nothing is normalised over time, so streaming == offline holds.
        # Still needed with LFQ's decorrelation term, which also penalises offsets: without the BatchNorm a
        # probe run collapsed to one code at step ~110.
        self.norm = nn.BatchNorm1d(acoustic.dimension)

    def branches(self, wav: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        wav = self.counter(wav)
        semantic = self.semantic(wav)
        latent = self.fuse(torch.cat([semantic, self.acoustic(wav)], dim=1))
        return self.norm(latent), semantic

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return self.branches(wav)[0]


class XYSingleCodec(Codec):
    """Semantic + acoustic encoders -> one codebook -> causal SEANet decoder."""

    uses_teacher = True

    def __init__(self, config: CodecConfig, sync_codebook: bool = False) -> None:
        StreamingContainer.__init__(self)
        self.config = config
        self.xy = xy = from_dict(XYSingleConfig, config.xy_single, "model.xy_single")
        check_branch_hop(xy.semantic, config.seanet, "model.xy_single.semantic")
        self.encoder = XYEncoder(config.seanet, xy.semantic, config.sample_rate)
        self.quantizer = Quantizer(config.seanet.dimension, config.quantizer, sync_codebook=sync_codebook)
        if self.quantizer.total_codebooks != 1:
            raise ConfigError(f"xy_single quantises into ONE codebook; quantizer kind {config.quantizer.kind!r} "
                              f"gives {self.quantizer.total_codebooks} (use fsq, vq or lfq)")
        self.decoder = SEANetDecoder(config.seanet)
        # Training only: maps the semantic branch to the teacher's feature space for the cosine loss.
        self.distill_proj = nn.Conv1d(xy.semantic.dimension, xy.teacher_dim, 1)
        self._num_codebooks = 1
        self.attach_stream_starts()

    @torch.no_grad()
    def warm_start_input(self, frames: int) -> torch.Tensor:
        """Audio for `checkpoint.warm_start_codebooks` (models built from a config alone): noise with a
        random gain per second. FSQ / LFQ have no codebook to initialise, so 100 frames do (9000+ frames of
        float64 encoding cost ~25 s). The latent's BatchNorm statistics are set from the same audio (a
        plain average over it), so that the codes of an untrained model are spread out too."""
        if self.config.quantizer.kind in ("fsq", "lfq"):
            frames = 100
        n = frames * self.frame_size
        noise = torch.randn(1, 1, n, dtype=torch.float64)
        gains = torch.rand(1, 1, n // self.sample_rate + 1, dtype=torch.float64)
        x = 0.1 * noise * gains.repeat_interleave(self.sample_rate, dim=-1)[..., :n]
        norm, was_training = self.encoder.norm, self.encoder.training
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average: after one pass, exactly this audio's statistics
        try:
            self.encoder.train()
            self.encoder(x.to(self.encoder_dtype))
        finally:
            norm.momentum = 0.1
            self.encoder.train(was_training)
        return x

    def prepare_for_training(self, teacher, training_files=None, seed: int = 0, fine_tuning: bool = False) -> None:
        """Called by the training module with the frozen teacher (see SemantiCodec.prepare_for_training): the
        teacher's width must match the distillation projection."""
        if teacher.dim != self.xy.teacher_dim:
            raise ConfigError(f"the teacher's features have {teacher.dim} channels but model.xy_single.teacher_dim is "
                              f"{self.xy.teacher_dim}: set --model.xy_single.teacher_dim {teacher.dim}")

    def info(self) -> dict:
        info = super().info()
        # The projection is not part of inference; do not count it as model size.
        info["parameters"] -= sum(p.numel() for p in self.distill_proj.parameters())
        return info

    def distill_cosine(self, semantic: torch.Tensor, teacher_features: torch.Tensor) -> torch.Tensor:
        """Cosine similarity per frame [B, T] between the projected semantic branch and teacher features."""
        if teacher_features.dim() != 3 or teacher_features.shape[1] != self.xy.teacher_dim:
            raise ValueError(f"teacher features must be [B, {self.xy.teacher_dim}, T] (model.xy_single.teacher_dim), "
                             f"got {tuple(teacher_features.shape)}")
        if teacher_features.shape[-1] != semantic.shape[-1]:
            raise ValueError(f"teacher features have {teacher_features.shape[-1]} frames, the codec {semantic.shape[-1]}")
        projected = self.distill_proj(semantic.float())
        return F.cosine_similarity(projected, teacher_features.to(projected.dtype), dim=1, eps=1e-6)

    def forward(self, wav: torch.Tensor, teacher_features: torch.Tensor | None = None) -> CodecOutput:
        """Training/validation pass; with teacher features [B, D_teacher, T] also the `distill` loss
        (1 - cosine, averaged over frames)."""
        if wav.shape[-1] % self.frame_size:
            raise ValueError(f"training input length {wav.shape[-1]} is not a multiple of the frame size {self.frame_size}")
        latent, semantic = self.encoder_offline(self.encoder.branches, wav)
        q = self.quantizer(latent)
        audio = self.decoder_offline(q.z_q)
        metrics, aux = dict(q.metrics), {}
        if teacher_features is not None:
            cosine = self.distill_cosine(semantic, teacher_features).mean()
            aux["distill"] = 1.0 - cosine
            metrics["distill_cosine"] = cosine.detach()
        return CodecOutput(audio=audio, codes=q.codes, latent=latent, quantizer_loss=q.loss, metrics=metrics,
                           aux_losses=aux)


# The family entry (pyproject.toml, entry point `neurocodec.families:xy_single`; see codecs/registry.py).
FAMILY = Family(name="xy_single", modality="audio", codec_class=XYSingleCodec)
