"""Exponential moving average of the generator's weights (validation and export use the average).

Only parameters are averaged. Buffers (EMA codebooks of the quantizer, cluster sizes, FSQ constants)
are copied from the live model when the averaged codec is materialised: averaging codebook vectors
across dead-code replacements would mix unrelated codes. The shadow weights are buffers of this
module, so they are saved in and restored from Lightning checkpoints with the rest of the state.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class WeightEMA(nn.Module):
    """`live_prefixes`: parameters whose names start with one of these are copied from the live model at
    every update instead of averaged (see CodecTrainingModule: the encoder must match the live codebooks)."""

    def __init__(self, model: nn.Module, decay: float, live_prefixes: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.decay = float(decay)
        self._names = [name for name, _ in model.named_parameters()]
        self._live = [i for i, name in enumerate(self._names) if name.startswith(tuple(live_prefixes))]
        for i, (_, p) in enumerate(model.named_parameters()):
            self.register_buffer(f"p{i}", p.detach().clone().float())

    def _shadows(self) -> list[torch.Tensor]:
        return [getattr(self, f"p{i}") for i in range(len(self._names))]

    @torch.no_grad()
    def update(self, model: nn.Module, copy_only: bool = False) -> None:
        params = [p.detach().float() for p in model.parameters()]
        shadows = self._shadows()
        if copy_only or self.decay <= 0:
            torch._foreach_copy_(shadows, params)
        else:
            torch._foreach_lerp_(shadows, params, 1.0 - self.decay)
            if self._live:
                torch._foreach_copy_([shadows[i] for i in self._live], [params[i] for i in self._live])

    @torch.no_grad()
    def copy_to(self, target: nn.Module, source: nn.Module) -> nn.Module:
        """Load averaged parameters and `source`'s current buffers into `target` (same architecture)."""
        for p, s in zip(target.parameters(), self._shadows()):
            p.copy_(s.to(p.dtype))
        for b, sb in zip(target.buffers(), source.buffers()):
            b.copy_(sb)
        return target

    def averaged(self, source: nn.Module) -> nn.Module:
        """A detached copy of `source` carrying the averaged weights, in eval mode."""
        model = copy.deepcopy(source)
        return self.copy_to(model, source).eval().requires_grad_(False)
