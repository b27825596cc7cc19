"""`neurocodec serve | stream | stream-decode | loadtest`."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import numpy as np

from ..config import DEFAULT_MODEL
from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="run the streaming gRPC codec service")
    p.add_argument("--model", action="append", default=None,
                   help="`default` (the pretrained model shipped with the package), a checkpoint or config[:preset]; "
                        "repeat for several models (the first is the server's default; default: default)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--max-streams", type=int, default=64, help="session slots per model and direction (default 64)")
    p.add_argument("--no-batching", action="store_true",
                   help="step sessions one by one instead of in one batched call (for comparison benchmarks)")
    p.add_argument("--eager-steps", action="store_true",
                   help="run batched steps operator by operator instead of as traced graphs (for comparison)")
    p.add_argument("--float32", action="store_true",
                   help="run the encoder in float32: faster on CPU (~1.5x per batched step of 32 streams, default "
                        "model), but a token may then differ from `neurocodec encode` where two code vectors are "
                        "within rounding of each other")
    p.add_argument("--auth-token", default=None, help="require 'authorization: Bearer TOKEN' metadata")
    p.add_argument("--tls-cert", default=None, help="PEM certificate chain (enables TLS, with --tls-key)")
    p.add_argument("--tls-key", default=None, help="PEM private key")
    p.add_argument("--max-message-bytes", type=int, default=4 << 20, help="largest request message (default 4 MiB)")
    p.add_argument("--idle-timeout", type=float, default=30.0, help="seconds without a client message before a session ends")
    p.add_argument("--max-session", type=float, default=3600.0, help="maximum session duration in seconds")
    p.add_argument("--grace", type=float, default=30.0, help="seconds running sessions get to finish on SIGTERM")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: more make the small batched steps slower, as their "
                        "idle threads spin on the cores the event loop needs; 0: torch's choice)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("stream", help="stream a file or the microphone to a server; save the tokens")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("input", nargs="?", help="audio file")
    src.add_argument("--mic", action="store_true", help="record from the default microphone (Ctrl-C stops)")
    _client_args(p)
    p.add_argument("-o", "--output", required=True, help="codes file (.npy, int32 [K, T], as `neurocodec encode`)")
    p.add_argument("--realtime", action="store_true", help="pace a file at real time (default: as fast as possible)")
    p.add_argument("--chunk-ms", type=float, default=20.0, help="audio per message (default 20 ms)")
    p.add_argument("--num-codebooks", type=int, default=0, help="codebooks per frame (default: all)")
    p.add_argument("--seconds", type=float, default=None, help="with --mic: stop after this many seconds")
    p.set_defaults(func=cmd_stream)

    p = sub.add_parser("stream-decode", help="stream codes (.npy) to a server; save (or play) the audio")
    p.add_argument("input", help="codes file (.npy, integer [K, T])")
    _client_args(p)
    p.add_argument("-o", "--output", default=None, help="audio file to write")
    p.add_argument("--play", action="store_true", help="play the audio as it arrives (sounddevice)")
    p.add_argument("--frames-per-message", type=int, default=1)
    p.set_defaults(func=cmd_stream_decode)

    p = sub.add_parser("loadtest", help="N real-time streams against a local server: per-frame latency percentiles")
    _client_args(p, default_server="127.0.0.1:50051")
    p.add_argument("--streams", type=int, default=16)
    p.add_argument("--seconds", type=float, default=10.0, help="audio per stream (paced at real time)")
    p.add_argument("--chunk-ms", type=float, default=20.0)
    p.add_argument("--find-max", action="store_true", help="search the largest N meeting --p99-ms")
    p.add_argument("--p99-ms", type=float, default=20.0, help="latency target for --find-max (default 20 ms)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_loadtest)


def _client_args(p: argparse.ArgumentParser, default_server: str | None = None) -> None:
    p.add_argument("--server", required=default_server is None, default=default_server, help="HOST:PORT")
    p.add_argument("--model", default="", help="model name on the server (default: the server's default)")
    p.add_argument("--auth-token", default=None, help="bearer token")
    p.add_argument("--tls", action="store_true", help="use TLS with the system's root certificates")
    p.add_argument("--tls-ca", default=None, help="PEM root certificate to trust (implies --tls)")


def _client(args):
    from .client import CodecClient

    return CodecClient(args.server, token=args.auth_token, tls_root=args.tls_ca, tls=args.tls)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import ServerOptions, serve_forever, setup_logging

    setup_logging(args.log_level)
    if bool(args.tls_cert) != bool(args.tls_key):
        raise UserError("TLS needs both --tls-cert and --tls-key")
    if args.max_streams < 1:
        raise UserError("--max-streams must be at least 1")
    options = ServerOptions(models=args.model or [DEFAULT_MODEL], host=args.host, port=args.port,
                            max_streams=args.max_streams, batching=not args.no_batching, auth_token=args.auth_token,
                            tls_cert=args.tls_cert, tls_key=args.tls_key, max_message_bytes=args.max_message_bytes,
                            idle_timeout_s=args.idle_timeout, max_session_s=args.max_session, grace_s=args.grace,
                            torch_threads=args.threads, exact_encoding=not args.float32,
                            traced_steps=not args.eager_steps)
    try:
        asyncio.run(serve_forever(options))
    except OSError as err:
        raise UserError(f"cannot serve on {args.host}:{args.port}: {err}") from None
    return 0


def _sounddevice():
    try:
        import sounddevice
    except (OSError, ImportError) as err:  # the module loads PortAudio at import time
        raise UserError(f"microphone/speaker support needs the sounddevice package and the PortAudio library "
                        f"(apt-get install libportaudio2): {err}") from None
    return sounddevice


def _file_chunks(path: str, rate: int, chunk_ms: float, realtime: bool):
    from ..audio import load_audio

    audio = load_audio(path, rate)[0].numpy()
    n = max(1, int(round(chunk_ms * rate / 1000)))
    start = time.perf_counter()
    for i in range(0, len(audio), n):
        if realtime:
            delay = start + (i + n) / rate - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
        yield audio[i:i + n]


def _mic_chunks(rate: int, chunk_ms: float, seconds: float | None):
    import queue

    sd = _sounddevice()
    blocks: queue.Queue = queue.Queue()
    n = max(1, int(round(chunk_ms * rate / 1000)))
    stream = sd.InputStream(samplerate=rate, channels=1, dtype="float32", blocksize=n,
                            callback=lambda data, frames, t, status: blocks.put(data[:, 0].copy()))
    print(f"recording from {sd.query_devices(kind='input')['name']} at {rate} Hz; Ctrl-C stops", file=sys.stderr)
    start = time.perf_counter()
    with stream:
        try:
            while seconds is None or time.perf_counter() - start < seconds:
                yield blocks.get()
        except KeyboardInterrupt:
            return


def cmd_stream(args: argparse.Namespace) -> int:
    if args.mic:
        _sounddevice()  # fail early, before connecting, when there is no audio device support
    elif args.input is None:
        raise UserError("give an audio file or --mic")
    with _client(args) as client:
        info = client.model_info(args.model)
        rate = info.sample_rate_hz
        chunks = (_mic_chunks(rate, args.chunk_ms, args.seconds) if args.mic
                  else _file_chunks(args.input, rate, args.chunk_ms, args.realtime))
        frames = []
        for frame in client.stream_encode(chunks, model=args.model, sample_rate=rate, num_codebooks=args.num_codebooks,
                                          session_id="cli"):
            frames.append(frame.tokens)
            if args.mic:
                print(f"\rframe {frame.index}: {' '.join(map(str, frame.tokens))}    ", end="", file=sys.stderr)
    if args.mic:
        print(file=sys.stderr)
    k = len(frames[0]) if frames else (args.num_codebooks or info.num_codebooks)
    codes = np.stack(frames, axis=1).astype(np.int32) if frames else np.zeros((k, 0), np.int32)
    np.save(args.output, codes)
    print(f"{args.input or 'microphone'}: {codes.shape[0]} codebooks x {codes.shape[1]} frames from "
          f"{args.server} ({info.name}) -> {args.output}")
    return 0


def cmd_stream_decode(args: argparse.Namespace) -> int:
    from ..audio import save_audio
    from ..codecs.commands import load_codes

    if not args.output and not args.play:
        raise UserError("give -o OUT.wav and/or --play")
    if args.play:
        _sounddevice()
    codes = load_codes(args.input)
    player = None
    pieces = []
    with _client(args) as client:
        info = client.model_info(args.model)
        if args.play:
            player = _sounddevice().OutputStream(samplerate=info.sample_rate_hz, channels=1, dtype="float32")
            player.start()
        try:
            frames = (codes[:, t] for t in range(codes.shape[1]))
            for audio in client.stream_decode(frames, args.frames_per_message, model=args.model,
                                              num_codebooks=codes.shape[0]):
                pieces.append(audio)
                if player is not None:
                    player.write(audio.reshape(-1, 1))
        finally:
            if player is not None:
                player.stop()
                player.close()
    audio = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
    if args.output:
        import torch

        save_audio(args.output, torch.from_numpy(audio), info.sample_rate_hz)
    print(f"{args.input}: {codes.shape[0]} codebooks x {codes.shape[1]} frames -> {len(audio) / info.sample_rate_hz:.2f} s "
          f"from {args.server}" + (f" -> {args.output}" if args.output else ""))
    return 0


def cmd_loadtest(args: argparse.Namespace) -> int:
    from .loadtest import check_loopback, find_max, result_dict, run_load

    check_loopback(args.server)
    kw = dict(chunk_ms=args.chunk_ms, model=args.model, token=args.auth_token, tls_root=args.tls_ca)

    def show(r):
        if not args.json:
            print(f"streams={r.streams:4d}  p50={r.p50_ms:7.2f} ms  p90={r.p90_ms:7.2f} ms  p99={r.p99_ms:7.2f} ms  "
                  f"audio/wall={r.audio_s_per_wall_s:6.1f}  rejected={r.rejected}  failed={r.failed}", flush=True)

    if args.find_max:
        best, runs = asyncio.run(find_max(args.server, args.p99_ms, args.seconds, progress=show, **kw))
        if args.json:
            print(json.dumps({"p99_target_ms": args.p99_ms, "max_streams": best, "runs": [result_dict(r) for r in runs]},
                             indent=2))
        else:
            print(f"largest N with p99 <= {args.p99_ms:g} ms and no rejected/failed streams: {best}")
        return 0
    result = asyncio.run(run_load(args.server, args.streams, args.seconds, **kw))
    if args.json:
        print(json.dumps(result_dict(result), indent=2))
    else:
        show(result)
        for err in result.errors:
            print(f"  error: {err}")
    return 0
