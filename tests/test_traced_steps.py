"""Traced steps of selected sessions (codecs/traced_steps.py) equal eager `select_sessions` steps bitwise, for every
audio family, in the float64 encoding the server uses; a graph that would differ is not used."""

import numpy as np
import pytest
import torch

from neurocodec.codecs.checkpoint import load_codec
from neurocodec.codecs.streaming import SampleCounter, StreamingConv1d
from neurocodec.codecs.traced_steps import SelectedStep

SLOTS = 9


def _schedule(seed: int, steps: int):
    """Random steps: which sessions step (sorted or not), resets of some sessions in between."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        n = int(rng.integers(1, SLOTS + 1))
        slots = rng.choice(SLOTS, n, replace=False)
        if rng.random() < 0.5:
            slots = np.sort(slots)
        reset = rng.random(SLOTS) < 0.15 if rng.random() < 0.3 else None
        yield torch.from_numpy(slots).long(), reset


def _run(codec, kind: str, traced: bool, inputs: list, schedule: list) -> list[torch.Tensor]:
    module = codec.encoder if kind == "encode" else codec.decoder
    step = SelectedStep(codec, kind, traced=traced)
    outputs = []
    with torch.no_grad(), module.streaming(SLOTS):
        for x, (slots, reset) in zip(inputs, schedule):
            if reset is not None:
                module.reset_streaming(torch.from_numpy(reset))
            # A traced step runs a multi-frame input as one-frame calls; the eager reference does the same, so that
            # both compute the same operations (a 3-frame convolution may round differently from three 1-frame ones).
            frames = [x[..., t:t + step.frame] for t in range(0, x.shape[-1], step.frame)]
            outputs.append(torch.cat([step(f, slots) for f in frames], dim=-1) if not traced else step(x, slots))
        outputs.append(torch.cat([s.flatten().double() for s in _states(module)]))
    if traced:  # the graphs ran, not the eager fallback of a graph that failed its check
        assert all(step.graph_for(x[..., :step.frame]) is not None for x in inputs)
    return outputs


def _states(module):
    """Every state tensor but the sample counter's (which only `encode_flush` reads; selected steps leave it)."""
    return [getattr(m._streaming_state, f) for m in module.modules()
            if getattr(m, "_streaming_state", None) is not None and not isinstance(m, SampleCounter)
            for f in m._streaming_state.tensor_fields()]


@pytest.mark.parametrize("model", ["grvq_4cb:tiny", "rvq_8cb:tiny", "fsq:tiny", "semanticodec:tiny", "xy_single:tiny"])
def test_traced_steps_equal_eager_steps(model):
    torch.manual_seed(0)
    codec = load_codec(model)
    codec.set_exact_encoding(True)
    codec.set_num_codebooks(codec.total_codebooks)
    schedule = list(_schedule(seed=1, steps=12))
    rng = torch.Generator().manual_seed(2)
    frames = [1 + i % 3 for i in range(len(schedule))]  # one- and multi-frame steps
    audio = [0.2 * torch.randn(len(s), 1, f * codec.frame_size, generator=rng) for (s, _), f in zip(schedule, frames)]
    eager = _run(codec, "encode", False, audio, schedule)
    traced = _run(codec, "encode", True, audio, schedule)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)

    k = min(codec.allowed_num_codebooks())  # a prefix of the codebooks, as a session may ask
    cards = torch.tensor(codec.quantizer.cardinalities[:k]).view(1, k, 1)
    codes = [(torch.rand(len(s), k, f, generator=rng) * cards).long() for (s, _), f in zip(schedule, frames)]
    eager = _run(codec, "decode", False, codes, schedule)
    traced = _run(codec, "decode", True, codes, schedule)
    for a, b in zip(eager, traced):
        assert torch.equal(a, b)


def test_a_graph_that_would_differ_is_not_used(monkeypatch):
    """A layer whose step reads a Python value that changes between calls cannot be traced faithfully: the graph
    fails its check against eager steps, and the step runs eagerly (still correct)."""
    codec = load_codec("grvq_4cb:tiny")
    codec.set_exact_encoding(True)
    forward = StreamingConv1d.forward
    calls = {"n": 0}

    def drifting_forward(self, x):
        calls["n"] += 1
        return forward(self, x) + 1e-3 * calls["n"]  # a Python number: the tracer freezes it as a constant

    monkeypatch.setattr(StreamingConv1d, "forward", drifting_forward)
    step = SelectedStep(codec, "encode")
    x = torch.zeros(2, 1, codec.frame_size)
    assert step.graph_for(x) is None
    with torch.no_grad(), codec.encoder.streaming(SLOTS):
        assert step(x, torch.tensor([1, 4])).shape == (2, codec.total_codebooks, 1)


def test_tracing_leaves_the_served_sessions_alone():
    """Graphs are traced from a private copy: the first call of a new shape changes no session's state but its own."""
    codec = load_codec("grvq_4cb:tiny")
    codec.set_exact_encoding(True)
    step = SelectedStep(codec, "encode")
    with torch.no_grad(), codec.encoder.streaming(SLOTS):
        step(0.1 * torch.randn(3, 1, codec.frame_size), torch.tensor([0, 1, 2]))
        before = [s.clone() for s in _states(codec.encoder)]
        step(0.1 * torch.randn(1, 1, 2 * codec.frame_size), torch.tensor([5]))  # a new shape: traced now
        after = _states(codec.encoder)
        for old, new in zip(before, after):
            untouched = [i for i in range(SLOTS) if i != 5]
            assert torch.equal(old[untouched], new[untouched])
