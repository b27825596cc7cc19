"""`semanticodec`: SemantiCodec-style semantic + acoustic tokens, causal and streamable like every codec.

Codes are one [B, K, T] tensor: row 0 is the **semantic token** (one of `clusters` k-means ids), rows
1..K-1 the **acoustic RVQ** codes (the existing `Quantizer` adapter), so token rate = K x frame rate:
configs `semanticodec_25tps` (12.5 Hz), `semanticodec_50tps` (25 Hz) and `semanticodec` (100 tokens/s,
50 Hz), each with 8192-entry semantic and acoustic codebooks: 26 bits x frame rate = 325 / 650 / 1300 bit/s
(the paper's 0.31-1.43 kbps range).

* **Semantic tokens** are k-means ids of a frozen teacher's features (HuBERT / WavLM / ...; the k-means is
  fitted by `neurocodec kmeans` and its centroids are loaded into the codec at training start and saved
  with its weights). They are training TARGETS only: a causal **student** (SEANet convolutions + a causal
  transformer with a bounded window, `encoder.semantic`) predicts them from audio through a linear classifier
  (`quantizer.head`, cross-entropy loss `semantic`). At inference the id is the student's argmax, so
  encoding is causal and needs no teacher.
* **Acoustic tokens**: a second causal SEANet encoder (`encoder.acoustic`) quantised by RVQ; trained
  through the decoder only, so its codes carry what the semantic tokens miss (speaker, pitch, channel).
* **Decoder**: a causal SEANet decoder reads embedding(semantic id) + acoustic RVQ vector, GAN-trained by
  the common training module. During training the decoder sees the student's PREDICTED ids (as at
  inference), so it never relies on information only the teacher has.

Why a causal GAN decoder instead of SemantiCodec's latent-diffusion decoder: diffusion decodes a whole
window of latent frames with tens of denoising passes and looks ahead (non-causal attention over the
window), so its first sample comes seconds after the audio and costs tens of network evaluations per
frame. The causal GAN decoder emits each frame's 20-80 ms of audio as soon as its codes arrive, in one
pass: one-frame algorithmic latency, streaming == offline, and the same serving path as the other families.

Streaming: `encoder` is one `StreamingContainer` (both encoders), `quantizer` a plain module (per-frame,
stateless), `decoder` a SEANet decoder, so `encode_step` / `encode_flush` / `decode_step`,
`reset_streaming` / `set_exec_mask` and `set_exact_encoding` (float64 encoders, classifier and code
search) are inherited from `Codec` unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, from_dict
from ..errors import UserError
from .model import Codec, CodecConfig, CodecOutput, check_branch_hop
from .quantizers import Quantizer, QuantizerConfig, codebook_metrics
from .registry import Family
from .seanet import BottleneckConfig, SEANetConfig, SEANetDecoder, SEANetEncoder
from .streaming import StreamingContainer


# k-means fitted at training start when no file is given (the defaults of `neurocodec kmeans`)
KMEANS_ITERS, KMEANS_BATCH, KMEANS_MAX_FRAMES = 300, 4096, 1_000_000


def _student_default() -> SEANetConfig:
    return SEANetConfig(channels=16, strides=[2, 4, 5, 8], dimension=256,
                        bottleneck=BottleneckConfig(kind="transformer", num_layers=2, num_heads=4, context=50))


@dataclass
class SemantiCodecOptions:
    """`model.semanticodec` of a config."""

    clusters: int = 8192  # semantic vocabulary: the k-means clusters (cardinality of code row 0)
    kmeans: str | None = None  # `neurocodec kmeans` output, loaded at training start (None: fitted then); saved with the weights
    teacher_dim: int = 768  # channels of the teacher layer the k-means was fitted on (HuBERT base: 768)
    semantic: SEANetConfig = field(default_factory=_student_default)  # the student; same total stride as model.seanet

    def __post_init__(self) -> None:
        if self.clusters < 2:
            raise ValueError(f"clusters must be >= 2, got {self.clusters}")
        if self.teacher_dim < 1:
            raise ValueError(f"teacher_dim must be >= 1, got {self.teacher_dim}")


@dataclass(frozen=True)
class SemanticLayout:
    """What `codec.quantizer.config` reports: row 0 semantic, then the acoustic quantizer's rows."""

    acoustic: QuantizerConfig
    kind: str = "semantic+rvq"


