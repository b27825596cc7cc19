"""One thin adapter over `vector-quantize-pytorch` for every quantizer family we train.

The library does the quantizing (codebooks, EMA updates, k-means init, dead-code expiry, FSQ/LFQ
rounding, DDP codebook sync); this module only normalises what goes in and comes out:

* latents in and out are channel-first `[B, D, T]`;
* codes are `[B, K, T]` int64, one row per codebook, with a fixed order (below);
* `n_q` truncation to the first codebooks where the family allows it;
* usage metrics per codebook (the library reports none).

Code order (the `K` axis):
  rvq / rfsq   residual layer 0, 1, ..., Q-1 (coarse to fine)
  grvq         layer-major, then group: [L0G0, L0G1, ..., L0G(G-1), L1G0, ...]. This is HiFi-Codec's order
               (AcademiCodec `Quantizer`), and it makes truncation keep whole residual layers:
               n_q must be a multiple of `groups`.
  fsq/vq/lfq   one codebook (K = 1)

DDP: the library decides at construction whether EMA codebook statistics are all-reduced
(`sync_codebook`); Lightning builds the model before it starts the process group, so the caller must
say so explicitly (`sync_codebook=True` when training on more than one process).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from ..errors import CodesError
from .lfq_balance import CodeBalance, decorrelation_loss, fit_balanced_thresholds, lfq_bit_weights, lfq_entries
from vector_quantize_pytorch import FSQ, LFQ, GroupedResidualVQ, ResidualFSQ, ResidualVQ, VectorQuantize

KINDS = ("rvq", "grvq", "fsq", "rfsq", "vq", "lfq")


@dataclass
class QuantizerConfig:
    kind: str = "grvq"
    codebook_size: int = 1024  # rvq / grvq / vq / lfq (lfq: a power of two)
    num_quantizers: int = 1  # residual layers (rvq, grvq, rfsq)
    groups: int = 1  # grvq
    levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])  # fsq / rfsq
    codebook_dim: int | None = None  # vq: low-dimensional lookup (factorised codes)
    use_cosine_sim: bool = False
    decay: float = 0.99  # EMA decay of codebooks (the library's default 0.8 is too fast for audio)
    kmeans_init: bool = True
    kmeans_iters: int = 50
    threshold_ema_dead_code: float = 2.0  # expire codes whose EMA count falls below this
    commitment_weight: float = 1.0
    quantize_dropout: bool = False  # train with a random number of residual layers (variable bitrate)
    entropy_loss_weight: float = 0.1  # lfq: the library's per-sample / batch entropy term
    decorrelation_weight: float = 0.0  # fsq / lfq: independence of the grid axes over a batch (decorrelation_loss)
    code_balance_weight: float = 0.0  # lfq: flatten the code distribution seen over many batches (CodeBalance)
    code_balance_decay: float = 0.99  # lfq: EMA decay of that distribution (0.99: about the last 100 batches)
    # lfq: keep per-prefix bit thresholds (`fit_balanced_thresholds`) that a training stage with
    # `balance_code_frames` fits on the frozen encoder's latents; until then they are 0, i.e. the plain signs.
    balanced_thresholds: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"quantizer kind {self.kind!r} is not one of {', '.join(KINDS)}")
        if self.kind == "grvq" and self.groups < 1:
            raise ValueError("grvq needs groups >= 1")
        if self.decorrelation_weight < 0:
            raise ValueError(f"decorrelation_weight must be >= 0, got {self.decorrelation_weight}")
        if self.decorrelation_weight > 0 and self.kind not in ("fsq", "lfq"):
            raise ValueError(f"decorrelation_weight applies to fsq and lfq only, not {self.kind}")
        if self.code_balance_weight < 0:
            raise ValueError(f"code_balance_weight must be >= 0, got {self.code_balance_weight}")
        if self.code_balance_weight > 0 and self.kind != "lfq":
            raise ValueError(f"code_balance_weight applies to lfq only, not {self.kind}")
        if not 0.0 < self.code_balance_decay < 1.0:
            raise ValueError(f"code_balance_decay must be in (0, 1), got {self.code_balance_decay}")
        if self.balanced_thresholds and self.kind != "lfq":
            raise ValueError(f"balanced_thresholds applies to lfq only, not {self.kind}")
        if self.kind == "lfq" and (self.codebook_size & (self.codebook_size - 1)):
            raise ValueError(f"lfq codebook_size must be a power of two, got {self.codebook_size}")


@dataclass
class QuantizedResult:
    z_q: torch.Tensor  # [B, D, T] quantized latent (straight-through in training)
    codes: torch.Tensor  # [B, K, T] int64 (-1 where quantizer dropout skipped a layer)
    loss: torch.Tensor  # scalar: commitment / entropy losses, already weighted by the library
    metrics: dict[str, torch.Tensor]


def codebook_metrics(codes: torch.Tensor, cardinalities: list[int]) -> dict[str, torch.Tensor]:
    """Usage, perplexity and dead fraction of each codebook over `codes` [B, K, T] (-1 entries ignored)."""
    metrics: dict[str, torch.Tensor] = {}
    for k, card in enumerate(cardinalities):
        counts = codebook_histogram(codes[:, k], card)
        for name, value in usage_from_histogram(counts).items():
            metrics[f"codebook{k}/{name}"] = value
    return metrics


def codebook_histogram(codes: torch.Tensor, cardinality: int) -> torch.Tensor:
    flat = codes.reshape(-1)
    flat = flat[flat >= 0]
    return torch.bincount(flat, minlength=cardinality)[:cardinality].double()


def usage_from_histogram(counts: torch.Tensor) -> dict[str, torch.Tensor]:
    """`usage`: fraction of entries seen at least once; `dead` = 1 - usage; `perplexity`: exp(entropy)."""
    total = counts.sum()
    used = (counts > 0).double().mean()
    if total > 0:
        p = counts[counts > 0] / total
        perplexity = torch.exp(-(p * p.log()).sum())
    else:
        perplexity = torch.tensor(0.0, dtype=torch.float64)
    return {"usage": used, "dead": 1.0 - used, "perplexity": perplexity}


def uniform_usage(codes, entries: int):
    """Expected share of `entries` used at least once by `codes` codes (a number or an array) drawn uniformly:
    what usage can reach on a set of that size, 1 - (1 - 1/K)^n (about 1 - e^(-n/K))."""
    return 1.0 - (1.0 - 1.0 / entries) ** codes


class CodebookUsage:
    """Accumulates code histograms over many batches (a validation set) and reports usage metrics."""

    def __init__(self, cardinalities: list[int]) -> None:
        self.cardinalities = list(cardinalities)
        self.counts = [torch.zeros(c, dtype=torch.float64) for c in self.cardinalities]

    def update(self, codes: torch.Tensor) -> None:
        for k in range(min(codes.shape[1], len(self.cardinalities))):
            self.counts[k] += codebook_histogram(codes[:, k].cpu(), self.cardinalities[k])

    def compute(self) -> dict[str, torch.Tensor]:
        metrics = {}
        for k, counts in enumerate(self.counts):
            for name, value in usage_from_histogram(counts).items():
                metrics[f"codebook{k}/{name}"] = value
        return metrics


def _search_terms(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codebook [C, d], squared norms [C], penalty [C]) of one VQ layer for nearest-code search.

    The penalty is +inf on every entry that repeats an earlier one exactly, 0 elsewhere. The terms are
    cached on the layer itself and recomputed when its codebook changes (in-place version or storage).
    """
    codebook = layer._codebook.embed[0]  # a view of the stored codebook
    stamp = (codebook.data_ptr(), codebook._version, codebook.dtype)
    cached = getattr(layer, "_neurocodec_search", None)
    if cached is None or cached[0] != stamp:
        _, inverse = torch.unique(codebook, dim=0, return_inverse=True)
        positions = torch.arange(codebook.shape[0], device=codebook.device)
        first = torch.full((int(inverse.max()) + 1,), codebook.shape[0], dtype=torch.long, device=codebook.device)
        first = first.scatter_reduce(0, inverse, positions, reduce="amin")
        penalty = torch.zeros(codebook.shape[0], dtype=codebook.dtype, device=codebook.device)
        penalty[first[inverse] != positions] = float("inf")
        cached = (stamp, codebook.pow(2).sum(-1), penalty)
        layer._neurocodec_search = cached
    return codebook, cached[1], cached[2]


