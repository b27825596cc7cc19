"""Session slots and the model worker (the Triton sequence-batcher / Kyutai batched-server pattern).

One codec instance serves every session of a model. Its encoder and decoder stay inside `streaming(max_streams)`
contexts for the server's lifetime; each session owns one batch slot of that state. A single worker thread
repeatedly takes every session that has a whole frame buffered (and room in its output queue), stacks their frames
into one `[ready, 1, frame_size]` batch and runs ONE `encode_frames` step on just those slots (`select_sessions`, as
one traced graph: codecs/traced_steps.py); likewise one `decode_frames` step per distinct codebook count among ready
decode sessions. A step costs what its ready sessions cost, not `max_streams` of them; idle slots keep their state
untouched, a new session's slot is `reset_streaming`-ed before its first step, and a step's outputs go back to the
sessions' event loop in one `call_soon_threadsafe`.

Stream start: the steps are unprimed (`encode_frames` / `decode_frames`), so before a session's first step the
worker runs its stand-in (the first frame reversed; the first code frame) through one batched step of the sessions
that start now and drops that output (codecs/stream_start.py): served codes and audio stay equal to offline ones.

The batch grows with the load by itself: while a step runs, the frames of other sessions arrive, and
the next step takes them all (continuous batching; no timer waits for a batch to fill).

With `batching=False` the worker steps sessions one by one, each with its own batch-1 state swapped into
the modules (what a server without cross-stream batching does) - kept for the benchmark's comparison.

At end of stream the partial last frame is zero-padded and stepped, so streamed codes equal offline
`codec.encode` (which pads the end the same way).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import grpc
import numpy as np
import torch

from ..codecs.stream_start import stand_in
from ..codecs.traced_steps import SelectedStep
from .wire import ServeError

END = object()  # queued after a session's last output


def _deliver_all(items: list) -> None:
    """On a session's event loop: hand each (session, output) of a step to its session."""
    for session, item in items:
        session._deliver(item)


@dataclass
class Session:
    """State shared by a stream's handler (event loop) and the worker (thread); guarded by Worker.lock."""

    kind: str  # "encode" | "decode"
    slot: int
    num_codebooks: int
    loop: asyncio.AbstractEventLoop
    max_outstanding: int
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    pending: list = field(default_factory=list)  # encode: float32 arrays; decode: int64 [K, t] arrays
    pending_len: int = 0  # samples (encode) or frames (decode) buffered
    ended: bool = False  # client half-closed: flush what is left, then END
    finished: bool = False  # END queued
    closed: bool = False  # handler gone: drop outputs
    outstanding: int = 0  # outputs queued and not yet taken by the handler
    next_index: int = 0
    private_state: list | None = None  # batching=False: this session's own module states
    primed: bool = False  # worker thread only: its stream-start stand-in has been stepped
    started: float = field(default_factory=time.monotonic)

    def _deliver(self, item) -> None:
        if not self.closed:
            self.queue.put_nowait(item)


class SlotsFull(ServeError):
    pass


