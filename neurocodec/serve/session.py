"""One streaming call, StreamEncode or StreamDecode, as the servicer runs it (`server.CodecServicer._stream_call`).

A `StreamSession` says what differs between the two directions: which config fields it checks, how a client
message becomes input for the model worker, and how the worker's outputs become responses. Everything else
(admission, the slot, the client reader with backpressure, limits, logging, cleanup) is the servicer's and is
shared. The worker's per-slot state is `batcher.Session`, held here as `slot`.
"""

from __future__ import annotations

from typing import AsyncIterator, ClassVar

import numpy as np

from .v1 import codec_pb2 as pb
from .wire import (StreamingResampler, audio_to_bytes, bytes_to_audio, check_channels, check_format, check_rate,
                   frames_to_codes)


def _present(data: np.ndarray) -> np.ndarray | None:
    """None for an empty chunk (nothing to push)."""
    return data if data.shape[-1] else None


class StreamSession:
    kind: ClassVar[str]  # the worker's slot kind: "encode" | "decode"
    carries: ClassVar[str]  # the request field of every message after the config: "audio" | "frames"

    def __init__(self, cfg, model, max_buffered_s: float) -> None:
        """Check the call's own config fields (raising ServeError) before any slot is taken."""
        self.cfg, self.model = cfg, model
        self.codec = model.offline
        self.max_buffered_s = max_buffered_s
        self.slot = None  # batcher.Session, once admitted

    @property
    def max_buffered(self) -> int:
        """Input not yet stepped, in the worker's units (samples or frames), beyond which the client is not read."""
        raise NotImplementedError

    def to_input(self, msg) -> np.ndarray | None:
        """A client message -> worker input (None: nothing to push)."""
        raise NotImplementedError

    def flush(self) -> np.ndarray | None:
        """Input still held back when the client half-closes (a resampler's tail)."""
        return None

    def responses(self, batches: AsyncIterator[list]) -> AsyncIterator:
        """Responses for the worker's outputs, a list of (index, output) at a time."""
        raise NotImplementedError


class EncodeSession(StreamSession):
    kind, carries = "encode", "audio"

    def __init__(self, cfg, model, max_buffered_s: float) -> None:
        super().__init__(cfg, model, max_buffered_s)
        check_rate(cfg.sample_rate_hz)
        rate = self.codec.sample_rate
        self.format, self.channels = check_format(cfg.format), check_channels(cfg.channels)
        self.resampler = StreamingResampler(cfg.sample_rate_hz, rate) if cfg.sample_rate_hz != rate else None

    @property
    def max_buffered(self) -> int:
        return int(self.max_buffered_s * self.codec.sample_rate)

    def to_input(self, msg) -> np.ndarray | None:
        samples = bytes_to_audio(msg.audio, self.format, self.channels)
        return _present(self.resampler.push(samples) if self.resampler is not None else samples)

    def flush(self) -> np.ndarray | None:
        return _present(self.resampler.flush()) if self.resampler is not None else None

    async def responses(self, batches):
        frame_rate = self.codec.frame_rate
        async for batch in batches:
            yield pb.StreamEncodeResponse(frames=[
                pb.TokenFrame(index=i, time_offset_s=i / frame_rate, tokens=codes.tolist()) for i, codes in batch])


class DecodeSession(StreamSession):
    kind, carries = "decode", "frames"

    def __init__(self, cfg, model, max_buffered_s: float) -> None:
        super().__init__(cfg, model, max_buffered_s)
        rate = self.codec.sample_rate
        out_rate = cfg.sample_rate_hz or rate
        check_rate(out_rate)
        self.format = check_format(cfg.format, allow_unspecified=True)
        self.resampler = StreamingResampler(rate, out_rate) if out_rate != rate else None

    @property
    def max_buffered(self) -> int:
        return max(1, int(self.max_buffered_s * self.codec.frame_rate))

    def to_input(self, msg) -> np.ndarray | None:
        return _present(frames_to_codes(msg.frames.frames, self.slot.num_codebooks, self.codec.quantizer.cardinalities))

    async def responses(self, batches):
        sample = 0
        async for batch in batches:
            audio = np.concatenate([wav for _, wav in batch])
            if self.resampler is not None:
                audio = self.resampler.push(audio)
            yield pb.StreamDecodeResponse(audio=audio_to_bytes(audio, self.format), first_frame=batch[0][0],
                                          num_frames=len(batch), first_sample=sample)
            sample += audio.size
        if self.resampler is not None:
            tail = self.resampler.flush()
            if tail.size:
                yield pb.StreamDecodeResponse(audio=audio_to_bytes(tail, self.format), first_frame=self.slot.next_index,
                                              num_frames=0, first_sample=sample)