class SemanticAcousticQuantizer(nn.Module):
    """Latent [B, Ds + Da, T] -> codes [B, 1 + Q, T] and back, with the `Quantizer` adapter's interface.

    The first Ds channels are the student's features: the classifier `head` turns them into the semantic
    id. The rest is the acoustic latent, quantised by the RVQ adapter. `decode` gives the decoder's input:
    embedding(semantic id) + acoustic RVQ vector.
    """

    def __init__(self, semantic_dim: int, acoustic_dim: int, config: QuantizerConfig, clusters: int,
                 teacher_dim: int, sync_codebook: bool = False) -> None:
        super().__init__()
        self.semantic_dim = semantic_dim
        self.config = SemanticLayout(acoustic=config)
        self.head = nn.Linear(semantic_dim, clusters)  # per frame (a 1x1 conv that also takes 0 frames)
        self.embedding = nn.Embedding(clusters, acoustic_dim)
        self.acoustic = Quantizer(acoustic_dim, config, sync_codebook=sync_codebook)
        # k-means centroids of the teacher features: training targets = assign(features, centroids).
        self.register_buffer("centroids", torch.zeros(clusters, teacher_dim))

    @property
    def clusters(self) -> int:
        return self.embedding.num_embeddings

    @property
    def total_codebooks(self) -> int:
        return 1 + self.acoustic.total_codebooks

    @property
    def cardinalities(self) -> list[int]:
        return [self.clusters] + self.acoustic.cardinalities

    def allowed_num_codebooks(self) -> list[int]:
        return [1 + n for n in self.acoustic.allowed_num_codebooks()]

    def check_num_codebooks(self, n_q: int) -> None:
        from ..errors import CodesError

        if n_q not in self.allowed_num_codebooks():
            raise CodesError(f"semanticodec cannot use {n_q} codebooks; allowed: {self.allowed_num_codebooks()} "
                             f"(the semantic row plus 1..{self.acoustic.total_codebooks} acoustic rows)")

    def split(self, latent: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return latent[:, : self.semantic_dim], latent[:, self.semantic_dim:]

    def semantic_logits(self, semantic: torch.Tensor) -> torch.Tensor:
        return self.head(semantic.transpose(1, 2)).transpose(1, 2)  # [B, clusters, T]

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embedding(ids).transpose(1, 2)  # [B, T] -> [B, Da, T]

    @torch.no_grad()
    def initialize_codebooks(self, z: torch.Tensor, kmeans_iters: int | None = None) -> None:
        self.acoustic.initialize_codebooks(self.split(z)[1], kmeans_iters)

    @torch.no_grad()
    def encode(self, z: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        semantic, acoustic = self.split(z)
        ids = self.semantic_logits(semantic).argmax(1, keepdim=True)
        return torch.cat([ids, self.acoustic.encode(acoustic, None if n_q is None else n_q - 1)], dim=1)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_num_codebooks(codes.shape[1])
        acoustic = self.acoustic.decode(codes[:, 1:])
        return self.embed(codes[:, 0]).to(acoustic.dtype) + acoustic


class SemanticAcousticEncoder(StreamingContainer):
    """The causal student (semantic) and acoustic encoders side by side: [B, 1, N] -> [B, Ds + Da, N / hop]."""

    def __init__(self, semantic: SEANetConfig, acoustic: SEANetConfig, sample_rate: int) -> None:
        super().__init__()
        self.semantic = SEANetEncoder(semantic, sample_rate)
        self.acoustic = SEANetEncoder(acoustic, sample_rate)

    @property
    def counter(self):
        return self.acoustic.counter  # Codec.encode_flush reads how far into a frame each session is

    def forward(self, wav: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.semantic(wav), self.acoustic(wav)], dim=1)


class SemantiCodec(Codec):
    """Semantic tokens predicted by a causal student + acoustic RVQ tokens -> causal SEANet decoder."""

    uses_teacher = True

    def __init__(self, config: CodecConfig, sync_codebook: bool = False) -> None:
        StreamingContainer.__init__(self)
        self.config = config
        self.options = opts = from_dict(SemantiCodecOptions, config.semanticodec, "model.semanticodec")
        check_branch_hop(opts.semantic, config.seanet, "model.semanticodec.semantic")
        self.encoder = SemanticAcousticEncoder(opts.semantic, config.seanet, config.sample_rate)
        self.quantizer = SemanticAcousticQuantizer(opts.semantic.dimension, config.seanet.dimension, config.quantizer,
                                                   opts.clusters, opts.teacher_dim, sync_codebook=sync_codebook)
        self.decoder = SEANetDecoder(config.seanet)
        self._num_codebooks = self.quantizer.total_codebooks
        self.attach_stream_starts()

    # -- training ---------------------------------------------------------------------------------
    def prepare_for_training(self, teacher, training_files=None, seed: int = 0, fine_tuning: bool = False) -> None:
        """Called by the training module with the frozen teacher: load the k-means centroids (checked against the
        teacher, layer, frame rate and this model's sizes) into the codec. Without `model.semanticodec.kmeans`
        they are fitted first on `training_files()` (the run's training utterances; None where a run cannot fit
        them, as under DDP, where each process would fit its own).
        When fine-tuning (`--init_from`), the codec keeps the centroids it was loaded with: its classifier and
        decoder learnt those cluster ids."""
        from .kmeans import load_kmeans

        opts = self.options
        if teacher.dim != opts.teacher_dim:
            raise ConfigError(f"the teacher gives {teacher.dim}-d features; model.semanticodec.teacher_dim is "
                              f"{opts.teacher_dim}: they must agree")
        if fine_tuning:
            return
        if not opts.kmeans:
            with torch.no_grad():
                self.quantizer.centroids.copy_(self._fit_kmeans(teacher, training_files, seed))
            return
        try:
            centroids, meta = load_kmeans(opts.kmeans)
        except UserError as err:
            raise ConfigError(f"model.semanticodec.kmeans: {err}") from None
        where = f"model.semanticodec.kmeans {opts.kmeans}"
        if centroids.shape[0] != opts.clusters:
            raise ConfigError(f"{where} has {centroids.shape[0]} clusters; model.semanticodec.clusters is {opts.clusters}")
        if centroids.shape[1] != opts.teacher_dim:
            raise ConfigError(f"{where} holds {centroids.shape[1]}-d centroids; the teacher and "
                              f"model.semanticodec.teacher_dim give {opts.teacher_dim}-d features: they must agree")
        if meta.get("teacher") != teacher.config.describe() or int(meta.get("layer", -1)) != teacher.layer:
            raise ConfigError(f"{where} was fitted on teacher {meta.get('teacher')!r} layer {meta.get('layer')}, "
                              f"but training uses {teacher.config.describe()!r} layer {teacher.layer}")
        if abs(float(meta.get("frame_rate", 0)) - self.frame_rate) > 1e-6:
            raise ConfigError(f"{where} was fitted at {meta.get('frame_rate')} frames/s; this codec runs at "
                              f"{self.frame_rate:g} frames/s")
        with torch.no_grad():
            self.quantizer.centroids.copy_(centroids)

    def _fit_kmeans(self, teacher, training_files, seed: int) -> torch.Tensor:
        """K-means of the teacher's features over the training split, as `neurocodec kmeans` does with its
        defaults. Only for one process: DDP ranks would each fit their own (float rounding may differ)."""
        from .kmeans import fit_minibatch_kmeans, teacher_frames

        howto = ("fit the semantic k-means first: `neurocodec kmeans --teacher <this config> --manifest <train "
                 "manifest> -o km.safetensors`, then train with --model.semanticodec.kmeans km.safetensors")
        if training_files is None:
            raise ConfigError(f"model.semanticodec.kmeans is not set: {howto}")
        utterances = training_files()
        if not utterances:
            raise ConfigError("model.semanticodec.kmeans is not set and the training manifest has no training files")
        print(f"model.semanticodec.kmeans is not set: fitting {self.options.clusters} clusters on the teacher's "
              f"features of {len(utterances)} training file(s) (saved with the codec's weights; to reuse them, {howto})")
        frames = teacher_frames(teacher, utterances, self.frame_rate, max_frames=KMEANS_MAX_FRAMES, seed=seed)
        return fit_minibatch_kmeans(frames, self.options.clusters, KMEANS_ITERS, KMEANS_BATCH, seed=seed)

    def semantic_targets(self, teacher_features: torch.Tensor) -> torch.Tensor:
        """K-means ids [B, T] of teacher features [B, D, T] (the assignment `neurocodec kmeans` uses)."""
        from .kmeans import assign

        if teacher_features.dim() != 3 or teacher_features.shape[1] != self.options.teacher_dim:
            raise ValueError(f"teacher features must be [B, {self.options.teacher_dim}, T] "
                             f"(model.semanticodec.teacher_dim), got {tuple(teacher_features.shape)}")
        return assign(teacher_features, self.quantizer.centroids)

    def forward(self, wav: torch.Tensor, teacher_features: torch.Tensor | None = None) -> CodecOutput:
        """Training/validation pass; with teacher features [B, D_teacher, T] also the `semantic` loss
        (cross-entropy of the student's prediction against the k-means ids)."""
        if wav.shape[-1] % self.frame_size:
            raise ValueError(f"training input length {wav.shape[-1]} is not a multiple of the frame size {self.frame_size}")
        latent = self.encoder_offline(self.encoder, wav)
        semantic, acoustic = self.quantizer.split(latent)
        logits = self.quantizer.semantic_logits(semantic)
        ids = logits.argmax(1)  # the decoder sees what inference will give it
        q = self.quantizer.acoustic(acoustic)
        audio = self.decoder_offline(self.quantizer.embed(ids).to(q.z_q.dtype) + q.z_q)
        codes = torch.cat([ids.unsqueeze(1), q.codes], dim=1)
        metrics = codebook_metrics(codes.detach(), self.quantizer.cardinalities)
        aux = {}
        if teacher_features is not None:
            targets = self.semantic_targets(teacher_features)
            if targets.shape[-1] != ids.shape[-1]:
                raise ValueError(f"teacher features have {targets.shape[-1]} frames, the codec {ids.shape[-1]}")
            aux["semantic"] = F.cross_entropy(logits.float(), targets)
            metrics["semantic_accuracy"] = (ids == targets).float().mean().detach()
        return CodecOutput(audio=audio, codes=codes, latent=latent, quantizer_loss=q.loss, metrics=metrics,
                           aux_losses=aux)

    # -- models built from a config alone -----------------------------------------------------------
    def warm_start_input(self, frames: int) -> torch.Tensor:
        """Audio for `checkpoint.warm_start_codebooks`: enough frames for the ACOUSTIC codebooks (the
        semantic row has no codebook to initialise; sizing by its 8192 ids would only cost time)."""
        frames = int(1.1 * max(self.quantizer.acoustic.cardinalities)) + 1
        n = frames * self.frame_size
        noise = torch.randn(1, 1, n, dtype=torch.float64)
        gains = torch.rand(1, 1, n // self.sample_rate + 1, dtype=torch.float64)
        return 0.1 * noise * gains.repeat_interleave(self.sample_rate, dim=-1)[..., :n]

    def info(self) -> dict:
        info = super().info()
        info["semantic_clusters"] = self.quantizer.clusters
        info["tokens_per_second"] = self.num_codebooks * self.frame_rate
        return info


# The family entry (pyproject.toml, entry point `neurocodec.families:semanticodec`; see codecs/registry.py).
FAMILY = Family(name="semanticodec", modality="audio", codec_class=SemantiCodec)
