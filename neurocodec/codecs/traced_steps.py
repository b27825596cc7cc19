"""A streaming step of selected sessions as one TorchScript call, for the server's model worker.

`SelectedStep(codec, "encode")(x, slots)` returns what

    with codec.encoder.select_sessions(slots):
        codec.encode_frames(x)

returns, and leaves the same states behind, but runs the gather of the sessions' states, the step and the
scatter back as one traced graph.

Why: in eager PyTorch a one-frame step of a small codec is a few hundred operator calls, and each call lets go
of the GIL and takes it back. In the server, the gRPC event loop runs Python on another thread between those
calls, so a worker that has to win the GIL back hundreds of times per step waits much longer than it computes
(docs/serve.md: 16 streams within 20 ms at 36% of a core). The traced graph runs the same operators with the same
kernels in the same order, so its results are bitwise those of eager PyTorch (float64 encoders included, which is
what keeps served codes equal to offline `encode`), and it holds no GIL while it runs.

Graphs are traced per input shape (one frame; for decoding, each number of codebooks: a step of several frames runs
as one-frame calls in a row), the first time a shape is met, from a private copy of the codec made at the first
trace: tracing never touches the served sessions' states, and weights or settings (e.g. `set_exact_encoding`)
changed after it are not seen (a served codec's are fixed). The steps are unprimed (`encode_frames` /
`decode_frames`): the caller runs a new session's stream-start stand-in through the same step first
(serve/batcher.py, codecs/stream_start.py). The encode and decode steps each keep their own copy: twice the codec's
weights in memory. Each graph is checked against eager steps on that copy before use; a graph that differs (a layer
whose step depends on Python values the tracer cannot follow) is not used, and that shape keeps running eagerly.

The graph executor's optimising passes are switched off around each call: they re-specialise the graph to every
new batch size, and with a batch that changes at every step they made it 2-5x slower than eager (measured on the
default model, batches 8-64).
"""

from __future__ import annotations

import copy
import logging
import warnings

import torch
from torch import nn

from .streaming import StreamingModule, step_state_fields

log = logging.getLogger("neurocodec.serve")

_PROBE_BATCH = 3  # the private copy's sessions while tracing and checking
_PROBE_SLOTS = (0, 2)  # a selection that is neither all sessions nor a prefix


def _state_fields(module: nn.Module) -> list[tuple[str, str]]:
    """(module name, field) of every state tensor a whole-frame step carries (`step_state_fields`)."""
    return [(name, field) for name, _, field in step_state_fields(module)]


class _GatherStepScatter(nn.Module):
    """(x, slots, *full states) -> y: the function that is traced (states are updated in place)."""

    def __init__(self, codec: nn.Module, kind: str, module: nn.Module, fields: list[tuple[str, str]]) -> None:
        super().__init__()
        self.codec, self.step = codec, f"{kind}_frames"
        self.targets = [(module.get_submodule(name), f) for name, f in fields]

    def forward(self, x: torch.Tensor, slots: torch.Tensor, *states: torch.Tensor) -> torch.Tensor:
        for (m, f), state in zip(self.targets, states):
            setattr(m._streaming_state, f, state.index_select(0, slots))
        y = getattr(self.codec, self.step)(x)
        for (m, f), state in zip(self.targets, states):
            state.index_copy_(0, slots, getattr(m._streaming_state, f))
        return y


