"""The LFQ code-balance machinery of the single-codebook family (xy_single): what pushes one large LFQ
codebook towards using all of its entries, beside the adapter in `quantizers.py`, which it plugs into.

* `decorrelation_loss`: centres the code axes and makes them pairwise uncorrelated (batch-sized statistics).
* `CodeBalance`: a window of entry frequencies over many batches, and a loss that moves each frame's bits
  towards the rarer of its neighbouring entries.
* `fit_balanced_thresholds` / `lfq_entries`: per-prefix bit thresholds, fitted once on a frozen encoder's
  frames, under which every entry gets the same share of them.

What they are for: docs/semantic.md; how they were arrived at, with the measurements: docs/semantic/lab_log.md.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def decorrelation_loss(values: torch.Tensor) -> torch.Tensor:
    """How far the d grid axes of an FSQ/LFQ code (`values` [N, d], N frames of a batch) are from centred and
    independent: on soft signs tanh(x / std) of the axes, each axis's squared correlations with the others
    (summed, then averaged over axes) plus the mean squared offset. 0 when centred and uncorrelated.

    Why: a batch-entropy term sees at most a batch's worth of distinct codes. An FSQ/LFQ code is a product of
    d axes, whose entropy is the sum of the axes' entropies when they are independent; centring and
    decorrelating d axes is well estimated from a few hundred frames (a d x d matrix), so this pushes towards
    the full product space however small the batch (the covariance term of VICReg, Bardes et al. 2022, on the
    code axes). Measurements: docs/semantic/lab_log.md, "The LFQ balance terms".
    """
    x = values.reshape(-1, values.shape[-1]).float()
    std = (x - x.mean(dim=0)).pow(2).mean(dim=0).add(1e-6).sqrt()
    # A soft sign of each axis (scale-free): what LFQ keeps of it is its sign.
    soft = torch.tanh(x / std)
    centred = soft - soft.mean(dim=0)
    standardised = centred / centred.pow(2).mean(dim=0).add(1e-6).sqrt()
    corr = standardised.t() @ standardised / x.shape[0]
    d = corr.shape[0]
    # Summed over the other axes, not averaged over all pairs: one duplicated pair among 78 must still cost
    # about 2/d (a CPU hour with the pair average ended with two of 13 bits equal on 99.9% of frames).
    off_diagonal = (corr - torch.diag_embed(torch.diagonal(corr))).pow(2).sum() / d
    offset = soft.mean(dim=0).pow(2).mean()
    return off_diagonal + offset


def lfq_bit_weights(bits: int) -> torch.Tensor:
    """Value of each sign bit in an LFQ entry number: vector-quantize-pytorch's LFQ numbers an entry by its
    sign bits, the first axis most significant (CodeBalance checks this against the library's codebook)."""
    return 2 ** torch.arange(bits - 1, -1, -1)


def lfq_entries(axes: torch.Tensor, thresholds: torch.Tensor | None = None) -> torch.Tensor:
    """The LFQ entry that each row of `axes` [..., bits] (the values LFQ takes the signs of) falls in: [...].

    With `thresholds` (from `fit_balanced_thresholds`) bit i is set when axis i exceeds the threshold of the
    bits before it (a node of a binary tree, heap order) instead of zero; all-zero thresholds give the signs.
    """
    if thresholds is None:
        return ((axes > 0).long() * lfq_bit_weights(axes.shape[-1]).to(axes.device)).sum(dim=-1)
    flat = axes.reshape(-1, axes.shape[-1])
    entry = torch.zeros(len(flat), dtype=torch.long, device=axes.device)
    for i in range(flat.shape[1]):
        node = (1 << i) - 1 + entry  # the node of prefix `entry` at depth i
        entry = entry * 2 + (flat[:, i] > thresholds[node]).long()
    return entry.reshape(axes.shape[:-1])


@torch.no_grad()
def fit_balanced_thresholds(axes: torch.Tensor) -> torch.Tensor:
    """Thresholds [2^bits - 1] under which every entry gets the same share of the frames `axes` [N, bits].

    Bit i's threshold is the median of axis i among the frames whose bits before i are the same (a k-d
    tree with one axis per level), so every bit splits each prefix's frames in half and the fitted frames
    spread evenly over the 2^bits entries, whatever the joint distribution of the axes. Prefixes with fewer
    than two frames keep threshold 0 (the plain sign).
    """
    if len(axes) < 2:
        raise ValueError(f"fitting code thresholds needs frames, got {len(axes)}")
    n, bits = axes.shape
    thresholds = axes.new_zeros(2 ** bits - 1)
    prefix = torch.zeros(n, dtype=torch.long, device=axes.device)
    for i in range(bits):
        nodes = 1 << i
        values = axes[:, i]
        by_value = torch.argsort(values)
        order = by_value[torch.argsort(prefix[by_value], stable=True)]  # grouped by prefix, sorted within
        ranked = values[order]
        counts = torch.bincount(prefix, minlength=nodes)
        starts = counts.cumsum(0) - counts
        # Halfway between the k-th and (k+1)-th smallest, k = (count - 1) // 2: never on a fitted frame's own
        # value, so a frame met again (streamed, with rounding of the last bit) keeps its bit.
        low = (starts + (counts - 1).clamp_min(0) // 2).clamp_max(n - 2)
        median = torch.where(counts > 1, (ranked[low] + ranked[low + 1]) / 2, torch.zeros_like(ranked[low]))
        thresholds[nodes - 1: 2 * nodes - 1] = median
        prefix = prefix * 2 + (values > median[prefix]).long()
    return thresholds


class CodeBalance(nn.Module):
    """Pushes an LFQ code towards using every entry equally, judged over many batches, not one.

    Why: the library's batch-entropy term and `decorrelation_loss` see one batch; pairwise independence of the
    bits still leaves higher-order dependences between them, and frames piling onto a few entries.

    Here `frequency` is an EMA, over batches, of how often each entry was chosen (hard codes, what usage
    measures), about the last 1 / (1 - decay) batches. Each frame's chosen entry has, for each bit, two
    neighbours: the entry with that bit set and the entry with it cleared (one of them is the chosen entry).
    The loss moves each bit's soft value sigmoid(2 x_i / std_i) towards whichever neighbour has been rarer
    in the window, in proportion to the difference of their log frequencies: the gradient of the window's
    cross-entropy sum_c p(c) log frequency(c) with the frame's other bits held at their chosen values. At a
    uniform `frequency` it is zero, so it stops pushing.

    The neighbours rather than the full soft distribution over all K entries: O(N d) instead of an N x K
    matrix, and no worse in usage (docs/semantic/lab_log.md, "The LFQ balance terms"). The std over the batch is
    detached, so the scale cannot be gamed. The value (logged) is the hard codes' cross-entropy with the window
    plus log K.
    """

    def __init__(self, codebook: torch.Tensor, decay: float) -> None:
        super().__init__()
        k, d = codebook.shape
        self.decay = decay
        # The library numbers an entry by its sign bits, the first axis most significant. The neighbour
        # arithmetic below relies on that: check it once rather than trust it.
        if not torch.equal(lfq_entries(codebook).cpu(), torch.arange(k)):
            raise RuntimeError("CodeBalance: the LFQ codebook does not number entries by their sign bits "
                               "(first axis most significant); vector-quantize-pytorch changed its layout")
        self.register_buffer("bit_weights", lfq_bit_weights(d), persistent=False)
        # persistent, so that resuming from a checkpoint keeps the window
        self.register_buffer("frequency", torch.full((k,), 1.0 / k))

    def forward(self, values: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """`values` [N, d]: the axes LFQ takes the sign of; `codes` [N]: the entries it chose."""
        x = values.float()
        codes = codes.reshape(-1)
        with torch.no_grad():
            counts = torch.bincount(codes, minlength=self.frequency.numel()).float()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts)  # every rank keeps the same window
            self.frequency.mul_(self.decay).add_(counts / counts.sum(), alpha=1.0 - self.decay)
            # a floor well under uniform: never-seen entries attract, but not without bound
            log_frequency = self.frequency.clamp_min(0.01 / self.frequency.numel()).log().float()
            # [N, d]: the chosen entry with bit i cleared, and how much rarer it is than with bit i set
            cleared = codes[:, None] - (codes[:, None] & self.bit_weights)
            pull = log_frequency[cleared + self.bit_weights] - log_frequency[cleared]
            hard = log_frequency[codes].mean() + math.log(self.frequency.numel())
        soft_bits = torch.sigmoid(2.0 * x / x.std(dim=0).detach().add(1e-6))
        surrogate = (soft_bits * pull).sum(dim=1).mean()
        return surrogate - surrogate.detach() + hard
