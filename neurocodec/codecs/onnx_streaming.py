"""A codec's streaming step as two ONNX graphs with explicit state, and a runner for them in ONNX Runtime.

Why: a one-frame streaming step in eager PyTorch costs a few hundred small operator calls, and for a small
model the dispatch of those calls is nearly all of the time (the default model: ~7 ms per 20 ms frame on one
CPU thread, docs/BENCHMARKS.md). ONNX Runtime runs the same step from a static graph with far less per-call
overhead. The graphs also serve from any ONNX host, for example Triton's sequence batcher with implicit state.

`export_streaming_onnx(codec, folder)` writes

    encode_step.onnx   (audio [B, 1, F * frame_size] float32, *states) -> (codes [B, K, F] int64, *new states)
    decode_step.onnx   (codes [B, K, F] int64, *states)                -> (audio [B, 1, F * frame_size], *new states)
    initial_states.npz the state of one stream at the start (each state has the batch in dimension 0)
    streaming.json     rates, codebooks, F (`frames_per_step`), the state names of each graph, `stream_start`
    encode_prime.onnx, decode_prime.onnx   the same steps for one frame (only when F > 1 and the codec primes)

where F is fixed at export. A state input named `s` comes back as output `s.next`; feeding it to the next
step continues the stream. Streams are independent along the batch dimension, so B streams step together.

Stream start: the graphs are the unprimed steps. When `stream_start` is "mirror", a host primes each new stream
before its first step, as `OnnxStreamingCodec` does: it runs one frame of stand-in (the stream's first frame of
audio reversed in time; its first code frame) through the one-frame graph, keeps the states and drops the output
(codecs/stream_start.py). Exports made before priming existed have no `stream_start` and start from zero state.

Exactness: ONNX Runtime has no float64 convolution, so the exported encoder runs in float32, whereas
`neurocodec encode` runs it in float64 to make streaming codes bitwise equal to offline ones
(neurocodec/codecs/model.py). A frame whose latent lies within float32 rounding of a boundary between two
codebook entries can therefore get the other entry; tests bound how often. Decoding the same codes agrees
with PyTorch to float32 rounding.
"""

from __future__ import annotations

import contextlib
import json
import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import nn

from ..errors import CodesError, UserError
from .stream_start import stand_in
from .streaming import StreamingModule, step_state_fields

ENCODE_GRAPH = "encode_step.onnx"
DECODE_GRAPH = "decode_step.onnx"
PRIME_GRAPHS = {"encode": "encode_prime.onnx", "decode": "decode_prime.onnx"}  # one-frame steps, when F > 1
INITIAL_STATES = "initial_states.npz"
MANIFEST = "streaming.json"
OPSET = 18  # 18: BitwiseAnd, which LFQ's decoding needs (see _integer_and)
FORMAT_VERSION = 1


def _integer_and(g, a, b):
    """ONNX for `a & b`: the exporter maps only boolean AND, while vector-quantize-pytorch's LFQ reads the sign
    bits of an entry number with an integer AND (indices_to_codes)."""
    if a.type().scalarType() == "Bool":
        return g.op("And", a, b)
    int64 = 7  # ONNX TensorProto.INT64: torch promotes int32 & int64 to int64; ONNX wants equal types
    return g.op("BitwiseAnd", g.op("Cast", a, to_i=int64), g.op("Cast", b, to_i=int64))


def _state_slots(codec: nn.Module) -> list[tuple[str, StreamingModule, str]]:
    """(graph input name, module, field) of every state tensor of an open streaming context (see
    `step_state_fields`; the runner takes whole steps)."""
    return [(f"{name or 'codec'}.{field}", module, field) for name, module, field in step_state_fields(codec)]


