"""Load generator: N real-time-paced StreamEncode sessions against a server on this machine.

Per-frame latency = arrival time of the frame's tokens minus the time the frame's last sample was sent
(the Riva perf-client definition): the algorithmic frame latency (waiting for the frame to fill) is not
included, only what the server and the network add. Reported: p50/p90/p99 over all frames of all
streams, audio seconds encoded per wall second, and rejected (RESOURCE_EXHAUSTED) / failed streams.

Only loopback targets are accepted: this tool generates load, and it must never be pointed at
somebody else's server by accident.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import socket
import time
from dataclasses import asdict, dataclass, field

import grpc
import numpy as np

from ..errors import UserError
from .client import AsyncCodecClient, ServiceError


def check_loopback(target: str) -> None:
    host = target.rsplit(":", 1)[0].strip("[]")
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except socket.gaierror as err:
        raise UserError(f"cannot resolve {host!r}: {err}") from None
    if not addresses or not all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addresses):
        raise UserError(f"loadtest only targets this machine (127.0.0.1 / localhost / ::1); {host!r} is not loopback")


def speechlike_signal(seconds: float, sample_rate: int, seed: int) -> np.ndarray:
    """A speech-like signal (harmonic glide + noise bursts), different per stream."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(seconds * sample_rate))) / sample_rate
    f0 = 110 + 80 * rng.random() + 50 * np.sin(2 * np.pi * (0.5 + rng.random()) * t)
    phase = 2 * np.pi * np.cumsum(f0) / sample_rate
    voiced = sum(np.sin(k * phase) / k for k in range(1, 8))
    envelope = (np.sin(2 * np.pi * (1.5 + rng.random()) * t) > -0.3)
    return (0.25 * voiced * envelope + 0.03 * rng.standard_normal(len(t))).astype(np.float32)


@dataclass
class LoadResult:
    streams: int
    seconds: float
    chunk_ms: float
    frames: int = 0
    p50_ms: float = float("nan")
    p90_ms: float = float("nan")
    p99_ms: float = float("nan")
    max_ms: float = float("nan")
    audio_s_per_wall_s: float = 0.0
    rejected: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def ok(self, p99_ms: float) -> bool:
        return self.rejected == 0 and self.failed == 0 and self.frames > 0 and self.p99_ms <= p99_ms


async def _one_stream(client: AsyncCodecClient, loop_audio: np.ndarray, total: int, rate: int, frame_size: int,
                      chunk: int, start_at: float, latencies: list, model: str) -> int:
    """Send `total` samples (`loop_audio` repeated) paced at real time from `start_at`; returns frames received."""
    n_chunks = -(-total // chunk)
    sent_at = np.full(n_chunks, np.nan)
    # Chunks are cut from the loop (repeated so that any chunk fits without wrapping logic).
    source = np.concatenate([loop_audio, loop_audio[: chunk]])

    async def chunks():
        for i in range(n_chunks):
            delay = start_at + (i + 1) * chunk / rate - time.perf_counter()
            if delay > 0:  # the chunk's last sample "exists" only at this wall time
                await asyncio.sleep(delay)
            sent_at[i] = time.perf_counter()
            start = (i * chunk) % len(loop_audio)
            yield source[start: start + min(chunk, total - i * chunk)]

    full_frames = total // frame_size  # the flushed partial frame is not timed
    got = 0
    async for frame in client.stream_encode(chunks(), sample_rate=rate, model=model, session_id="loadtest"):
        now = time.perf_counter()
        got += 1
        if frame.index < full_frames:
            last_chunk = ((frame.index + 1) * frame_size - 1) // chunk
            latencies.append(now - sent_at[last_chunk])
    return got


async def run_load(target: str, streams: int, seconds: float, chunk_ms: float = 20.0, model: str = "",
                   token: str | None = None, tls_root: str | None = None, ramp_s: float = 0.5) -> LoadResult:
    check_loopback(target)
    gc.freeze()  # what exists now outlives the run: keep full collections (stalls of every stream) short
    result = LoadResult(streams=streams, seconds=seconds, chunk_ms=chunk_ms)
    client = AsyncCodecClient(target, token=token, tls_root=tls_root)
    try:
        info = await client.model_info(model)
        rate, frame_size = info.sample_rate_hz, info.frame_size
        chunk = max(1, int(round(chunk_ms * rate / 1000)))
        latencies: list[float] = []
        total = int(seconds * rate)
        # A few seconds of signal per stream, looped: memory stays small for long (soak) runs. Made before the
        # clock starts (~6 ms per stream), or the first streams would start late and send their first chunks
        # in one burst.
        loop_len = max(chunk, min(total, 4 * rate) // chunk * chunk)
        signals = [speechlike_signal(loop_len / rate, rate, seed=i) for i in range(streams)]
        t0 = time.perf_counter() + 0.2
        # Streams start spread over `ramp_s` (a frame's worth of phase offsets), as real clients would.
        tasks = [asyncio.create_task(_one_stream(client, signal, total, rate, frame_size, chunk,
                                                 t0 + ramp_s * i / max(streams, 1), latencies, model))
                 for i, signal in enumerate(signals)]
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        wall = time.perf_counter() - t0
    finally:
        await client.close()
    for outcome in outcomes:
        if isinstance(outcome, ServiceError) and outcome.code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            result.rejected += 1
        elif isinstance(outcome, BaseException):
            result.failed += 1
            if len(result.errors) < 5:
                result.errors.append(str(outcome))
        else:
            result.frames += outcome
    if latencies:
        ms = np.asarray(latencies) * 1000.0
        result.p50_ms, result.p90_ms, result.p99_ms = (float(np.percentile(ms, q)) for q in (50, 90, 99))
        result.max_ms = float(ms.max())
    result.audio_s_per_wall_s = result.frames * frame_size / rate / wall
    return result


async def find_max(target: str, p99_ms: float, seconds: float, chunk_ms: float = 20.0, model: str = "",
                   token: str | None = None, tls_root: str | None = None, start: int = 1, limit: int = 1024,
                   progress=None) -> tuple[int, list[LoadResult]]:
    """Largest N whose p99 latency <= p99_ms with no rejected/failed stream: doubling, then bisection."""
    runs: list[LoadResult] = []

    async def ok(n: int) -> bool:
        r = await run_load(target, n, seconds, chunk_ms, model, token, tls_root)
        runs.append(r)
        if progress:
            progress(r)
        return r.ok(p99_ms)

    good, bad = 0, None
    n = start
    while n <= limit:
        if await ok(n):
            good, n = n, n * 2
        else:
            bad = n
            break
    if bad is None:
        return good, runs
    while bad - good > max(1, good // 16):  # ~6% resolution is plenty for a noisy measurement
        mid = (good + bad) // 2
        if await ok(mid):
            good = mid
        else:
            bad = mid
    return good, runs


def result_dict(result: LoadResult) -> dict:
    return asdict(result)