class Worker:
    """Owns one codec's streaming state for `max_streams` encode and `max_streams` decode sessions."""

    def __init__(self, codec, max_streams: int, batching: bool = True, max_outstanding: int = 250,
                 max_frames_per_step: int = 8, traced_steps: bool = True) -> None:
        self.codec = codec
        self.max_streams = max_streams
        self.batching = batching
        self.max_outstanding = max_outstanding
        self.max_frames_per_step = max_frames_per_step
        self.frame_size = codec.frame_size
        self.total_codebooks = codec.total_codebooks
        codec.set_num_codebooks(codec.total_codebooks)  # sessions take a prefix (code order is prefix-stable)
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.slots = {"encode": [None] * max_streams, "decode": [None] * max_streams}
        self.to_reset = {"encode": set(), "decode": set()}
        self.modules = {"encode": codec.encoder, "decode": codec.decoder}
        # Batched steps of the selected sessions, each one TorchScript call (codecs/traced_steps.py says why).
        self.selected_steps = {kind: SelectedStep(codec, kind, traced=traced_steps) for kind in self.modules}
        self.steps = {"encode": 0, "decode": 0}
        self.frames = {"encode": 0, "decode": 0}
        self._stop = False
        self._thread: threading.Thread | None = None
        self._contexts = []
        self.error: BaseException | None = None  # set when the worker thread died; the worker then refuses sessions
        # Called on the worker thread with the error when the worker dies (the server turns NOT_SERVING).
        self.on_failure: Callable[[BaseException], None] | None = None

    # -- lifetime -----------------------------------------------------------------------------------
    def start(self) -> None:
        """Open the streaming contexts, warm the model up (blocking), then start the worker thread."""
        self.open_streams()
        self._thread = threading.Thread(target=self._run, name="neurocodec-worker", daemon=True)
        self._thread.start()

    def open_streams(self) -> None:
        """Open the streaming contexts and warm the model up; `_step` may then be called (tests drive it)."""
        batch = self.max_streams if self.batching else 1
        for module in self.modules.values():
            ctx = module.streaming(batch)
            ctx.__enter__()
            self._contexts.append(ctx)
        with torch.no_grad():  # warm-up: first calls allocate and pick kernels
            for _ in range(3):
                codes = self.codec.encode_frames(torch.zeros(batch, 1, self.frame_size))
                self.codec.decode_frames(codes)
            if self.batching:  # trace the one-frame steps now, not while serving (longer steps reuse them)
                slots = torch.arange(min(2, batch))
                codes = self.selected_steps["encode"](torch.zeros(len(slots), 1, self.frame_size), slots)
                for k in self.codec.allowed_num_codebooks():
                    self.selected_steps["decode"](codes[:, :k], slots)
            for module in self.modules.values():
                module.reset_streaming()

    def stop(self) -> None:
        self._stop = True
        self.wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        for ctx in reversed(self._contexts):
            ctx.__exit__(None, None, None)
        self._contexts.clear()

    # -- sessions (called on the event loop) ------------------------------------------------------------
    def free_slots(self, kind: str) -> int:
        with self.lock:
            return sum(s is None for s in self.slots[kind])

    def failure_message(self) -> str | None:
        """Why this worker takes no sessions (its thread died), or None while it is healthy."""
        if self.error is None:
            return None
        return (f"the model worker failed ({type(self.error).__name__}: {self.error}); this replica no longer "
                "serves: reconnect to another")

    def open(self, kind: str, num_codebooks: int, loop: asyncio.AbstractEventLoop) -> Session:
        with self.lock:  # the same lock as the failure path in _run: a session is either refused or told
            if self.error is not None:
                raise ServeError(grpc.StatusCode.UNAVAILABLE, self.failure_message())
            try:
                slot = self.slots[kind].index(None)
            except ValueError:
                raise SlotsFull(grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"all {self.max_streams} {kind} session slots are busy; retry later") from None
            session = Session(kind, slot, num_codebooks, loop, self.max_outstanding)
            if not self.batching:
                module = self.modules[kind]
                session.private_state = [m._init_streaming_state(1) for m in module._streaming_modules()]
            self.slots[kind][slot] = session
            self.to_reset[kind].add(slot)
        return session

    def close(self, session: Session) -> None:
        with self.lock:
            session.closed = True
            if self.slots[session.kind][session.slot] is session:
                self.slots[session.kind][session.slot] = None

    def push(self, session: Session, data: np.ndarray) -> None:
        with self.lock:
            session.pending.append(data)
            session.pending_len += data.shape[-1]
        self.wake.set()

    def end(self, session: Session) -> None:
        with self.lock:
            session.ended = True
        self.wake.set()

    def taken(self, session: Session, n: int) -> None:
        """The handler took n outputs from the queue: room for more. The worker is woken only when the session had
        no room left (it was being skipped); otherwise every response sent would make the worker scan the slots."""
        with self.lock:
            was_full = session.outstanding >= session.max_outstanding
            session.outstanding -= n
        if was_full:
            self.wake.set()

    def buffered(self, session: Session) -> int:
        with self.lock:
            return session.pending_len

    # -- the worker thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        torch.set_grad_enabled(False)
        try:
            while not self._stop:
                self.wake.wait(timeout=0.1)
                self.wake.clear()
                while not self._stop and (self._step("encode") | self._step("decode")):
                    pass
        except BaseException as err:  # a model failure must not leave sessions hanging forever
            with self.lock:
                self.error = err
                for kind in self.slots:
                    for s in self.slots[kind]:
                        if s is not None:
                            s.loop.call_soon_threadsafe(s._deliver, ServeError(grpc.StatusCode.INTERNAL, f"model worker failed: {err}"))
            if self.on_failure is None:
                raise
            self.on_failure(err)  # the server logs it and turns NOT_SERVING

    def _frames_ready(self, s: Session) -> int:
        """Whole frames a session could step now (caller holds the lock); 0 when it is not ready."""
        if s.closed or s.finished:
            return 0
        room = s.max_outstanding - s.outstanding
        if s.kind == "encode":
            whole = s.pending_len // self.frame_size
            if whole == 0 and s.ended and s.pending_len > 0:
                whole = 1  # end of stream: the partial last frame, zero-padded
        else:
            whole = s.pending_len
        return max(0, min(whole, room))

    def _take_input(self, s: Session, frames: int):
        """Pop `frames` frames of input of a session (caller holds the lock): audio [frames * frame_size]
        for encode (the partial last frame zero-padded, as offline encode pads), codes [K, frames] for decode."""
        if s.kind == "encode":
            want = frames * self.frame_size
            data = np.concatenate(s.pending) if len(s.pending) > 1 else s.pending[0]
            chunk, rest = data[:want], data[want:]
            s.pending = [rest] if rest.size else []
            s.pending_len = rest.size
            if chunk.size < want:
                chunk = np.pad(chunk, (0, want - chunk.size))
            return chunk
        data = np.concatenate(s.pending, axis=1) if len(s.pending) > 1 else s.pending[0]
        chunk, rest = data[:, :frames], data[:, frames:]
        s.pending = [rest] if rest.shape[1] else []
        s.pending_len = rest.shape[1]
        return chunk

    def _step(self, kind: str) -> bool:
        """One batched step over every ready session of `kind`; False when none was ready.

        Every ready session advances by the same number of frames: one in the steady state, more when all
        of them have fallen behind (up to `max_frames_per_step`), so a saturated worker catches up with
        fewer rounds of bookkeeping and deliveries (a traced step still runs one frame per call: traced_steps.py).
        """
        with self.lock:
            resets = sorted(self.to_reset[kind])
            self.to_reset[kind].clear()
            candidates = []
            for s in self.slots[kind]:
                if s is None:
                    continue
                available = self._frames_ready(s)
                if available:
                    candidates.append((s, available))
                elif s.ended and not s.finished and s.pending_len == 0 and not s.closed:
                    s.finished = True
                    s.loop.call_soon_threadsafe(s._deliver, END)
            frames = min([a for _, a in candidates] + [self.max_frames_per_step])
            ready = []
            for s, _ in candidates:
                ready.append((s, self._take_input(s, frames)))
                s.outstanding += frames
        module = self.modules[kind]
        if resets and self.batching:
            mask = torch.zeros(self.max_streams, dtype=torch.bool)
            mask[resets] = True
            module.reset_streaming(mask)
        if not ready:
            return False
        starting = [(s, item) for s, item in ready if not s.primed]
        if starting and self.codec.primes_stream_start:
            # the stand-ins' outputs are dropped: the step only brings the new sessions' states up to their start
            self._step_sessions(kind, [(s, stand_in(kind, torch.from_numpy(item), self.frame_size).numpy())
                                       for s, item in starting])
        for s, _ in starting:
            s.primed = True
        outputs = self._step_sessions(kind, ready)
        self.steps[kind] += 1
        self.frames[kind] += len(ready) * frames
        by_loop: dict[asyncio.AbstractEventLoop, list] = {}
        for (s, _), out in zip(ready, outputs):
            for t in range(frames):  # one output per frame: [K] codes or [frame_size] audio (own copies)
                one = out[:, t] if kind == "encode" else out[t * self.frame_size:(t + 1) * self.frame_size]
                by_loop.setdefault(s.loop, []).append((s, (s.next_index, one.copy())))
                s.next_index += 1
        for loop, items in by_loop.items():  # one wake-up of each event loop per step, not one per frame
            loop.call_soon_threadsafe(_deliver_all, items)
        return True

    def _step_sessions(self, kind: str, ready: list) -> list[np.ndarray]:
        if self.batching:
            return self._batched(kind, ready)
        return [self._single(kind, s, item) for s, item in ready]

    def _batched(self, kind: str, ready: list) -> list[np.ndarray]:
        """Encode: codes [K_session, frames] per session; decode: audio [frames * frame_size] per session."""
        if kind == "encode":
            x = torch.from_numpy(np.stack([item for _, item in ready])).unsqueeze(1)  # [ready, 1, samples]
            codes = self.selected_steps[kind](x, self._slots(ready)).numpy()  # [ready, K, frames]
            return [codes[i, : s.num_codebooks] for i, (s, _) in enumerate(ready)]
        # decode: sessions may use different codebook counts -> one step per count
        results: dict[int, np.ndarray] = {}
        for k in sorted({s.num_codebooks for s, _ in ready}):
            group = [(s, item) for s, item in ready if s.num_codebooks == k]
            codes = torch.from_numpy(np.stack([item for _, item in group]))  # [group, k, frames]
            wav = self.selected_steps[kind](codes, self._slots(group))[:, 0].numpy()  # [group, frames * frame_size]
            for i, (s, _) in enumerate(group):
                results[id(s)] = wav[i]
        return [results[id(s)] for s, _ in ready]

    @staticmethod
    def _slots(ready: list) -> torch.Tensor:
        return torch.tensor([s.slot for s, _ in ready], dtype=torch.long)

    def _single(self, kind: str, s: Session, item: np.ndarray) -> np.ndarray:
        module = self.modules[kind]
        for m, state in zip(module._streaming_modules(), s.private_state):
            m._streaming_state = state  # swap this session's own state in (states are updated in place)
        if kind == "encode":
            return self.codec.encode_frames(torch.from_numpy(item).view(1, 1, -1))[0, : s.num_codebooks].numpy()
        return self.codec.decode_frames(torch.from_numpy(item).unsqueeze(0))[0, 0].numpy()
