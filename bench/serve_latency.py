"""Served streams: per-frame latency of the gRPC service vs number of real-time streams, this checkout against
a reference server measured in the same run.

For each N a server (a `neurocodec serve` subprocess with max(N, --slots) session slots, 64 by default as
`neurocodec serve`, so idle slots are part of the measurement) gets N real-time-paced StreamEncode sessions from
`neurocodec.serve.loadtest` in this process; per-frame latency is the time from sending a frame's last sample to
receiving its tokens (what the service adds on top of the one-frame algorithmic latency). Then the largest N with
p99 <= --p99-ms and no rejected/failed stream is searched for both servers.

The reference (--reference) is either the service as it was at a git revision (`rev:REV`, served from a
`git archive` of that revision with this machine's packages; default: the code before batched steps became traced
graphs) or this checkout stepping sessions one by one (`one-by-one`). The load generator shares the machine's cores
with the server, as a real co-located client would.

    python bench/serve_latency.py            # the shipped default model, 1/4/16/64 streams, 5 s each
    python bench/serve_latency.py --reference one-by-one
    python bench/serve_latency.py --quick    # tiny random model, short run: checks the script works
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arg_parser, figure, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# The served code before its batched steps became TorchScript graphs (issue 22's "current code"); its figures on
# 2026-12-04 were 16 real-time streams within p99 20 ms.
DEFAULT_REFERENCE = "rev:a0fdf8f"


def checkout(rev: str, folder: Path) -> Path:
    """The tracked files of `rev` in `folder` (its package is imported from there: PYTHONPATH comes first)."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True)
    if archive.returncode:
        raise SystemExit(f"--reference rev:{rev}: git archive failed ({archive.stderr.decode().strip()}); "
                         "this needs a git checkout with that revision, or use --reference one-by-one")
    subprocess.run(["tar", "-x", "-C", str(folder)], input=archive.stdout, check=True)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(port: int, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.time() + timeout
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.time() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise TimeoutError("server did not become SERVING")


class Served:
    """`neurocodec serve` in a subprocess for the duration of a `with` block."""

    extra_args: list[str] = []  # passed to every server of this run (e.g. --float32)
    slots: int = 64  # session slots at least (a deployed server has more slots than active sessions)

    def __init__(self, model: str, max_streams: int, batching: bool, threads: int | None,
                 code: Path | None = None) -> None:
        """`code`: a folder whose `neurocodec` package serves (a reference revision); None: this checkout."""
        self.port = free_port()
        cmd = [sys.executable, "-m", "neurocodec.cli", "serve", "--model", model, "--port", str(self.port),
               "--max-streams", str(max(max_streams, self.slots)), "--log-level", "warning", "--grace", "2", *self.extra_args]
        if not batching:
            cmd.append("--no-batching")
        if threads:
            cmd += ["--threads", str(threads)]
        self.cmd = cmd
        self.cwd = code or ROOT
        self.env = dict(os.environ, PYTHONPATH=str(code)) if code is not None else None

    def __enter__(self) -> "Served":
        self.proc = subprocess.Popen(self.cmd, cwd=self.cwd, env=self.env, stderr=subprocess.DEVNULL)
        wait_serving(self.port, self.proc)
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()  # SIGTERM: graceful drain
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@dataclass
class Variant:
    """A server to measure: this checkout or a reference (another revision's code, or no batching)."""

    label: str
    batching: bool = True
    code: Path | None = None
    model: str | None = None  # the checkpoint it serves, when not the run's own


def without_input_filter(codec, path: str) -> str:
    """`codec` saved with a config that has no `seanet.input_highpass_hz` (the encoder's input high-pass, day 15),
    which the code of earlier revisions cannot read. The filter has no weights, and a served step costs the same
    with or without it (default model, batch 10: 2.20 against 2.33 ms, within the noise), so the servers still
    compare."""
    import json

    from neurocodec.codecs.checkpoint import config_of, save_codec

    config = config_of(codec)
    config["seanet"].pop("input_highpass_hz", None)
    save_codec(codec, path, metadata={"config": json.dumps(config)})
    return path


def measure(model: str, n: int, variant: Variant, seconds: float, threads: int | None):
    from neurocodec.serve.loadtest import run_load

    with Served(variant.model or model, n, variant.batching, threads, variant.code) as server:
        return asyncio.run(run_load(server.target, n, seconds))


def find_max(model: str, variant: Variant, seconds: float, p99_ms: float, limit: int, threads: int | None,
             known: dict[int, object]) -> int:
    """Doubling then bisection on N (a server sized for each N); reuses the runs already made."""
    def ok(n: int) -> bool:
        r = known.get(n) or measure(model, n, variant, seconds, threads)
        known[n] = r
        print(f"  {variant.label} N={n}: p99 {r.p99_ms:.1f} ms, rejected {r.rejected}, "
              f"failed {r.failed} -> {'ok' if r.ok(p99_ms) else 'over'}"
              + (f" (first errors: {r.errors[:2]})" if r.errors else ""), flush=True)
        return r.ok(p99_ms)

    good, bad, n = 0, None, 1
    while n <= limit:
        if ok(n):
            good, n = n, n * 2
        else:
            bad = n
            break
    if bad is None:
        return good
    while bad - good > max(1, good // 16):
        mid = (good + bad) // 2
        good, bad = (mid, bad) if ok(mid) else (good, mid)
    return good


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="model (default: the shipped default model; --quick: grvq_4cb:tiny)")
    parser.add_argument("--streams", default=None, help="comma-separated N (default 1,4,16,64)")
    parser.add_argument("--seconds", type=float, default=None, help="audio per stream (default 5)")
    parser.add_argument("--slots", type=int, default=64, help="server session slots at least (default 64, as neurocodec serve)")
    parser.add_argument("--p99-ms", type=float, default=20.0)
    parser.add_argument("--find-limit", type=int, default=None, help="largest N tried by the search (default 512)")
    parser.add_argument("--threads", type=int, default=None, help="server torch threads (default: torch's choice)")
    parser.add_argument("--float32", action="store_true", help="serve with a float32 encoder (faster, not exact)")
    parser.add_argument("--reference", default=None,
                        help=f"rev:REV (that revision's served code) or one-by-one (this checkout without batching); "
                             f"default {DEFAULT_REFERENCE} ({{--quick}}: one-by-one)")
    args = parser.parse_args()
    if args.float32:
        Served.extra_args = ["--float32"]
    Served.slots = args.slots
    quick = args.quick
    model = args.model or ("grvq_4cb:tiny" if quick else "default")
    streams = [int(s) for s in (args.streams or ("1,4" if quick else "1,4,16,64")).split(",")]
    seconds = args.seconds or (1.5 if quick else 5.0)
    limit = args.find_limit or (8 if quick else 512)

    # Build the model once and serve it from a checkpoint (so each server restart skips the codebook init).
    from neurocodec.codecs.checkpoint import load_codec, save_codec

    tmp = tempfile.TemporaryDirectory()
    ckpt = str(Path(tmp.name) / "model.safetensors")
    codec = load_codec(model)
    save_codec(codec, ckpt)
    print(f"model {model}: {codec.info()['parameters']:,} parameters, {codec.frame_size} samples/frame; "
          f"{os.cpu_count()} CPUs", flush=True)

    reference_spec = args.reference or ("one-by-one" if quick else DEFAULT_REFERENCE)
    if reference_spec == "one-by-one":
        reference = Variant("same server, sessions stepped one by one", batching=False)
    elif reference_spec.startswith("rev:"):
        rev = reference_spec[4:]
        reference = Variant(f"the served code at revision {rev}", code=checkout(rev, Path(tempfile.mkdtemp(dir=tmp.name))))
        if getattr(codec.config, "seanet", None) is not None and codec.config.seanet.input_highpass_hz:
            reference.model = without_input_filter(codec, str(Path(tmp.name) / "reference.safetensors"))
            reference.label += " (weights without the input high-pass)"
    else:
        raise SystemExit(f"--reference: expected rev:REV or one-by-one, got {reference_spec!r}")
    current = Variant("this checkout")
    print(f"reference: {reference.label}", flush=True)

    runs = {"current": {}, "reference": {}}
    rows, figures = [], []
    for n in streams:
        b = runs["current"][n] = measure(ckpt, n, current, seconds, args.threads)
        u = runs["reference"][n] = measure(ckpt, n, reference, seconds, args.threads)
        print(f"N={n:4d}  this checkout p50 {b.p50_ms:7.2f} p99 {b.p99_ms:7.2f} ms (rej {b.rejected}, fail {b.failed})   "
              f"reference p50 {u.p50_ms:7.2f} p99 {u.p99_ms:7.2f} ms (rej {u.rejected}, fail {u.failed})   "
              f"p99 ratio reference/this {u.p99_ms / b.p99_ms:5.2f}", flush=True)
        rows.append({"streams": n, "current": vars(b), "reference": vars(u)})
        for pct in ("p50", "p99"):
            figures.append(figure(f"{pct} added latency per frame, {n} streams", getattr(b, f"{pct}_ms"), "ms",
                                  reference=reference.label,
                                  reference_value=getattr(u, f"{pct}_ms"), higher_is_better=False,
                                  target="served_p99_latency" if pct == "p99" else None))
    best = {}
    for key, variant in (("current", current), ("reference", reference)):
        best[key] = find_max(ckpt, variant, seconds, args.p99_ms, limit, args.threads, runs[key])
    print(f"largest N with p99 <= {args.p99_ms:g} ms: this checkout {best['current']}, reference {best['reference']} "
          f"(ratio {best['current'] / max(best['reference'], 1):.2f})", flush=True)
    figures.append(figure(f"real-time streams with p99 <= {args.p99_ms:g} ms", best["current"], "streams",
                          reference=reference.label, reference_value=best["reference"] or None,
                          target="served_streams"))
    write_result("serve_latency_float32" if args.float32 else "serve_latency", {
        "title": "Served streams: per-frame latency vs concurrent real-time streams (gRPC, loopback)",
        "figures": figures,
        "params": {"model": model, "encoder": "float32" if args.float32 else "float64 (exact)", "streams": streams, "seconds_per_stream": seconds, "p99_target_ms": args.p99_ms,
                   "chunk_ms": 20, "server_threads": args.threads, "find_limit": limit, "server_slots_at_least": args.slots},
        "rows": rows,
        "reference": reference_spec,
        "max_streams": best,
        "notes": "Latency = tokens received - frame's last sample sent (excludes the 20 ms algorithmic frame). "
                 "Load generator runs on the same cores as the server.",
    }, quick=quick)


if __name__ == "__main__":
    main()
