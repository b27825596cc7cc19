"""Wire formats: audio bytes <-> float32 samples, token frames <-> code tensors, and the streaming resampler.

Everything a client sends is checked here and turned into numpy arrays; a problem raises `ServeError`
carrying the gRPC status the server answers with.
"""

from __future__ import annotations

import math

import grpc
import numpy as np
import torch
import torchaudio.functional as AF

from .v1 import codec_pb2 as pb

MIN_RATE, MAX_RATE = 8000, 48000  # client sample rates we resample from/to (same range as cloud STT APIs)
MAX_CHANNELS = 8
FORMAT_NAMES = {pb.LINEAR16: "LINEAR16", pb.FLOAT32: "FLOAT32"}
BYTES_PER_SAMPLE = {pb.LINEAR16: 2, pb.FLOAT32: 4}


class ServeError(Exception):
    """A request the server refuses: ends the session with `code` and a one-line `message`."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def invalid(message: str) -> ServeError:
    return ServeError(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_rate(rate: int, what: str = "sample_rate_hz") -> None:
    if not MIN_RATE <= rate <= MAX_RATE:
        raise invalid(f"{what}={rate} is not supported: use {MIN_RATE}..{MAX_RATE} Hz "
                      f"(audio is resampled to the model's rate)")


def check_format(fmt: int, allow_unspecified: bool = False) -> int:
    if fmt == pb.SAMPLE_FORMAT_UNSPECIFIED and allow_unspecified:
        return pb.FLOAT32
    if fmt not in FORMAT_NAMES:
        raise invalid(f"sample format {pb.SampleFormat.Name(fmt) if fmt in pb.SampleFormat.values() else fmt} "
                      f"is not supported: use LINEAR16 or FLOAT32")
    return fmt


def check_channels(channels: int) -> int:
    channels = channels or 1
    if not 1 <= channels <= MAX_CHANNELS:
        raise invalid(f"channels={channels} is not supported: use 1..{MAX_CHANNELS} (mixed down to mono)")
    return channels


def bytes_to_audio(data: bytes, fmt: int, channels: int = 1) -> np.ndarray:
    """Mono float32 samples from interleaved little-endian bytes; rejects partial samples and NaN/Inf."""
    width = BYTES_PER_SAMPLE[fmt] * channels
    if len(data) % width:
        raise invalid(f"audio message has {len(data)} bytes, not a whole number of {FORMAT_NAMES[fmt]} samples "
                      f"({width} bytes per sample x channels)")
    if fmt == pb.LINEAR16:
        samples = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    else:
        samples = np.frombuffer(data, dtype="<f4").astype(np.float32)
        if not np.isfinite(samples).all():
            raise invalid("audio contains NaN or Inf samples")
    if channels > 1:
        samples = samples.reshape(-1, channels).mean(axis=1, dtype=np.float32)
    return samples


def audio_to_bytes(samples: np.ndarray, fmt: int) -> bytes:
    """Mono float samples -> little-endian bytes (LINEAR16 clips to [-1, 1))."""
    samples = np.asarray(samples, dtype=np.float32).reshape(-1)
    if fmt == pb.LINEAR16:
        return (np.clip(samples, -1.0, 32767 / 32768) * 32768.0).round().astype("<i2").tobytes()
    return samples.astype("<f4").tobytes()


def frames_to_codes(frames, num_codebooks: int, cardinalities: list[int]) -> np.ndarray:
    """Token frames -> int64 [K, t]; checks the count and range of ids."""
    cols = []
    for frame in frames:
        tokens = np.asarray(frame.tokens, dtype=np.int64)
        if tokens.shape[0] != num_codebooks:
            raise invalid(f"token frame has {tokens.shape[0]} ids; this session sends {num_codebooks} codebooks per frame")
        cols.append(tokens)
    if not cols:
        return np.zeros((num_codebooks, 0), dtype=np.int64)
    codes = np.stack(cols, axis=1)
    check_code_range(codes, cardinalities)
    return codes


def check_code_range(codes: np.ndarray, cardinalities: list[int]) -> None:
    cards = np.asarray(cardinalities[: codes.shape[0]], dtype=np.int64).reshape(-1, 1)
    bad = codes >= cards
    if bad.any():
        k, t = (int(i) for i in np.argwhere(bad)[0])
        raise invalid(f"token id {int(codes[k, t])} in codebook {k} is out of range: codebook {k} has "
                      f"{int(cards[k, 0])} entries (ids 0..{int(cards[k, 0]) - 1})")


class StreamingResampler:
    """torchaudio's sinc resampler (`torchaudio.functional.resample`, default filter) run chunk by chunk.

    Offline, output block i (n_out samples per n_in input samples, after dividing the rates by their gcd)
    is a dot product of the kernel with input samples [i*n_in - width, i*n_in + width + n_in). We keep
    the input from `width` samples before the next block, emit every block whose whole support has
    arrived, and at `flush()` pad the end with zeros as the offline function does. The output therefore
    equals `resample(whole_input)` (within float rounding, ~1e-6) for any chunking, at the cost of
    `width + n_in` input samples of extra latency (< 1 ms at common rates).
    """

    def __init__(self, orig: int, new: int, lowpass_filter_width: int = 6, rolloff: float = 0.99) -> None:
        g = math.gcd(orig, new)
        self.orig, self.new = orig, new
        self.n_in, self.n_out = orig // g, new // g
        # Same width as torchaudio's kernel; the context is rounded up to whole blocks.
        base = min(self.n_in, self.n_out) * rolloff
        self.width = math.ceil(lowpass_filter_width * self.n_in / base)
        self.ctx_blocks = -(-self.width // self.n_in)
        self.ctx = self.ctx_blocks * self.n_in
        self.buf = np.zeros(self.ctx, dtype=np.float32)  # offline pads the start with zeros too
        self.buf_start = -self.ctx  # absolute input index of buf[0]
        self.next_block = 0
        self.total_in = 0
        self.emitted = 0

    def _run(self, end_block: int) -> np.ndarray:
        count = end_block - self.next_block
        if count <= 0:
            return np.zeros(0, dtype=np.float32)
        lo = self.next_block * self.n_in - self.ctx - self.buf_start
        hi = end_block * self.n_in + self.width + self.n_in - self.buf_start
        window = torch.from_numpy(np.ascontiguousarray(self.buf[lo:hi]))
        out = AF.resample(window, self.orig, self.new).numpy()
        out = out[self.ctx_blocks * self.n_out: (self.ctx_blocks + count) * self.n_out]
        self.next_block = end_block
        drop = self.next_block * self.n_in - self.ctx - self.buf_start
        self.buf, self.buf_start = self.buf[drop:], self.buf_start + drop
        return out

    def push(self, samples: np.ndarray) -> np.ndarray:
        self.buf = np.concatenate([self.buf, np.asarray(samples, dtype=np.float32)])
        self.total_in += len(samples)
        end = self.buf_start + len(self.buf)
        out = self._run((end - self.width - self.n_in) // self.n_in + 1)
        self.emitted += len(out)
        return out

    def flush(self) -> np.ndarray:
        """End of stream: the remaining output, so that the total is ceil(new * n / orig) samples."""
        target = -(-self.new * self.total_in // self.orig)
        self.buf = np.concatenate([self.buf, np.zeros(self.width + 2 * self.n_in, dtype=np.float32)])
        out = self._run(-(-target // self.n_out))[: max(0, target - self.emitted)]
        self.emitted += len(out)
        return out
