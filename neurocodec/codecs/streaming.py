"""Stateful streaming for every layer on the inference path.

The pattern (after Moshi's `StreamingModule`): each layer that needs memory of the past keeps an explicit
state object while a `streaming(batch_size)` context is open. Outside the context the same layer runs
offline on whole sequences; inside it, `forward` consumes the next chunk and returns the output that the
chunk completes. Offline and streaming outputs are identical by construction (causal, zero-padded layers)
and by test (tests/test_streaming_modules.py).

Batch items are independent sessions:
  * `reset_streaming(mask)` restarts the chosen items from silence;
  * `set_exec_mask(mask)` marks the items that really receive input this step. The step still runs on
    the whole batch (one batched call), but items whose mask is False keep their state untouched, and
    their outputs are to be ignored by the caller.

  * `select_sessions(slots)` steps only the chosen items: inside the block the module streams a compact
    batch whose item i is slot `slots[i]`, and on leaving it their new states are written back. Idle items
    cost nothing (a masked step still computes them), so a server sized for 64 sessions pays for the
    sessions that have input, not for 64.

Because masked items keep old state while active ones advance, all state tensors of a module must keep
the same shape from step to step. That holds whenever every step feeds whole frames (the server's case);
a masked step (or a selected one) whose chunk would change a buffer's length raises `StreamingShapeError`.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, fields, replace
from typing import Iterator

import torch
from torch import nn


class StreamingShapeError(RuntimeError):
    """A masked step was given a chunk that is not a whole number of frames."""


_TENSOR_FIELDS: dict[type, tuple[str, ...]] = {}


@dataclass
class StreamingState:
    """Base class for per-module state. Every tensor field has the batch in dimension 0."""

    exec_mask: torch.Tensor  # bool [B]: items that advance on the next step
    # exec_mask.all(), kept on the host: every streaming layer asks it on every step, and asking the tensor
    # costs an op per layer (a device sync on a GPU). Set together with exec_mask.
    all_execute: bool = field(default=True, kw_only=True)

    def tensor_fields(self) -> tuple[str, ...]:
        # Cached per class: a served step walks every module's fields twice, and `fields()` is slow. This
        # assumes a field is a tensor in every instance of its class (true of all states here; none is optional).
        names = _TENSOR_FIELDS.get(type(self))
        if names is None:
            names = tuple(f.name for f in fields(self) if f.name != "exec_mask" and isinstance(getattr(self, f.name), torch.Tensor))
            _TENSOR_FIELDS[type(self)] = names
        return names

    def reset_from(self, fresh: "StreamingState", mask: torch.Tensor) -> None:
        """Give the items in `mask` the values of `fresh` (a newly initialised state)."""
        for name in self.tensor_fields():
            old, new = getattr(self, name), getattr(fresh, name)
            if old.shape != new.shape:
                if not bool(mask.all()):
                    raise StreamingShapeError(
                        "only whole-frame positions can be reset per session; this state holds a partial frame "
                        "(reset all sessions, or feed whole frames)")
                setattr(self, name, new)
                continue
            chosen = mask.to(old.device).view(-1, *([1] * (old.dim() - 1)))
            setattr(self, name, torch.where(chosen, new, old))


def time_steps(x: torch.Tensor) -> int:
    """`x.shape[-1]` as a plain int. Under `torch.jit.trace` (served steps, ONNX export) a shape read is recorded as
    graph arithmetic on 0-dim tensors; those graphs are made for one step length (only the batch varies), so the
    length is recorded as a constant instead: ~250 fewer operations per traced step of the default encoder."""
    return int(x.shape[-1])


def _masked_update(old: torch.Tensor, new: torch.Tensor, state: StreamingState, what: str) -> torch.Tensor:
    """Take `new` for executing items (those of `state.exec_mask`) and keep `old` for the others."""
    if state.all_execute:
        return new
    if old.shape != new.shape:
        raise StreamingShapeError(
            f"{what}: a step with an execution mask must feed whole frames to every item "
            f"(state shape would change from {tuple(old.shape)} to {tuple(new.shape)})"
        )
    mask = state.exec_mask.view(-1, *([1] * (new.dim() - 1)))
    return torch.where(mask, new, old)


class StreamingModule(nn.Module):
    """A module that can hold a streaming state. Subclasses implement `_init_streaming_state`."""

    # Whether a whole-frame step (exported ONNX graphs, traced served steps) reads and writes this module's state;
    # False for bookkeeping that only the chunk-by-chunk path needs (see `step_state_fields`).
    in_frame_steps = True

    def __init__(self) -> None:
        super().__init__()
        self._streaming_state: StreamingState | None = None

    # -- subclass hooks -------------------------------------------------------------------------
    def _init_streaming_state(self, batch_size: int) -> StreamingState:
        raise NotImplementedError

    # -- state access ---------------------------------------------------------------------------
    @property
    def is_streaming(self) -> bool:
        return self._streaming_state is not None

    def _streaming_modules(self) -> Iterator["StreamingModule"]:
        for module in self.modules():
            if isinstance(module, StreamingModule):
                yield module

    def _start_streaming(self, batch_size: int) -> None:
        for module in self._streaming_modules():
            module._streaming_state = module._init_streaming_state(batch_size)

    def _stop_streaming(self) -> None:
        for module in self._streaming_modules():
            module._streaming_state = None

    @contextlib.contextmanager
    def streaming(self, batch_size: int) -> Iterator[None]:
        """Open a streaming context for `batch_size` independent sessions."""
        if self.is_streaming:
            raise RuntimeError(f"{type(self).__name__} is already streaming")
        self._start_streaming(batch_size)
        try:
            yield
        finally:
            self._stop_streaming()

    def reset_streaming(self, mask: torch.Tensor | None = None) -> None:
        """Restart the sessions in `mask` (all of them when None) from silence."""
        for module in self._streaming_modules():
            state = module._streaming_state
            if state is None:
                raise RuntimeError("reset_streaming() called outside a streaming context")
            m = torch.ones_like(state.exec_mask) if mask is None else mask.to(state.exec_mask.device)
            state.reset_from(module._init_streaming_state(len(m)), m)

    def set_exec_mask(self, mask: torch.Tensor) -> None:
        """Items where `mask` is False keep their state on the following steps."""
        mask = mask.to(dtype=torch.bool, copy=True)  # a snapshot: all_execute must describe it for good
        every = bool(mask.all())
        for module in self._streaming_modules():
            state = module._streaming_state
            if state is None:
                raise RuntimeError("set_exec_mask() called outside a streaming context")
            state.exec_mask = mask.to(device=state.exec_mask.device)
            state.all_execute = every

    @contextlib.contextmanager
    def select_sessions(self, slots: torch.Tensor) -> Iterator[None]:
        """Stream only the sessions `slots` (distinct int64 indices): a compact batch of len(slots) inside.

        All of them advance (an execution mask set earlier does not apply inside the block).

        Their states are gathered on entry and scattered back on a normal exit. If the block raises, every
        session keeps the state it had before the block (no half-applied step).
        """
        modules = list(self._streaming_modules())
        full_states = []
        all_step = None  # every selected session steps: one shared mask (set_exec_mask does not apply inside)
        for module in modules:
            state = module._streaming_state
            if state is None:
                raise RuntimeError("select_sessions() called outside a streaming context")
            index = slots.to(state.exec_mask.device)
            if all_step is None or all_step.device != index.device:
                all_step = torch.ones(len(index), dtype=torch.bool, device=index.device)
            compact = replace(state, exec_mask=all_step, all_execute=True,
                              **{name: getattr(state, name).index_select(0, index) for name in state.tensor_fields()})
            full_states.append((state, index))
            module._streaming_state = compact
        try:
            yield
        except BaseException:
            for module, (state, _) in zip(modules, full_states):
                module._streaming_state = state
            raise
        compacts = [module._streaming_state for module in modules]
        for module, (state, _) in zip(modules, full_states):
            module._streaming_state = state
        for module, (state, _), compact in zip(modules, full_states, compacts):  # check all before writing any
            for name in state.tensor_fields():
                old, new = getattr(state, name), getattr(compact, name)
                if old.shape[1:] != new.shape[1:]:
                    raise StreamingShapeError(
                        f"{type(module).__name__}: a step of selected sessions must feed whole frames "
                        f"(state shape would change from {tuple(old.shape[1:])} to {tuple(new.shape[1:])})")
        for (state, index), compact in zip(full_states, compacts):
            for name in state.tensor_fields():
                # In place: the full state tensors belong to this state alone, and copying them whole would make
                # a step's cost grow with the number of slots again.
                getattr(state, name).index_copy_(0, index, getattr(compact, name))

    def _new_exec_mask(self, batch_size: int) -> torch.Tensor:
        device = next(iter(self.parameters()), torch.empty(0)).device
        return torch.ones(batch_size, dtype=torch.bool, device=device)


class StreamingContainer(StreamingModule):
    """A module with no state of its own that only groups streaming children."""

    def _init_streaming_state(self, batch_size: int) -> StreamingState:
        return StreamingState(exec_mask=self._new_exec_mask(batch_size))


@dataclass
class _CounterState(StreamingState):
    samples: torch.Tensor  # [B] int64: samples received since the session started


class SampleCounter(StreamingModule):
    """Counts the samples each session has fed, so that a stream can be flushed to a whole frame."""

    in_frame_steps = False  # only `encode_flush` of a partial frame reads it

    def _init_streaming_state(self, batch_size: int) -> _CounterState:
        mask = torch.ones(batch_size, dtype=torch.bool)
        return _CounterState(exec_mask=mask, samples=torch.zeros(batch_size, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        if state is not None:
            state.samples = state.samples + state.exec_mask.cpu().long() * time_steps(x)
        return x

    def samples_seen(self) -> torch.Tensor:
        if self._streaming_state is None:
            raise RuntimeError("samples_seen() outside a streaming context")
        return self._streaming_state.samples


def step_state_fields(root: nn.Module) -> list[tuple[str, StreamingModule, str]]:
    """(module name under `root`, layer, field) of every state tensor of an open streaming context, in a fixed order:
    what a whole-frame step reads and writes (exported ONNX graphs, traced served steps). Modules with
    `in_frame_steps = False` (the sample counter, stream-start bookkeeping) are left out."""
    return [(name, m, f) for name, m in root.named_modules()
            if isinstance(m, StreamingModule) and m.in_frame_steps and m._streaming_state is not None
            for f in m._streaming_state.tensor_fields()]


@dataclass
class _ConvState(StreamingState):
    previous: torch.Tensor  # [B, C, L]: input samples not yet consumed by a full window


class StreamingConv1d(StreamingModule):
    """Causal 1-D convolution: left zero padding of `kernel_eff - stride`, no lookahead.

    Offline, `T` input samples give `floor(T / stride)` outputs. Streaming, the module keeps the input
    samples that the next window still needs and emits an output as soon as a window is complete.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1,
                 dilation: int = 1, groups: int = 1, bias: bool = True, norm: str = "none") -> None:
        super().__init__()
        self.conv = nn.Conv1d(in_channels, out_channels, kernel_size, stride=stride, dilation=dilation,
                              groups=groups, bias=bias)
        if norm == "weight_norm":
            self.conv = nn.utils.parametrizations.weight_norm(self.conv)
        elif norm != "none":
            raise ValueError(f"unknown conv norm {norm!r} (use 'none' or 'weight_norm'; no norm over time)")
        self.kernel_size = kernel_size
        self.stride = stride
        self.dilation = dilation
        if self.effective_kernel < stride:
            raise ValueError(f"kernel {kernel_size} (dilation {dilation}) shorter than stride {stride}")

    @property
    def effective_kernel(self) -> int:
        return (self.kernel_size - 1) * self.dilation + 1

    @property
    def left_context(self) -> int:
        return self.effective_kernel - self.stride

    def _init_streaming_state(self, batch_size: int) -> _ConvState:
        conv = self.conv
        weight = conv.weight
        previous = torch.zeros(batch_size, conv.in_channels, self.left_context, device=weight.device, dtype=weight.dtype)
        return _ConvState(exec_mask=self._new_exec_mask(batch_size), previous=previous)

    def _convolve(self, x: torch.Tensor) -> torch.Tensor:
        """`self.conv(x)`; float64 strided or short convolutions as one matrix product over (items x outputs).

        Why: oneDNN has no float64 convolution, and aten's fallback runs one im2col and one small matrix product per
        batch item, which costs most when each item has few outputs: a served step of the exact (float64) encoder has
        32 items of 1-40 outputs in its late layers. One `addmm` over all of them is 2-4x faster there (measured per
        layer of the default model, batch 32: e.g. 465 -> 142 us for 64->128 channels, kernel 16, stride 8), and not
        slower for whole files. Stride-1 convolutions over longer inputs keep aten's kernel, which is faster there.
        """
        conv = self.conv
        n_out = (time_steps(x) - self.effective_kernel) // self.stride + 1
        if x.dtype != torch.float64 or conv.groups != 1 or n_out < 1 or (self.stride == 1 and n_out > 8):
            return conv(x)
        windows = x.unfold(2, self.effective_kernel, self.stride)[..., :: self.dilation]  # [B, C_in, T, kernel]
        rows = windows.permute(0, 2, 1, 3).reshape(x.shape[0] * n_out, conv.in_channels * self.kernel_size)
        weight = conv.weight.reshape(conv.out_channels, -1)  # [C_out, C_in * kernel], same (channel, tap) order
        y = rows @ weight.t() if conv.bias is None else torch.addmm(conv.bias, rows, weight.t())
        return y.view(x.shape[0], n_out, -1).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        if state is None:
            return self._convolve(nn.functional.pad(x, (self.left_context, 0)))
        x = torch.cat([state.previous, x], dim=-1)
        n_out = max(0, (time_steps(x) - self.effective_kernel) // self.stride + 1)
        if n_out > 0:
            y = self._convolve(x[..., : (n_out - 1) * self.stride + self.effective_kernel])
        else:
            y = x.new_zeros(x.shape[0], self.conv.out_channels, 0)
        state.previous = _masked_update(state.previous, x[..., n_out * self.stride:], state, "conv")
        return y


@dataclass
class _HighPassState(StreamingState):
    last_input: torch.Tensor  # [B, C, 1]: the previous input sample
    last_output: torch.Tensor  # [B, C, 1]: the previous output sample


class StreamingHighPass(StreamingModule):
    """First-order high-pass (a DC blocker): y[n] = x[n] - x[n-1] + a * y[n-1], a = exp(-2 pi cutoff / rate).

    Why: recordings carry DC offsets and rumble below the voice (microphones, preamps), and an encoder trained on
    clean corpora spends its codes on them; speech codecs remove them first (Opus's encoder high-passes its input).
    The default model's encoder takes this filter (grvq_4cb.yaml, `seanet.input_highpass_hz`: 100 Hz since day 16,
    50 Hz before). At 50 Hz, on the held-out speaker gcin_3 (a DC offset, a third of the energy below 150 Hz), it
    took PESQ-WB from 1.26 to 1.53 with the weights unchanged (paired +0.278 +- 0.018 over 100 clips), and moved
    the other two held-out speakers by less than 0.005 (docs/default_model/heldout_speakers.md).

    The recursion runs in blocks of at most BLOCK samples in closed form, y[t] = a^t (a y_prev + sum_{j<=t}
    a^-j z[j]) with z the first difference: a cumulative sum, so a few tensor operations per block (traceable, and
    exportable to ONNX) instead of a Python loop over samples. BLOCK bounds a^-t (rounding grows with it: at most
    ~12x at 50 Hz). Block boundaries depend on the chunking, so streamed and offline outputs agree to rounding
    (~1e-15 in float64), as convolutions over differently shaped inputs do.
    """

    BLOCK = 128

    def __init__(self, cutoff_hz: float, sample_rate: int, channels: int = 1) -> None:
        super().__init__()
        if not 0 < cutoff_hz < sample_rate / 2:
            raise ValueError(f"high-pass cutoff {cutoff_hz} Hz must be between 0 and half the sample rate ({sample_rate / 2:g} Hz)")
        self.cutoff_hz, self.sample_rate, self.channels = cutoff_hz, sample_rate, channels
        self.a = math.exp(-2 * math.pi * cutoff_hz / sample_rate)
        steps = torch.arange(self.BLOCK, dtype=torch.float64)
        # Not persistent: they follow from the config, so checkpoints hold the same tensors with or without the filter.
        self.register_buffer("decay", self.a ** steps, persistent=False)  # a^t
        self.register_buffer("growth", self.a ** -steps, persistent=False)  # a^-t

    def _init_streaming_state(self, batch_size: int) -> _HighPassState:
        zeros = torch.zeros(batch_size, self.channels, 1, device=self.decay.device, dtype=self.decay.dtype)
        return _HighPassState(exec_mask=self._new_exec_mask(batch_size), last_input=zeros, last_output=zeros.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        n = time_steps(x)
        if n == 0:
            return x
        if state is None:  # offline: silence before the start, as a fresh streaming state
            last_input = last_output = x.new_zeros(x.shape[0], x.shape[1], 1)
        else:
            last_input, last_output = state.last_input.to(x.dtype), state.last_output.to(x.dtype)
        difference = x - torch.cat([last_input, x[..., :-1]], dim=-1)
        decay, growth = self.decay.to(x.dtype), self.growth.to(x.dtype)
        blocks = []
        for start in range(0, n, self.BLOCK):
            z = difference[..., start:start + self.BLOCK]
            length = time_steps(z)
            y = decay[:length] * (self.a * last_output + torch.cumsum(z * growth[:length], dim=-1))
            blocks.append(y)
            last_output = y[..., -1:]
        y = torch.cat(blocks, dim=-1) if len(blocks) > 1 else blocks[0]
        if state is not None:
            state.last_input = _masked_update(state.last_input, x[..., -1:].to(state.last_input.dtype), state, "high-pass")
            state.last_output = _masked_update(state.last_output, last_output.to(state.last_output.dtype), state, "high-pass")
        return y


@dataclass
class _ConvTransposeState(StreamingState):
    partial: torch.Tensor  # [B, C, kernel - stride]: overlap to add to the next output (bias excluded)


class StreamingConvTranspose1d(StreamingModule):
    """Causal transposed convolution: `T` inputs give exactly `T * stride` outputs.

    Offline, the last `kernel - stride` samples of the full transposed convolution are trimmed (they
    depend on inputs that have not arrived yet). Streaming, those samples are carried as a partial sum
    and added to the start of the next step's output.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int,
                 bias: bool = True, norm: str = "none") -> None:
        super().__init__()
        if kernel_size < stride:
            raise ValueError(f"transposed conv kernel {kernel_size} shorter than stride {stride}")
        self.convtr = nn.ConvTranspose1d(in_channels, out_channels, kernel_size, stride=stride, bias=False)
        if norm == "weight_norm":
            self.convtr = nn.utils.parametrizations.weight_norm(self.convtr)
        elif norm != "none":
            raise ValueError(f"unknown conv norm {norm!r} (use 'none' or 'weight_norm'; no norm over time)")
        # The bias is kept apart so that it is added once per output sample, not once per overlap.
        self.bias = nn.Parameter(torch.zeros(out_channels)) if bias else None
        self.kernel_size = kernel_size
        self.stride = stride

    @property
    def overlap(self) -> int:
        return self.kernel_size - self.stride

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y + self.bias.view(1, -1, 1)

    def _init_streaming_state(self, batch_size: int) -> _ConvTransposeState:
        weight = self.convtr.weight
        partial = torch.zeros(batch_size, self.convtr.out_channels, self.overlap, device=weight.device, dtype=weight.dtype)
        return _ConvTransposeState(exec_mask=self._new_exec_mask(batch_size), partial=partial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self._streaming_state
        n_out = time_steps(x) * self.stride
        if n_out == 0:
            return x.new_zeros(x.shape[0], self.convtr.out_channels, 0)
        y = self.convtr(x)  # length (T - 1) * stride + kernel = n_out + overlap
        if state is None:
            return self._add_bias(y[..., :n_out])
        if self.overlap:
            head = y[..., : self.overlap] + state.partial
            y = torch.cat([head, y[..., self.overlap:]], dim=-1)
        state.partial = _masked_update(state.partial, y[..., n_out:], state, "transposed conv")
        return self._add_bias(y[..., :n_out])


@dataclass
class _LSTMState(StreamingState):
    hidden: torch.Tensor  # [B, layers, H]
    cell: torch.Tensor  # [B, layers, H]


class StreamingLSTM(StreamingModule):
    """Unidirectional LSTM with a skip connection (Encodec's SLSTM) that carries (h, c) across steps."""

    def __init__(self, dimension: int, num_layers: int = 2) -> None:
        super().__init__()
        self.lstm = nn.LSTM(dimension, dimension, num_layers, batch_first=True)

    def start_as_identity(self) -> None:
        """Make the block pass its input through unchanged while staying trainable: the last layer's
        cell-candidate gate (rows 2H:3H in PyTorch's i, f, g, o order) gets zero weights and biases, so its
        cell, and so its output, stay zero; the gradient still reaches those rows through the input gate. The
        other layers keep their random weights, so the zeroed rows see a non-zero input from the first step
        (zeroing every layer would leave the lower ones without a gradient)."""
        hidden, last = self.lstm.hidden_size, self.lstm.num_layers - 1
        with torch.no_grad():
            for name in (f"weight_ih_l{last}", f"weight_hh_l{last}", f"bias_ih_l{last}", f"bias_hh_l{last}"):
                getattr(self.lstm, name)[2 * hidden: 3 * hidden].zero_()

    def _init_streaming_state(self, batch_size: int) -> _LSTMState:
        weight = self.lstm.weight_ih_l0
        shape = (batch_size, self.lstm.num_layers, self.lstm.hidden_size)
        zeros = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        return _LSTMState(exec_mask=self._new_exec_mask(batch_size), hidden=zeros, cell=zeros.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, T]
        state = self._streaming_state
        seq = x.transpose(1, 2)
        if state is None and self.training:
            y, _ = self.lstm(seq)  # one fused call over the whole sequence: fast for training
            return x + y.transpose(1, 2)
        if seq.shape[1] == 0:
            return x
        if state is None:
            zeros = seq.new_zeros(seq.shape[0], self.lstm.num_layers, self.lstm.hidden_size)
            hidden, cell = zeros, zeros
        else:
            hidden, cell = state.hidden.to(seq.dtype), state.cell.to(seq.dtype)
        # Inference runs one frame at a time, offline and streaming alike: the fused call's input projection is a
        # matrix product whose rounding depends on the sequence length, and codes must not depend on how the audio
        # was chunked. The cell is written out rather than calling nn.LSTM per frame: a one-frame nn.LSTM call costs
        # 150-300 us at 128 units on one CPU thread, these few ops 60-230 us (float32-float64, batch 1-10).
        y, hidden, cell = self._frame_by_frame(seq, hidden, cell)
        if state is not None:
            state.hidden = _masked_update(state.hidden, hidden, state, "lstm")
            state.cell = _masked_update(state.cell, cell, state, "lstm")
        return x + y.transpose(1, 2)

    def _frame_by_frame(self, seq: torch.Tensor, hidden: torch.Tensor, cell: torch.Tensor):
        """PyTorch's LSTM equations (gates i, f, g, o) one frame at a time; hidden/cell: [B, layers, H]."""
        lstm = self.lstm
        weights = [(getattr(lstm, f"weight_ih_l{k}"), getattr(lstm, f"weight_hh_l{k}"),
                    getattr(lstm, f"bias_ih_l{k}") + getattr(lstm, f"bias_hh_l{k}")) for k in range(lstm.num_layers)]
        h, c = list(hidden.unbind(1)), list(cell.unbind(1))
        outputs = []
        for t in range(seq.shape[1]):
            layer_input = seq[:, t]
            for k, (w_input, w_hidden, bias) in enumerate(weights):
                gates = torch.addmm(bias, layer_input, w_input.t()).addmm_(h[k], w_hidden.t())
                i, f, g, o = gates.chunk(4, dim=-1)
                c[k] = torch.sigmoid(f) * c[k] + torch.sigmoid(i) * torch.tanh(g)
                h[k] = torch.sigmoid(o) * torch.tanh(c[k])
                layer_input = h[k]
            outputs.append(layer_input)
        return torch.stack(outputs, dim=1), torch.stack(h, dim=1), torch.stack(c, dim=1)


@dataclass
class _AttentionState(StreamingState):
    keys: torch.Tensor  # [B, heads, context, head_dim]: the last `context` keys, oldest first
    values: torch.Tensor  # [B, heads, context, head_dim]
    valid: torch.Tensor  # [B, context] bool: which cache slots hold a real past frame


class StreamingTransformerLayer(StreamingModule):
    """Pre-norm causal self-attention + MLP over a bounded window of `context` past frames.

    Normalisation is LayerNorm over channels of one frame (never over time), and positions enter only
    through a learnt bias per relative distance, so a session's result does not depend on when it
    started. The key/value cache holds exactly `context` frames, so memory is bounded.
    """

    def __init__(self, dimension: int, num_heads: int = 4, context: int = 64, mlp_ratio: int = 4) -> None:
        super().__init__()
        if dimension % num_heads:
            raise ValueError(f"transformer dimension {dimension} not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.head_dim = dimension // num_heads
        self.context = context
        self.norm_attn = nn.LayerNorm(dimension)
        self.qkv = nn.Linear(dimension, 3 * dimension)
        self.out = nn.Linear(dimension, dimension)
        self.norm_mlp = nn.LayerNorm(dimension)
        self.mlp = nn.Sequential(nn.Linear(dimension, mlp_ratio * dimension), nn.GELU(),
                                 nn.Linear(mlp_ratio * dimension, dimension))
        self.relative_bias = nn.Parameter(torch.zeros(num_heads, context))  # index: distance 0..context-1

    def start_as_identity(self) -> None:
        """Pass the input through unchanged, still trainable: both residual branches end in a zeroed
        projection (the gradient reaches it through the branch's non-zero input)."""
        with torch.no_grad():
            for last in (self.out, self.mlp[-1]):
                last.weight.zero_()
                last.bias.zero_()

    def _init_streaming_state(self, batch_size: int) -> _AttentionState:
        weight = self.qkv.weight
        shape = (batch_size, self.num_heads, self.context, self.head_dim)
        zeros = torch.zeros(shape, device=weight.device, dtype=weight.dtype)
        valid = torch.zeros(batch_size, self.context, dtype=torch.bool, device=weight.device)
        return _AttentionState(exec_mask=self._new_exec_mask(batch_size), keys=zeros, values=zeros.clone(), valid=valid)

    def _split(self, t: torch.Tensor) -> torch.Tensor:  # [B, T, D] -> [B, H, T, d]
        b, n, _ = t.shape
        return t.view(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def _attend(self, q, k, v, key_valid: torch.Tensor, n_past: int) -> torch.Tensor:
        # q: [B,H,T,d], k/v: [B,H,n_past+T,d]; query i sits at key position n_past + i.
        t, s = q.shape[2], k.shape[2]
        q_pos = torch.arange(t, device=q.device).view(t, 1) + n_past
        k_pos = torch.arange(s, device=q.device).view(1, s)
        distance = q_pos - k_pos
        allowed = (distance >= 0) & (distance < self.context)
        bias = self.relative_bias[:, distance.clamp(0, self.context - 1)]  # [H, T, S]
        mask = allowed.view(1, 1, t, s) & key_valid.view(-1, 1, 1, s)
        bias = bias.unsqueeze(0).masked_fill(~mask, float("-inf"))
        out = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return out.transpose(1, 2).reshape(q.shape[0], t, -1)

    def _block(self, h: torch.Tensor, state: _AttentionState | None) -> torch.Tensor:
        """Attention + MLP for frames h [B, T, D]; with a state, attend to the cached past too."""
        q, k, v = self.qkv(self.norm_attn(h)).chunk(3, dim=-1)
        q, k, v = self._split(q), self._split(k), self._split(v)
        b, t = h.shape[0], h.shape[1]
        now_valid = torch.ones(b, t, dtype=torch.bool, device=h.device)
        if state is None:
            attn = self._attend(q, k, v, now_valid, n_past=0)
        else:
            k_all = torch.cat([state.keys, k], dim=2)
            v_all = torch.cat([state.values, v], dim=2)
            valid = torch.cat([state.valid, now_valid], dim=1)
            attn = self._attend(q, k_all, v_all, valid, n_past=self.context)
            state.keys = _masked_update(state.keys, k_all[:, :, -self.context:], state, "attention")
            state.values = _masked_update(state.values, v_all[:, :, -self.context:], state, "attention")
            state.valid = _masked_update(state.valid, valid[:, -self.context:], state, "attention")
        h = h + self.out(attn)
        return h + self.mlp(self.norm_mlp(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, T]
        h = x.transpose(1, 2)
        if h.shape[1] == 0:
            return x
        state = self._streaming_state
        if state is None and self.training:
            return self._block(h, None).transpose(1, 2)  # all frames at once, causal mask: fast for training
        # Inference goes one frame at a time through the cache, offline too (with a throw-away cache),
        # so that results are bitwise independent of the chunking (see StreamingLSTM.forward).
        if state is None:
            state = self._init_streaming_state(h.shape[0])
        outputs = [self._block(h[:, t: t + 1], state) for t in range(h.shape[1])]
        return torch.cat(outputs, dim=1).transpose(1, 2)


class StreamingTransformer(StreamingContainer):
    def __init__(self, dimension: int, num_layers: int = 2, num_heads: int = 4, context: int = 64) -> None:
        super().__init__()
        self.layers = nn.ModuleList(StreamingTransformerLayer(dimension, num_heads, context) for _ in range(num_layers))

    def start_as_identity(self) -> None:
        for layer in self.layers:
            layer.start_as_identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x