class _Step(nn.Module):
    """One streaming step as a function: (input, *states) -> (output, *new states), for tracing."""

    def __init__(self, codec: nn.Module, step: str, slots: list[tuple[str, StreamingModule, str]]) -> None:
        super().__init__()
        self.codec, self.step, self.slots = codec, step, slots  # the codec as a submodule: weights are parameters

    def forward(self, x: torch.Tensor, *states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        for (_, module, field), state in zip(self.slots, states):
            setattr(module._streaming_state, field, state)
        y = getattr(self.codec, self.step)(x)
        return (y, *(getattr(module._streaming_state, field) for _, module, field in self.slots))


def _changed_slots(codec: nn.Module, step: str, example: torch.Tensor) -> list[tuple[str, StreamingModule, str]]:
    """The state tensors that `step` replaces (each layer assigns a new tensor when it advances), after checking
    that a whole-frame step keeps every state's shape, which a graph with fixed state inputs needs."""
    slots = _state_slots(codec)
    before = [getattr(module._streaming_state, field) for _, module, field in slots]
    getattr(codec, step)(example)
    changed = []
    for (name, module, field), old in zip(slots, before):
        new = getattr(module._streaming_state, field)
        if new is old:
            continue
        if new.shape != old.shape:
            raise UserError(f"{name}: its streaming state changes shape from {tuple(old.shape)} to {tuple(new.shape)} "
                            "on a whole-frame step, so this model cannot be exported as a fixed-state graph")
        changed.append((name, module, field))
    return changed


def _export_step(codec, step: str, example, input_name: str, output_name: str, path: Path,
                 dynamic_batch: bool, names: list[str] | None = None) -> tuple[list[str], dict]:
    """Trace one step from a fresh stream of the example's batch size and write its graph; returns the state
    names and the initial state of one stream. With `names`, the step must carry exactly those states (a
    one-frame priming graph beside an F-frame one)."""
    with codec.streaming(example.shape[0]):
        slots = _changed_slots(codec, step, example)
        if names is not None and [name for name, _, _ in slots] != names:
            raise UserError(f"{path.name}: a one-frame step carries other states than a {example.shape[-1]}-frame one")
        codec.reset_streaming()
        states = [getattr(module._streaming_state, field) for _, module, field in slots]
        initial = {name: state[:1].numpy() for (name, _, _), state in zip(slots, states)}
        names = [name for name, _, _ in slots]
        with warnings.catch_warnings():
            # The tracer warns about each Python-side check it evaluates once (shapes, code ranges); those
            # checks are for the PyTorch path, and the runner below repeats the ones that matter on the host.
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            # ... and about advanced indexing with negative indices, which codes never are.
            warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
            # The TorchScript exporter (deprecated in favour of torch.export's) records what the Python step does
            # to the layers' state objects; torch.export would need the state threaded through every layer.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
            warnings.filterwarnings("ignore", message="You are using the legacy TorchScript-based ONNX export")
            torch.onnx.export(
                _Step(codec, step, slots).eval(), (example, *states), str(path), dynamo=False, opset_version=OPSET,
                input_names=[input_name, *names], output_names=[output_name, *(f"{n}.next" for n in names)],
                dynamic_axes={n: {0: "batch"} for n in [input_name, output_name, *names, *(f"{n}.next" for n in names)]}
                if dynamic_batch else None)
    return names, initial


@torch.no_grad()
def export_streaming_onnx(codec: nn.Module, folder: str | Path, frames_per_step: int = 1,
                          batch_size: int | None = None) -> Path:
    """Write the codec's streaming encode and decode steps (F = `frames_per_step` frames each) to `folder`:
    for any number of streams, or for exactly `batch_size` (a static graph; ONNX Runtime then folds the
    shape arithmetic of every layer into constants, which makes a small model's step much cheaper)."""
    from .registry import family_of

    modality = family_of(codec).modality
    if modality != "audio":
        raise UserError(f"model {codec.name} is an {modality} codec; ONNX streaming export is for audio codecs")
    if frames_per_step < 1:
        raise UserError("--frames-per-step must be at least 1")
    if batch_size is not None and batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    exact, was_training = codec.encoder_dtype == torch.float64, codec.training
    codec.set_exact_encoding(False)  # see the module docstring: ONNX Runtime has no float64 Conv
    # Inference mode (BatchNorm statistics, no codebook updates). The exporter puts the traced module back in
    # the mode it found it in, so the wrapper is in eval mode too, and the codec's own mode is restored below.
    codec.eval()
    for op in ("aten::__and_", "aten::bitwise_and"):  # see _integer_and
        torch.onnx.register_custom_op_symbolic(op, _integer_and, OPSET)
    try:
        # For any batch, trace with 2 streams, so no reshape in the graph can bake in a batch of 1.
        b = batch_size or 2
        audio = torch.zeros(b, 1, frames_per_step * codec.frame_size)
        codec.encode(audio)  # fills the quantizer's cached search terms, so the trace holds only the search
        codes = torch.zeros(b, codec.num_codebooks, frames_per_step, dtype=torch.long)
        dynamic = batch_size is None
        enc_names, enc_init = _export_step(codec, "encode_frames", audio, "audio", "codes", folder / ENCODE_GRAPH, dynamic)
        dec_names, dec_init = _export_step(codec, "decode_frames", codes, "codes", "audio", folder / DECODE_GRAPH, dynamic)
        prime_graphs = None
        if codec.primes_stream_start and frames_per_step > 1:
            _export_step(codec, "encode_frames", audio[..., :codec.frame_size], "audio", "codes",
                         folder / PRIME_GRAPHS["encode"], dynamic, enc_names)
            _export_step(codec, "decode_frames", codes[..., :1], "codes", "audio", folder / PRIME_GRAPHS["decode"],
                         dynamic, dec_names)
            prime_graphs = PRIME_GRAPHS
        for stale in set(PRIME_GRAPHS.values()) - set((prime_graphs or {}).values()):
            (folder / stale).unlink(missing_ok=True)  # from an earlier export into the same folder
    finally:
        codec.set_exact_encoding(exact)
        codec.train(was_training)
    np.savez(folder / INITIAL_STATES, **{f"encode/{k}": v for k, v in enc_init.items()},
             **{f"decode/{k}": v for k, v in dec_init.items()})
    manifest = {
        "format_version": FORMAT_VERSION, "model": codec.name, "family": codec.config.family,
        "sample_rate": codec.sample_rate, "frame_size": codec.frame_size, "frame_rate": codec.frame_rate,
        "frames_per_step": frames_per_step, "batch_size": batch_size, "num_codebooks": codec.num_codebooks, "cardinality": codec.cardinality,
        "opset": OPSET, "encode_states": enc_names, "decode_states": dec_names,
        "stream_start": codec.config.stream_start, "prime_graphs": prime_graphs,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


class OnnxStreamingCodec:
    """Runs exported steps in ONNX Runtime with the streaming interface of the PyTorch codec:

        codec = OnnxStreamingCodec("codec-onnx/")
        with codec.streaming(batch_size=1):
            codes = codec.encode_step(chunk)    # chunk [B, 1, n * frames_per_step * frame_size] float32
            audio = codec.decode_step(codes)    # codes [B, K, n * frames_per_step]
    """

    def __init__(self, folder: str | Path, threads: int = 1) -> None:
        import onnxruntime as ort

        folder = Path(folder)
        if not (folder / MANIFEST).is_file():
            raise UserError(f"{folder}: no {MANIFEST}; export one with `neurocodec export-onnx --model M -o {folder}`")
        self.info = json.loads((folder / MANIFEST).read_text())
        if self.info.get("format_version") != FORMAT_VERSION:
            raise UserError(f"{folder}: format version {self.info.get('format_version')}, this neurocodec reads {FORMAT_VERSION}")
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self._encoder = ort.InferenceSession(str(folder / ENCODE_GRAPH), options, providers=["CPUExecutionProvider"])
        self._decoder = ort.InferenceSession(str(folder / DECODE_GRAPH), options, providers=["CPUExecutionProvider"])
        # The one-frame steps that prime a new stream (None: streams start from zero state, as exported before
        # priming existed). With F = 1 they are the step graphs themselves.
        self._primers = None
        if self.info.get("stream_start", "none") == "mirror":
            graphs = self.info.get("prime_graphs")
            self._primers = {"encode": self._encoder, "decode": self._decoder} if graphs is None else {
                part: ort.InferenceSession(str(folder / graphs[part]), options, providers=["CPUExecutionProvider"])
                for part in ("encode", "decode")}
        with np.load(folder / INITIAL_STATES) as saved:
            self._initial = {key: saved[key] for key in saved.files}
        self._states: dict[str, dict[str, np.ndarray]] | None = None

    frame_size = property(lambda self: self.info["frame_size"])
    sample_rate = property(lambda self: self.info["sample_rate"])
    num_codebooks = property(lambda self: self.info["num_codebooks"])
    frames_per_step = property(lambda self: self.info["frames_per_step"])

    @contextlib.contextmanager
    def streaming(self, batch_size: int) -> Iterator[None]:
        """Open `batch_size` independent streams, each starting from silence."""
        if self._states is not None:
            raise RuntimeError("OnnxStreamingCodec is already streaming")
        fixed = self.info.get("batch_size")
        if fixed is not None and batch_size != fixed:
            raise UserError(f"these graphs were exported for exactly {fixed} stream(s), not {batch_size} "
                            "(export without --batch-size for any number)")
        self._states = {
            part: {name: np.repeat(self._initial[f"{part}/{name}"], batch_size, axis=0) for name in self.info[f"{part}_states"]}
            for part in ("encode", "decode")}
        self._started = {"encode": False, "decode": False}  # every stream of the context starts on its first step
        try:
            yield
        finally:
            self._states = None

    def _run(self, part: str, session, input_name: str, x: np.ndarray, steps: int) -> np.ndarray:
        if self._states is None:
            raise RuntimeError(f"{part}_step() called outside a streaming context")
        if not self._started[part]:
            if self._primers is not None:  # run the stand-in, keep the states it leaves, drop its output
                prime = np.ascontiguousarray(stand_in(part, torch.from_numpy(x), self.frame_size).numpy())
                _, *new = self._primers[part].run(None, {input_name: prime, **self._states[part]})
                self._states[part] = dict(zip(self._states[part], new))
            self._started[part] = True
        states, width, outputs = self._states[part], x.shape[-1] // steps, []
        for i in range(steps):
            out, *new = session.run(None, {input_name: x[..., i * width:(i + 1) * width], **states})
            states = dict(zip(states, new))
            outputs.append(out)
        self._states[part] = states
        return np.concatenate(outputs, axis=-1)

    def encode_step(self, chunk: np.ndarray) -> np.ndarray:
        """Codes [B, K, n * F] of the next chunk of each stream (float32 [B, 1, n * F * frame_size])."""
        step = self.frames_per_step * self.frame_size
        chunk = np.ascontiguousarray(chunk, dtype=np.float32)
        if chunk.ndim != 3 or chunk.shape[1] != 1 or chunk.shape[-1] == 0 or chunk.shape[-1] % step:
            raise UserError(f"chunks must be mono audio [B, 1, n * {step}] (whole steps of {self.frames_per_step} "
                            f"frame(s) of {self.frame_size} samples), got {tuple(chunk.shape)}")
        return self._run("encode", self._encoder, "audio", chunk, chunk.shape[-1] // step)

    def decode_step(self, codes: np.ndarray) -> np.ndarray:
        """Audio [B, 1, n * F * frame_size] of the next codes [B, K, n * F] of each stream."""
        codes = np.asarray(codes)
        f, k = self.frames_per_step, self.num_codebooks
        if codes.ndim != 3 or codes.shape[1] != k or codes.shape[-1] == 0 or codes.shape[-1] % f:
            raise CodesError(f"codes must be [B, {k}, n * {f}], got {tuple(codes.shape)}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise CodesError(f"codes must be integers, got {codes.dtype}")
        high = np.asarray(self.info["cardinality"]).reshape(1, -1, 1)
        bad = (codes < 0) | (codes >= high)
        if bad.any():
            b, q, t = np.argwhere(bad)[0]
            raise CodesError(f"code {int(codes[b, q, t])} at stream {b}, codebook {q}, frame {t} is outside "
                             f"[0, {int(high[0, q, 0])})")
        return self._run("decode", self._decoder, "codes", codes.astype(np.int64), codes.shape[-1] // f)
