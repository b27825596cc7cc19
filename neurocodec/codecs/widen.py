"""Grow a trained SEANet codec wider (more `seanet.channels`) while it computes exactly what it computed.

Why: the default model's quality is held back by its width (8 channels; decoding the unquantised latent scores
only ~0.08 PESQ-WB above decoding the codes, days 19 and 28), and a wider network trained from scratch needs GPU
hours this project is seldom lent. Widening the trained network instead lets any training session, CPU ones
included, start the wider model from the shipped model's quality and spend its steps on the new capacity.

How (Net2WiderNet, Chen, Goodfellow and Shlens, ICLR 2016): every widened channel axis of width n -> m maps new
channel j to old channel j mod n. A layer's output channels are copied from their old channels (weights, biases,
per-channel parameters), so a copied channel carries exactly its original's values. A layer's input channels
that are copies share their original's weight between them: random fractions, positive and summing to 1 over the
copies of each weight entry, so the sum the layer computes is unchanged. Random rather than equal fractions give
the copies different outgoing weights, hence different gradients, so they do not stay twins through training.

What it covers: conv and transposed-conv layers (weight norm: the effective weight is moved, then re-split into
magnitude and direction), ELUSnake's per-channel parameters, and the LSTM bottleneck (its gate rows come in four
blocks of the hidden width; hidden and input axes both widen). The latent (`dimension`) and the quantizer keep
their sizes, so codes, bitrate and codebooks are the file's. A transformer bottleneck is not widened (its
LayerNorm over channels is not preserved by copying channels) and is refused.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def widened_channels(old: torch.nn.Module, new: torch.nn.Module) -> bool:
    """Whether `new` has more SEANet channels than `old` (that the rest matches, `widen_codec` checks layer by
    layer)."""
    old_seanet = getattr(getattr(old, "config", None), "seanet", None)
    new_seanet = getattr(getattr(new, "config", None), "seanet", None)
    return (old_seanet is not None and new_seanet is not None and new_seanet.channels > old_seanet.channels)


def widen_codec(old: nn.Module, new: nn.Module, seed: int = 0) -> None:
    """Copy `old`'s function into `new`, whose SEANet layers are as wide or wider (see the module docstring).
    Every parameter and buffer of `new` is set; a layer kind that cannot be widened exactly is refused."""
    gen = torch.Generator().manual_seed(seed)
    old_modules = dict(old.named_modules())
    done: set[str] = set()
    with torch.no_grad():
        for name, module in new.named_modules():
            if any(name.startswith(p + ".") for p in done):
                continue
            source = old_modules.get(name)
            if _kind(module) is not None and _kind(source) != _kind(module):
                raise UserError(f"cannot widen: the file's network has no {type(module).__name__} at {name} "
                                "(widen a network with the same layers; grow blocks in a separate run)")
            if isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
                transposed = isinstance(module, nn.ConvTranspose1d)
                out_axis, in_axis = (1, 0) if transposed else (0, 1)
                weight = _widen(source.weight, module.weight.shape, out_axes=[out_axis], in_axes=[in_axis], gen=gen)
                _set_weight(module, weight, source)
                if module.bias is not None:
                    module.bias.copy_(_widen(source.bias, module.bias.shape, out_axes=[0], in_axes=[], gen=gen))
                done.add(name)
            elif isinstance(module, nn.LSTM):
                _widen_lstm(source, module, gen)
                done.add(name)
            elif type(module).__name__ == "StreamingTransformer":
                raise UserError("widening a codec with a transformer bottleneck is not supported (its LayerNorm "
                                "over channels changes when channels are copied); widen without it")
        # Everything else with parameters or buffers: per-channel tensors (ELUSnake, StreamingConvTranspose1d's
        # bias, filters' constants) widen as outputs; same-shaped ones are copied.
        old_state = old.state_dict()
        covered = {k for k in new.state_dict() if any(k.startswith(p + ".") for p in done)}
        rest = {}
        for key, value in new.state_dict().items():
            if key in covered:
                continue
            if key not in old_state:
                raise UserError(f"cannot widen: {key} has no counterpart in the file's network")
            axes = [a for a in range(value.dim()) if value.shape[a] != old_state[key].shape[a]]
            rest[key] = _widen(old_state[key], value.shape, out_axes=axes, in_axes=[], gen=gen)
        new.load_state_dict(rest, strict=False)


def _kind(module: nn.Module | None) -> type | None:
    """The layer kind widening handles (weight norm's parametrized subclasses count as their base class)."""
    return next((k for k in (nn.ConvTranspose1d, nn.Conv1d, nn.LSTM) if isinstance(module, k)), None)


def _channel_map(old_width: int, new_width: int) -> torch.Tensor:
    if new_width < old_width:
        raise UserError(f"cannot widen a layer of {old_width} channels to {new_width}")
    return torch.arange(new_width) % old_width


def _widen(old: torch.Tensor, shape: torch.Size, out_axes: list[int], in_axes: list[int],
           gen: torch.Generator, blocks: int = 1) -> torch.Tensor:
    """`old` gathered to `shape`: output axes copy channels, input axes copy them and split each weight entry
    between the copies with random positive fractions summing to 1. `blocks` > 1: axis 0 holds that many
    blocks of channels (an LSTM's gates), each widened alike."""
    out = old.detach().clone()
    for axis in out_axes:
        if blocks > 1 and axis == 0:
            old_width, new_width = out.shape[0] // blocks, shape[0] // blocks
            index = torch.cat([b * old_width + _channel_map(old_width, new_width) for b in range(blocks)])
        else:
            index = _channel_map(out.shape[axis], shape[axis])
        out = out.index_select(axis, index.to(out.device))
    for axis in in_axes:
        old_width = out.shape[axis]
        index = _channel_map(old_width, shape[axis])
        out = out.index_select(axis, index.to(out.device))
        out = out * _split_fractions(out.shape, axis, index, old_width, gen).to(out)
    if tuple(out.shape) != tuple(shape):
        raise UserError(f"cannot widen a tensor of shape {tuple(old.shape)} to {tuple(shape)}")
    return out


def _split_fractions(shape: torch.Size, axis: int, index: torch.Tensor, old_width: int,
                     gen: torch.Generator) -> torch.Tensor:
    """Per entry, positive fractions that sum to 1 over the entries copied from the same old channel on `axis`.
    Drawn in [0.25, 0.75] before normalising, so no copy starts near zero and none carries all."""
    raw = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.5 + 0.25
    view = [1] * len(shape)
    view[axis] = -1
    groups = index.view(view).expand(shape)
    totals = torch.zeros(*[s if a != axis else old_width for a, s in enumerate(shape)], dtype=torch.float64)
    totals.scatter_add_(axis, groups, raw)
    return raw / totals.gather(axis, groups)


def _set_weight(module: nn.Module, weight: torch.Tensor, source: nn.Module) -> None:
    """Set a layer's effective weight. Under weight norm (w = g v / |v|) the magnitude g is the new weight's norm
    and the direction v keeps the norm that the source's v had grown to in training: Adam moves v by about the
    learning rate per entry whatever its size, so a v reset to |v| = g (3-5x smaller in the default model) makes
    the first steps of fine-tuning 3-5x larger in effect (they did: mel loss 0.21 -> 0.28 in one step)."""
    parametrized = lambda m: hasattr(m, "parametrizations") and "weight" in m.parametrizations  # noqa: E731
    if not parametrized(module):
        module.weight.copy_(weight)
        return
    dim = module.parametrizations.weight[0].dim
    magnitude = torch.norm_except_dim(weight, 2, dim)
    if parametrized(source):
        old_norm = torch.norm_except_dim(source.parametrizations.weight.original1, 2, dim)
        direction_norm = old_norm.index_select(dim, _channel_map(old_norm.shape[dim], weight.shape[dim]))
    else:  # weight norm folded away (an inference file): no trained |v| to keep
        direction_norm = magnitude
    module.parametrizations.weight.original0.copy_(magnitude)
    module.parametrizations.weight.original1.copy_(weight / magnitude.clamp_min(1e-12) * direction_norm)


def _widen_lstm(old: nn.LSTM, new: nn.LSTM, gen: torch.Generator) -> None:
    if old.num_layers != new.num_layers or old.bias != new.bias or old.batch_first != new.batch_first:
        raise UserError("cannot widen an LSTM into one with other layers or options")
    for layer in range(new.num_layers):
        for kind in ("ih", "hh"):
            name = f"weight_{kind}_l{layer}"
            target = getattr(new, name)
            target.copy_(_widen(getattr(old, name), target.shape, out_axes=[0], in_axes=[1], gen=gen, blocks=4))
            if new.bias:
                name = f"bias_{kind}_l{layer}"
                target = getattr(new, name)
                target.copy_(_widen(getattr(old, name), target.shape, out_axes=[0], in_axes=[], gen=gen, blocks=4))