class SelectedStep:
    """`step(x, slots)`: one streaming step of the sessions `slots` of `codec`'s encoder or decoder, which must
    be inside its `streaming(max_streams)` context. `traced=False` runs it eagerly (`select_sessions`)."""

    def __init__(self, codec: nn.Module, kind: str, traced: bool = True) -> None:
        if kind not in ("encode", "decode"):
            raise ValueError(f"kind must be 'encode' or 'decode', not {kind!r}")
        self.codec, self.kind, self.traced = codec, kind, traced
        self.module = codec.encoder if kind == "encode" else codec.decoder
        self.frame = codec.frame_size if kind == "encode" else 1  # one frame of input: samples or code frames
        self._private: nn.Module | None = None  # the copy graphs are traced from
        self._targets: list[tuple[nn.Module, str]] | None = None  # (layer, state field) of the served module
        self._graphs: dict[tuple, torch.jit.ScriptModule | None] = {}  # None: that shape runs eagerly

    def __call__(self, x: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        if self.traced and x.shape[-1] > self.frame and x.shape[-1] % self.frame == 0:
            # Several whole frames: one-frame graphs in a row, so that one graph serves every step length.
            return torch.cat([self(x[..., t:t + self.frame], slots) for t in range(0, x.shape[-1], self.frame)], dim=-1)
        graph = self.graph_for(x) if self.traced else None
        if graph is None:
            with self.module.select_sessions(slots):
                return getattr(self.codec, f"{self.kind}_frames")(x)
        if self._targets is None:
            self._targets = [(self.module.get_submodule(name), f) for name, f in _state_fields(self.module)]
        states = [getattr(m._streaming_state, f) for m, f in self._targets]
        with torch.no_grad(), torch.jit.optimized_execution(False):
            return graph(x, slots, *states)

    def graph_for(self, x: torch.Tensor) -> torch.jit.ScriptModule | None:
        """The traced graph for inputs shaped like `x` (traced and checked on first use), or None."""
        key = (tuple(x.shape[1:]), x.dtype)
        if key not in self._graphs:
            self._graphs[key] = self._trace(x)
        return self._graphs[key]

    @torch.no_grad()
    def _trace(self, x: torch.Tensor) -> torch.jit.ScriptModule | None:
        if self._private is None:
            self._private = copy.deepcopy(self.codec)
            for m in self._private.modules():  # the copy starts with no sessions of its own
                if isinstance(m, StreamingModule):
                    m._streaming_state = None
        private = self._private
        module = private.encoder if self.kind == "encode" else private.decoder
        step = getattr(private, f"{self.kind}_frames")
        example = torch.zeros((len(_PROBE_SLOTS), *x.shape[1:]), dtype=x.dtype)
        slots = torch.tensor(_PROBE_SLOTS)
        with module.streaming(_PROBE_BATCH):
            fields = _state_fields(module)
            with module.select_sessions(slots):
                step(example)  # fills the layers' caches (e.g. codebook norms), so the graph holds them as constants
            module.reset_streaming()
            fresh = [getattr(module.get_submodule(n)._streaming_state, f) for n, f in fields]
            wrapper = _GatherStepScatter(private, self.kind, module, fields)
            with warnings.catch_warnings():
                # The tracer warns about each Python-side check it evaluates once (shapes, code ranges): those
                # checks hold for every input of this shape, and `probe` below compares real steps.
                warnings.simplefilter("ignore", torch.jit.TracerWarning)
                # torch.jit.trace is deprecated in favour of torch.export, whose graphs would need the state
                # threaded through every layer's signature; tracing records what the layers do to their states.
                warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
                graph = torch.jit.trace(wrapper, (example, slots, *[s.clone() for s in fresh]), check_trace=False)
                # Freezing folds the weights and the traced shape arithmetic into constants: 2.0 instead of 2.45 ms
                # per step of the default model at batch 8 (alone, one thread), bitwise the same results (checked
                # below for every graph).
                graph = torch.jit.freeze(graph.eval())
            module.reset_streaming()  # tracing ran `step` through the module's state objects
            if self._same_as_eager(graph, module, step, fields, x):
                return graph
        log.warning("traced %s step differs from the eager one for inputs %s; running it eagerly",
                    self.kind, tuple(x.shape[1:]))
        return None

    def _same_as_eager(self, graph, module, step, fields, x: torch.Tensor, steps: int = 3) -> bool:
        """Run `steps` steps both ways from the same states on random input of x's shape: outputs and states equal."""
        generator = torch.Generator().manual_seed(0)
        slots = torch.tensor(_PROBE_SLOTS)
        states = [getattr(module.get_submodule(n)._streaming_state, f).clone() for n, f in fields]
        for _ in range(steps):
            if x.dtype.is_floating_point:
                probe = 0.1 * torch.randn((len(_PROBE_SLOTS), *x.shape[1:]), generator=generator, dtype=x.dtype)
            else:  # codes: in range for every codebook
                high = min(self.codec.quantizer.cardinalities)
                probe = torch.randint(0, high, (len(_PROBE_SLOTS), *x.shape[1:]), generator=generator, dtype=x.dtype)
            with module.select_sessions(slots):
                eager = step(probe)
            with torch.jit.optimized_execution(False):
                traced = graph(probe, slots, *states)
            if not torch.equal(eager, traced):
                return False
            now = [getattr(module.get_submodule(n)._streaming_state, f) for n, f in fields]
            if not all(torch.equal(a, b) for a, b in zip(now, states)):
                return False
        return True