def _input_to_weight_dtype(module: nn.Module, args: tuple) -> tuple:
    return (args[0].to(module.weight.dtype), *args[1:])


class Quantizer(nn.Module):
    """The adapter. Build with `Quantizer(dim, QuantizerConfig(...), sync_codebook=...)`."""

    def __init__(self, dim: int, config: QuantizerConfig, sync_codebook: bool = False) -> None:
        super().__init__()
        self.dim = dim
        self.config = c = config
        ema = dict(decay=c.decay, kmeans_init=c.kmeans_init, kmeans_iters=c.kmeans_iters,
                   threshold_ema_dead_code=c.threshold_ema_dead_code, commitment_weight=c.commitment_weight,
                   use_cosine_sim=c.use_cosine_sim, sync_codebook=sync_codebook,
                   # plain straight-through estimator, as HiFi-Codec / Encodec train (library default: rotation trick)
                   rotation_trick=False)
        if c.kind == "rvq":
            self.impl = ResidualVQ(dim=dim, num_quantizers=c.num_quantizers, codebook_size=c.codebook_size,
                                   quantize_dropout=c.quantize_dropout, **ema)
        elif c.kind == "grvq":
            if dim % c.groups:
                raise ValueError(f"grvq: latent dim {dim} is not divisible by {c.groups} groups")
            self.impl = GroupedResidualVQ(dim=dim, groups=c.groups, num_quantizers=c.num_quantizers,
                                          codebook_size=c.codebook_size, quantize_dropout=c.quantize_dropout, **ema)
        elif c.kind == "fsq":
            self.impl = FSQ(levels=list(c.levels), dim=dim)
        elif c.kind == "rfsq":
            self.impl = ResidualFSQ(levels=list(c.levels), num_quantizers=c.num_quantizers, dim=dim,
                                    quantize_dropout=c.quantize_dropout)
        elif c.kind == "vq":
            self.impl = VectorQuantize(dim=dim, codebook_size=c.codebook_size, codebook_dim=c.codebook_dim, **ema)
        elif c.kind == "lfq":
            self.impl = LFQ(dim=dim, codebook_size=c.codebook_size, entropy_loss_weight=c.entropy_loss_weight)
            if getattr(self.impl, "orthogonal_rotation", False):  # a library default we rely on (see encode)
                raise RuntimeError("vector-quantize-pytorch's LFQ rotates latents here; encode() reads entries from "
                                   "unrotated signs")
            if c.code_balance_weight > 0:
                self.code_balance = CodeBalance(self.impl.codebook, c.code_balance_decay)
            if c.balanced_thresholds:
                # heap order: node (2^i - 1 + prefix) holds bit i's threshold for the bits `prefix` before it
                self.register_buffer("thresholds", torch.zeros(c.codebook_size - 1))
                self.register_buffer("thresholds_fitted", torch.zeros((), dtype=torch.bool))
        if c.kind in ("fsq", "lfq") and isinstance(getattr(self.impl, "project_out", None), nn.Linear):
            # The library builds grid values in float32 when decoding indices; under exact (float64) encoding
            # project_out's weights are float64, so its input is brought to their dtype.
            self.impl.project_out.register_forward_pre_hook(_input_to_weight_dtype)

    # -- shape of the code space ------------------------------------------------------------------
    @property
    def total_codebooks(self) -> int:
        c = self.config
        return {"rvq": c.num_quantizers, "grvq": c.num_quantizers * c.groups, "rfsq": c.num_quantizers}.get(c.kind, 1)

    @property
    def cardinalities(self) -> list[int]:
        c = self.config
        if c.kind in ("fsq", "rfsq"):
            per = math.prod(c.levels)
        else:
            per = c.codebook_size
        return [per] * self.total_codebooks

    def allowed_num_codebooks(self) -> list[int]:
        c = self.config
        if c.kind in ("rvq", "rfsq"):
            return list(range(1, c.num_quantizers + 1))
        if c.kind == "grvq":
            return [c.groups * n for n in range(1, c.num_quantizers + 1)]
        return [1]

    def check_num_codebooks(self, n_q: int) -> None:
        allowed = self.allowed_num_codebooks()
        if n_q not in allowed:
            raise CodesError(f"{self.config.kind} quantizer cannot use {n_q} codebooks; allowed: {allowed}")

    # -- forward (training) -----------------------------------------------------------------------
    def forward(self, z: torch.Tensor) -> QuantizedResult:
        """Quantize `z` [B, D, T]. In training mode codebooks update and quantizer dropout applies."""
        x = z.transpose(1, 2)  # the library is channel-last
        kind = self.config.kind
        loss = z.new_zeros(())
        if kind in ("rvq", "vq"):
            z_q, idx, commit = self.impl(x)
            loss = commit.sum()
            codes = idx.unsqueeze(1) if kind == "vq" else idx.transpose(1, 2)
        elif kind == "grvq":
            z_q, idx, commit = self.impl(x)  # idx: [G, B, T, Q]
            loss = commit.sum()
            codes = self._grvq_codes(idx)
        elif kind == "fsq":
            z_q, idx = self.impl(x)
            codes = idx.unsqueeze(1)
        elif kind == "rfsq":
            z_q, idx = self.impl(x)
            codes = idx.transpose(1, 2)
        elif self.has_fitted_thresholds:
            return self._thresholded_forward(x)
        else:  # lfq
            z_q, idx, aux = self.impl(x)
            loss = aux
            codes = idx.unsqueeze(1)
        codes = codes.long()
        metrics = codebook_metrics(codes.detach(), self.cardinalities)
        if self.training and (self.config.decorrelation_weight > 0 or self.config.code_balance_weight > 0):
            # The grid axes the library rounds (its project_in is a Linear or the identity).
            axes = self.impl.project_in(x)
            if self.config.decorrelation_weight > 0:
                decorrelation = decorrelation_loss(axes)
                loss = loss + self.config.decorrelation_weight * decorrelation
                metrics["decorrelation"] = decorrelation.detach()
            if self.config.code_balance_weight > 0:
                balance = self.code_balance(axes.reshape(-1, axes.shape[-1]), codes.detach())
                loss = loss + self.config.code_balance_weight * balance
                metrics["code_balance"] = balance.detach()
        return QuantizedResult(z_q=z_q.transpose(1, 2), codes=codes, loss=loss, metrics=metrics)

    @property
    def has_fitted_thresholds(self) -> bool:
        return hasattr(self, "thresholds_fitted") and bool(self.thresholds_fitted)

    def _thresholded_forward(self, x: torch.Tensor) -> QuantizedResult:
        """LFQ with fitted per-prefix thresholds (channel-last `x`). The grid values are the library's
        (+-codebook_scale per axis, as `decode` rebuilds them), with a straight-through gradient. No
        quantizer loss: the thresholds are fitted for a frozen tokenizer (the stage check asks for it), where
        the library's entropy term and ours would move nothing."""
        axes = self.impl.project_in(x)
        idx = lfq_entries(axes, self.thresholds.to(axes.dtype))
        bits = (idx[..., None] & lfq_bit_weights(axes.shape[-1]).to(idx.device)) > 0
        grid = torch.where(bits, 1.0, -1.0).to(axes.dtype) * self.impl.codebook_scale
        z_q = self.impl.project_out(axes + (grid - axes).detach())
        codes = idx.unsqueeze(1)
        return QuantizedResult(z_q=z_q.transpose(1, 2), codes=codes, loss=x.new_zeros(()),
                               metrics=codebook_metrics(codes, self.cardinalities))

    @torch.no_grad()
    def fit_thresholds(self, z: torch.Tensor) -> None:
        """Fit the per-prefix thresholds on latents `z` [N, D] (frames of the frozen encoder), so that these
        frames spread evenly over the 2^bits entries; from then on forward and encode use them."""
        if not hasattr(self, "thresholds"):
            raise RuntimeError("this quantizer keeps no thresholds (model.quantizer.balanced_thresholds: true, lfq)")
        weight = getattr(self.impl.project_in, "weight", None)  # project_in is the identity when dim == bits
        axes = self.impl.project_in(z if weight is None else z.to(weight.dtype))
        self.thresholds.copy_(fit_balanced_thresholds(axes))
        self.thresholds_fitted.fill_(True)

    @torch.no_grad()
    def initialize_codebooks(self, z: torch.Tensor, kmeans_iters: int | None = None) -> None:
        """One training-mode pass over latents `z` with every layer active (no quantizer dropout), so that
        k-means (with `kmeans_iters` iterations if given) initialises every codebook. Used for models
        built from a config alone."""
        residuals = [m for m in self.impl.modules() if hasattr(m, "quantize_dropout")]
        saved = [m.quantize_dropout for m in residuals]
        for m in residuals:
            m.quantize_dropout = False
        if kmeans_iters is not None:
            for m in self.impl.modules():
                if hasattr(m, "kmeans_iters"):
                    m.kmeans_iters = kmeans_iters
        was_training = self.training
        try:
            self.train()
            self.forward(z)
        finally:
            for m, value in zip(residuals, saved):
                m.quantize_dropout = value
            for m in self.impl.modules():
                if hasattr(m, "kmeans_iters"):
                    m.kmeans_iters = self.config.kmeans_iters
            self.train(was_training)

    # -- inference ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, z: torch.Tensor, n_q: int | None = None) -> torch.Tensor:
        """Codes [B, K, T] for latents [B, D, T], with no codebook update and no dropout."""
        kind = self.config.kind
        if kind in ("rvq", "grvq", "vq") and not self.config.use_cosine_sim:
            codes = self._nearest_code_encode(z, n_q)
        elif kind == "lfq":
            # LFQ's entry is the sign pattern of the projected latent. Read directly, inference skips the
            # library forward's entropy losses (and our code-balance update, which runs when this module is in
            # training mode). Signs survive the library's optional soft clamp and l2norm; a rotation would not,
            # and none is built (checked at construction).
            axes = self.impl.project_in(z.transpose(1, 2))
            thresholds = self.thresholds.to(axes.dtype) if self.has_fitted_thresholds else None
            codes = lfq_entries(axes, thresholds).unsqueeze(1)
        else:
            was_training = self.impl.training
            self.impl.eval()
            try:
                codes = self.forward(z).codes
            finally:
                self.impl.train(was_training)
        return codes if n_q is None else codes[:, :n_q]

    def _nearest_code_encode(self, z: torch.Tensor, n_q: int | None) -> torch.Tensor:
        """Greedy (residual) nearest-neighbour search on the library's codebooks (inference only).

        Why not the library's forward: (1) it is a training path with milliseconds of Python overhead per
        call, which dominates frame-by-frame streaming; (2) codebooks trained with k-means init and
        dead-code expiry contain exact duplicate entries, and which of two tied entries wins then
        depends on float rounding, which differs between chunk shapes. Here duplicates are masked so
        the first copy always wins, which keeps streaming codes equal to offline codes.
        """
        c = self.config
        x = z.transpose(1, 2)  # [B, T, D]
        groups = self.impl.rvqs if c.kind == "grvq" else [self.impl]
        layers_needed = c.num_quantizers if n_q is None else -(-n_q // (c.groups if c.kind == "grvq" else 1))
        per_group = []
        for rvq, xg in zip(groups, x.chunk(len(groups), dim=-1)):
            residual = rvq.project_in(xg)
            indices = []
            layers = rvq.layers if hasattr(rvq, "layers") else [rvq]  # a single VectorQuantize is one layer
            for layer in layers[:layers_needed]:
                codebook, norms, penalty = _search_terms(layer)
                # argmin of |r - e|^2 = |r|^2 - 2 r.e + |e|^2; |r|^2 is the same for every entry
                idx = (norms + penalty - 2 * residual @ codebook.t()).argmin(-1)
                residual = residual - codebook[idx]
                indices.append(idx)
            per_group.append(torch.stack(indices, dim=-1))  # [B, T, q]
        if c.kind == "grvq":
            return self._grvq_codes(torch.stack(per_group))
        return per_group[0].transpose(1, 2)  # rvq [B, Q, T]; vq [B, 1, T]

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Latent [B, D, T] from codes [B, k, T]; k may be fewer than all codebooks (see code order)."""
        kind, c = self.config.kind, self.config
        self.check_num_codebooks(codes.shape[1])
        if kind == "grvq":
            b, k, t = codes.shape
            per_group = codes.view(b, k // c.groups, c.groups, t).permute(2, 0, 3, 1)  # [G, B, T, q]
            outs = [self._residual_decode(rvq, per_group[g]) for g, rvq in enumerate(self.impl.rvqs)]
            z = torch.cat(outs, dim=-1)
        elif kind in ("rvq", "rfsq"):
            z = self._residual_decode(self.impl, codes.transpose(1, 2))
        elif kind == "vq":
            z = self.impl.get_output_from_indices(codes[:, 0])
        else:  # fsq, lfq
            z = self.impl.indices_to_codes(codes[:, 0])
        return z.transpose(1, 2)

    @staticmethod
    def _residual_decode(residual: nn.Module, idx: torch.Tensor) -> torch.Tensor:
        """Sum the first q layers' code vectors (idx [B, T, q]); works for any q, unlike the library's
        helpers, which accept fewer layers only when the model was built with quantizer dropout."""
        q = idx.shape[-1]
        if isinstance(residual, ResidualFSQ):
            vectors = residual.codebooks[torch.arange(q, device=idx.device).view(1, 1, q), idx]  # [B, T, q, d]
            return residual.project_out((vectors * residual.scales[:q].view(1, 1, q, -1)).sum(dim=2))
        total = residual.layers[0]._codebook.embed[0][idx[..., 0]]
        for layer_index in range(1, q):
            total = total + residual.layers[layer_index]._codebook.embed[0][idx[..., layer_index]]
        return residual.project_out(total)

    def _grvq_codes(self, idx: torch.Tensor) -> torch.Tensor:
        g, b, t, q = idx.shape
        return idx.permute(1, 3, 0, 2).reshape(b, q * g, t)
