"""Streaming layers give exactly their offline output for any chunking, per session, under execution masks."""

import itertools
import random

import pytest
import torch

from neurocodec.codecs.streaming import (StreamingConv1d, StreamingConvTranspose1d, StreamingHighPass, StreamingLSTM,
                                         StreamingShapeError, StreamingTransformer)


def run_chunked(module, x, sizes):
    """Feed x [B, C, T] in chunks of the given sizes (cycled) inside a streaming context."""
    outs, pos, i = [], 0, 0
    with module.streaming(x.shape[0]):
        while pos < x.shape[-1]:
            n = sizes[i % len(sizes)]
            outs.append(module(x[..., pos:pos + n]))
            pos, i = pos + n, i + 1
    return torch.cat(outs, dim=-1)


CHUNKINGS = [[1], [2, 3], [7], [64], [5, 1, 33], [1000]]


@pytest.mark.parametrize("kernel,stride,dilation", [
    (k, s, d) for k, s, d in itertools.product([1, 3, 4, 7, 10], [1, 2, 3, 5, 8], [1, 2, 3]) if (k - 1) * d + 1 >= s
])
def test_conv1d_streaming_equals_offline(kernel, stride, dilation):
    torch.manual_seed(kernel * 100 + stride * 10 + dilation)
    conv = StreamingConv1d(3, 4, kernel, stride=stride, dilation=dilation).eval()
    x = torch.randn(2, 3, 8 * stride * 5 + 3)
    with torch.no_grad():
        offline = conv(x)
        assert offline.shape[-1] == x.shape[-1] // stride
        for sizes in CHUNKINGS:
            streamed = run_chunked(conv, x, sizes)
            assert streamed.shape == offline.shape
            torch.testing.assert_close(streamed, offline, atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_float64_conv1d_is_the_convolution_and_streams_exactly(bias):
    """Float64 strided or short convolutions run as one matrix product (StreamingConv1d._convolve): they must be
    aten's convolution to float64 rounding, offline and for every chunking."""
    combos = [(k, s, d) for k, s, d in itertools.product([1, 3, 4, 7, 10, 16], [1, 2, 3, 5, 8], [1, 2]) if (k - 1) * d + 1 >= s]
    for kernel, stride, dilation in combos:
        torch.manual_seed(kernel * 100 + stride * 10 + dilation)
        conv = StreamingConv1d(3, 5, kernel, stride=stride, dilation=dilation, bias=bias).eval().double()
        for length in (stride * 7 + 2, (kernel - 1) * dilation + 1):  # many outputs; exactly one output
            x = torch.randn(3, 3, length, dtype=torch.float64)
            with torch.no_grad():
                offline = conv(x)
                padded = torch.nn.functional.pad(x, ((kernel - 1) * dilation + 1 - stride, 0))
                reference = torch.nn.functional.conv1d(padded, conv.conv.weight, conv.conv.bias, stride=stride, dilation=dilation)
                torch.testing.assert_close(offline, reference, atol=1e-12, rtol=0)
                for sizes in CHUNKINGS:
                    torch.testing.assert_close(run_chunked(conv, x, sizes), offline, atol=1e-12, rtol=0)


@pytest.mark.parametrize("cutoff", [20.0, 50.0, 120.0])
def test_high_pass_is_the_first_order_recursion_and_streams_exactly(cutoff):
    """y[n] = x[n] - x[n-1] + a y[n-1], computed in closed-form blocks: the recursion itself (a loop here), offline and
    for every chunking; DC is removed and a 1 kHz tone passes."""
    import math

    torch.manual_seed(int(cutoff))
    hp = StreamingHighPass(cutoff, 16000).double()
    x = torch.randn(2, 1, 700, dtype=torch.float64) + torch.tensor([0.5, -0.2], dtype=torch.float64).view(2, 1, 1)
    expected = torch.zeros_like(x)
    previous_in = previous_out = torch.zeros(2, 1, dtype=torch.float64)
    for n in range(x.shape[-1]):
        previous_out = x[..., n] - previous_in + hp.a * previous_out
        previous_in = x[..., n]
        expected[..., n] = previous_out
    with torch.no_grad():
        offline = hp(x)
        torch.testing.assert_close(offline, expected, atol=1e-12, rtol=0)
        for sizes in CHUNKINGS:
            torch.testing.assert_close(run_chunked(hp, x, sizes), offline, atol=1e-12, rtol=0)
        t = torch.arange(16000, dtype=torch.float64) / 16000
        dc = hp(torch.ones(1, 1, 16000, dtype=torch.float64))
        assert dc[..., -100:].abs().max() < 1e-6  # a constant offset decays away
        tone = hp(torch.sin(2 * math.pi * 1000 * t).view(1, 1, -1))
        assert abs(tone[..., 8000:].abs().max().item() - 1.0) < 0.01  # speech frequencies pass


def test_high_pass_cutoff_must_be_a_frequency():
    with pytest.raises(ValueError, match="cutoff"):
        StreamingHighPass(9000.0, 16000)
    with pytest.raises(ValueError, match="cutoff"):
        StreamingHighPass(0.0, 16000)


@pytest.mark.parametrize("kernel,stride", [(k, s) for k, s in itertools.product([1, 2, 4, 6, 9, 16], [1, 2, 3, 4, 8]) if k >= s])
def test_conv_transpose_streaming_equals_offline(kernel, stride):
    torch.manual_seed(kernel * 10 + stride)
    convtr = StreamingConvTranspose1d(3, 2, kernel, stride=stride).eval()
    torch.nn.init.normal_(convtr.bias)
    x = torch.randn(2, 3, 23)
    with torch.no_grad():
        offline = convtr(x)
        assert offline.shape[-1] == x.shape[-1] * stride
        for sizes in [[1], [2], [4, 1], [5], [100]]:
            torch.testing.assert_close(run_chunked(convtr, x, sizes), offline, atol=1e-6, rtol=0)


@pytest.mark.parametrize("factory", [lambda: StreamingLSTM(8, 2), lambda: StreamingTransformer(8, 2, 2, context=5)],
                         ids=["lstm", "transformer"])
def test_bottlenecks_stream_exactly_and_match_training_path(factory):
    torch.manual_seed(0)
    module = factory()
    x = torch.randn(2, 8, 17)
    with torch.no_grad():
        module.train()
        parallel = module(x)  # the fast whole-sequence path used in training
        module.eval()
        offline = module(x)
        torch.testing.assert_close(offline, parallel, atol=1e-5, rtol=0)
        for sizes in [[1], [3], [4, 1, 6], [17]]:
            assert torch.equal(run_chunked(module, x, sizes), offline)  # bitwise: codes downstream must not flip


@pytest.mark.parametrize("factory", [lambda: StreamingLSTM(8, 2), lambda: StreamingLSTM(8, 1),
                                     lambda: StreamingTransformer(8, 2, 2, context=5)],
                         ids=["lstm2", "lstm1", "transformer"])
def test_bottleneck_started_as_identity_passes_input_through_and_still_learns(factory):
    torch.manual_seed(0)
    module = factory()
    module.start_as_identity()
    x = torch.randn(2, 8, 9)
    with torch.no_grad():
        module.eval()
        assert torch.equal(module(x), x)
    module.train()
    out = module(x)
    assert torch.equal(out, x)
    (out * torch.randn_like(out)).sum().backward()
    grads = [p.grad for p in module.parameters() if p.grad is not None]
    assert grads and max(float(g.abs().max()) for g in grads) > 0  # not a dead end: training can move it


def test_transformer_context_is_bounded():
    torch.manual_seed(0)
    module = StreamingTransformer(8, 1, 2, context=4).eval()
    x = torch.randn(1, 8, 12)
    y = torch.randn(1, 8, 12)
    y[..., 8:] = x[..., 8:]  # same last 4 frames, different history
    with torch.no_grad():
        # frame 11 sees frames 8..11 only, so its output cannot depend on what came before
        torch.testing.assert_close(module(x)[..., 11], module(y)[..., 11], atol=1e-6, rtol=0)
        assert not torch.allclose(module(x)[..., 8], module(y)[..., 8])


def _stateful_net():
    from neurocodec.codecs.streaming import StreamingContainer

    class Net(StreamingContainer):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(
                StreamingHighPass(20.0, 16000), StreamingConv1d(1, 4, 7), torch.nn.ELU(), StreamingConv1d(4, 4, 4, stride=2),
                StreamingConvTranspose1d(4, 4, 4, stride=2), StreamingLSTM(4, 1),
                StreamingConv1d(4, 8, 2, stride=2), StreamingTransformer(8, num_layers=1, num_heads=2, context=3))

        def forward(self, x):
            return self.body(x)

    return Net().eval()


def _states(model):
    return [{name: getattr(m._streaming_state, name).clone() for name in m._streaming_state.tensor_fields()}
            for m in model._streaming_modules()]


def _check_random_sessions(model, step, seed):
    """Drive 6 sessions frame by frame, a random subset (in random order) stepping each time through
    `step(chosen, chunks) -> outputs`; each session's output must equal its offline output, and the state of
    the sessions that did not step must stay bitwise the same."""
    torch.manual_seed(seed)
    frame, n_frames, slots = 4, 10, 6
    signals = torch.randn(slots, 1, frame * n_frames)
    with torch.no_grad():
        expected = [model(signals[b:b + 1]) for b in range(slots)]
        rng = random.Random(seed)
        produced = [[] for _ in range(slots)]
        position = [0] * slots
        with model.streaming(slots):
            while min(position) < n_frames:
                chosen = [b for b in range(slots) if position[b] < n_frames and rng.random() < 0.5]
                rng.shuffle(chosen)
                if not chosen:
                    continue
                before = _states(model)
                chunks = [signals[b:b + 1, :, position[b] * frame:(position[b] + 1) * frame] for b in chosen]
                outputs = step(chosen, chunks)
                after = _states(model)
                for b in set(range(slots)) - set(chosen):
                    assert all(torch.equal(a[k][b], o[k][b]) for a, o in zip(after, before) for k in a)
                for b, out in zip(chosen, outputs):
                    produced[b].append(out)
                    position[b] += 1
        for b in range(slots):
            torch.testing.assert_close(torch.cat(produced[b], dim=-1), expected[b], atol=1e-6, rtol=0)


def test_exec_mask_keeps_state_and_sessions_are_independent():
    """One step over the whole batch; items outside the mask are fed zeros and keep their state."""
    model = _stateful_net()

    def step(chosen, chunks):
        mask = torch.zeros(6, dtype=torch.bool)
        mask[chosen] = True
        model.set_exec_mask(mask)
        batch = torch.zeros(6, 1, chunks[0].shape[-1])
        batch[chosen] = torch.cat(chunks)
        out = model(batch)
        return [out[b:b + 1] for b in chosen]

    _check_random_sessions(model, step, seed=1)


def test_selected_sessions_step_alone_and_equal_offline():
    """A server steps only the sessions with input: compact batches of chosen slots, the rest untouched."""
    model = _stateful_net()

    def step(chosen, chunks):
        with model.select_sessions(torch.tensor(chosen)):
            out = model(torch.cat(chunks))
        assert out.shape[0] == len(chosen)  # the step ran on the chosen sessions only
        return [out[i:i + 1] for i in range(len(chosen))]

    _check_random_sessions(model, step, seed=3)


def test_selected_step_that_fails_changes_no_session():
    torch.manual_seed(4)
    model = _stateful_net()
    with torch.no_grad(), model.streaming(3):
        model(torch.randn(3, 1, 8))
        before = _states(model)
        with pytest.raises(ZeroDivisionError):
            with model.select_sessions(torch.tensor([2, 0])):
                model(torch.randn(2, 1, 4))  # every module has stepped ...
                1 / 0  # ... when the step fails
        with pytest.raises(StreamingShapeError, match="whole frames"):
            with model.select_sessions(torch.tensor([1])):
                model(torch.randn(1, 1, 3))  # a part of a frame would change buffer lengths
        after = _states(model)
        assert all(torch.equal(a[k], o[k]) for a, o in zip(after, before) for k in a)
        with model.select_sessions(torch.tensor([1])):  # and the model still steps afterwards
            assert model(torch.randn(1, 1, 4)).shape[0] == 1


def test_reset_restarts_only_chosen_sessions():
    torch.manual_seed(2)
    conv = StreamingConv1d(1, 2, 5).eval()
    x = torch.randn(2, 1, 10)
    with torch.no_grad(), conv.streaming(2):
        conv(x)
        conv.reset_streaming(torch.tensor([True, False]))
        after = conv(x)
    fresh = conv(x)
    torch.testing.assert_close(after[0], fresh[0], atol=1e-6, rtol=0)  # session 0 starts again from silence
    assert not torch.allclose(after[1], fresh[1])  # session 1 still remembers its past


def test_masked_step_with_partial_frames_is_refused():
    conv = StreamingConv1d(1, 1, 4, stride=2)
    with conv.streaming(2):
        conv.set_exec_mask(torch.tensor([True, False]))
        with pytest.raises(StreamingShapeError):
            conv(torch.zeros(2, 1, 3))  # 3 samples leave a half window: buffer length would change


def test_exec_mask_is_a_snapshot():
    """Editing the tensor passed to set_exec_mask afterwards changes nothing: the layers step by the mask as it
    was set (their host-side all-execute flag and the mask tensor must not disagree)."""
    conv = StreamingConv1d(1, 1, 3)
    x = torch.randn(2, 1, 4)
    with conv.streaming(2):
        initial = conv._streaming_state.previous.clone()
        mask = torch.tensor([True, False])
        conv.set_exec_mask(mask)
        mask[1] = True
        conv(x)
        state = conv._streaming_state.previous
        assert torch.equal(state[1], initial[1])  # session 1 was masked when the mask was set: it kept its state
        assert not torch.equal(state[0], initial[0])
