"""Stream-start priming: what each side of a codec is fed before a stream's first frame.

Why: a causal encoder and decoder begin every stream from zero state, as if the stream were preceded by silence.
When it opens on sound (a microphone on room noise, a stream cut mid-utterance), the first encoder frame sees a step
from silence to the signal, and trained models turn that step into a click: the shipped model's first frame came out
+12 / +17 dB over -40 / -30 dBFS noise, and streams opened mid-utterance +5 to +11 dB on average (up to +21); a few
thousand steps of fine-tuning with a PESQ loss pushed it to +30-40 dB (docs/default_model/heldout_speakers.md, day
26). Priming both sides on a stand-in for the missing past removes it (day 27: no start above +6 dB):

  encoder: the stream's first frame reversed in time, then the stream; the code of the stand-in is dropped. The
           mirror joins the first sample without a step and has the first frame's level and spectrum.
  decoder: the stream's first code frame, then the codes; the stand-in's audio is dropped.

Both stand-ins are made from input that the first step has anyway, so priming adds no token and no latency (the
first code still comes out when the first frame is complete). It costs one extra frame of compute per stream.

Offline `encode` / `decode` prime the same way, so streaming == offline still holds exactly. Where the stand-in is
run depends on the path:
  * `Codec.encode_step` / `decode_step` (any chunking) prime by themselves, with the per-session `StreamStart` state
    below (has the session started; samples held until its first frame is whole);
  * the server's batcher and the ONNX runner step whole frames with the unprimed `encode_frames` /
    `decode_frames`, and run the stand-in themselves on a session's first step, with `stand_in` below.

Training primes its crops the same way (`Codec.forward` through `encoder_offline` / `decoder_offline`). A crop that
starts from zero state gives the model a frame it can tell apart, and the PESQ loss learnt to put a loud burst there,
which PESQ-WB scores higher (day 27: +0.23 on gcin_3 after 4,000 steps). Priming makes the start harder to tell
apart, not impossible (the stand-ins are a mirrored frame and a repeated code): with primed crops the same recipe
left the start quiet for 2,000 steps but had grown it back to +17 dB on -30 dBFS noise by 4,000. So the PESQ loss
also skips each crop's first 60 ms (`LossConfig.pesq_skip_ms`, day 28: the start then stayed within +2 dB through
4,800 steps). Watch `valid/stream_start_overshoot_db` when training with a PESQ loss.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .streaming import StreamingModule, StreamingShapeError, StreamingState

MODES = ("mirror", "none")  # model.stream_start: "none" = zero state (codecs trained or exported before day 27)


def stand_in(kind: str, first: torch.Tensor, frame_size: int) -> torch.Tensor:
    """The input that primes a stream: for "encode", the first frame of audio [..., >= frame_size] reversed in time;
    for "decode", the first frame of codes [..., K, >= 1]."""
    if kind == "encode":
        return first[..., :frame_size].flip(-1)
    if kind == "decode":
        return first[..., :1]
    raise ValueError(f"kind must be 'encode' or 'decode', not {kind!r}")


def with_stand_in(kind: str, x: torch.Tensor, frame_size: int) -> torch.Tensor:
    """Offline priming: the stand-in followed by the whole input (whose output then loses its first frame)."""
    return torch.cat([stand_in(kind, x, frame_size), x], dim=-1)


@dataclass
class _StreamStartState(StreamingState):
    started: torch.Tensor  # bool [B]: the session's stand-in has been run
    held: torch.Tensor  # [B, 1, h]: audio of a session whose first frame is not yet whole (encoder side only)


class StreamStart(StreamingModule):
    """Per-session stream-start bookkeeping inside an encoder's or decoder's streaming context (no weights), so
    that `reset_streaming`, `select_sessions` and execution masks treat it like every other layer's state."""

    in_frame_steps = False  # whole-frame steps (ONNX graphs, traced served steps) do not carry this state

    def __init__(self, kind: str, frame_size: int) -> None:
        super().__init__()
        self.kind = kind
        self.frame_size = frame_size
        self.unit = frame_size if kind == "encode" else 1  # input units per frame: samples or code frames

    def _init_streaming_state(self, batch_size: int) -> _StreamStartState:
        return _StreamStartState(exec_mask=self._new_exec_mask(batch_size),
                                 started=torch.zeros(batch_size, dtype=torch.bool),
                                 held=torch.zeros(batch_size, 1, 0))

    def held_samples(self) -> int:
        """Samples held back for sessions whose first frame is not whole yet (the same for all of them)."""
        return int(self._streaming_state.held.shape[-1])

    def step(self, x: torch.Tensor, run, owner: StreamingModule, empty=None) -> torch.Tensor:
        """`run(x)` after priming the executing sessions that have not started. `run` is the unprimed streaming step
        (`Codec.encode_frames` / `decode_frames`); `owner` the encoder or decoder, whose execution mask limits the
        stand-in to the starting sessions when others in the batch are running; `empty()` (encoder side) the output
        of a step that completes no frame, while a first frame is still held."""
        state = self._streaming_state
        if state is None:
            raise RuntimeError(f"{self.kind}_step() called outside a streaming context")
        starting = state.exec_mask.cpu() & ~state.started
        if not bool(starting.any()):
            return run(x)
        everyone = state.all_execute and bool(starting.all())
        if self.kind == "encode" and (state.held.shape[-1] or x.shape[-1] < self.unit):
            if not everyone:
                raise StreamingShapeError(
                    "a session that starts beside running ones (or under an execution mask) must bring its whole "
                    "first frame in its first step: priming needs that frame (feed whole frames, or start all "
                    "sessions together)")
            x = torch.cat([state.held.to(x), x], dim=-1)
            if x.shape[-1] < self.unit:  # hold on until the first frame is whole
                state.held = x
                return empty()
            state.held = x.new_zeros(x.shape[0], 1, 0)
        elif x.shape[-1] < self.unit:
            return run(x)  # no code frame: nothing to prime with yet
        prime = stand_in(self.kind, x, self.frame_size)
        if everyone:
            run(prime)
        else:  # only the starting sessions take the stand-in; the others keep their state
            previous = state.exec_mask.clone()
            owner.set_exec_mask(starting)
            try:
                run(prime)
            finally:
                owner.set_exec_mask(previous)
        state.started = state.started | starting
        return run(x)

