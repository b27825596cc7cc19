"""Shared helpers for the benchmarks in `bench/` — the one place that defines what a benchmark writes.

The contract (every `bench/<name>.py`):

* it is runnable as `python bench/<name>.py [--quick]`; `--quick` makes a short run (seconds, for checking
  that the script works — the figures are then marked `"quick": true`); without it, a full measurement;
* it prints its figures, each as a ratio against a reference measured **in the same run** (e.g. ours vs
  the reference Encodec with random weights, ours vs Opus);
* it ends with `write_result("<name>", {...})`, which writes `docs/bench/<name>.json`:

    {
      "name": "codec_speed",                  # file stem, set by write_result
      "title": "Codec speed (one CPU thread)",# optional, shown as the section title in BENCHMARKS.md
      "quick": false,                         # set by write_result from --quick (or pass it)
      "date": "2026-11-22T16:30:00+00:00",    # UTC, set by write_result
      "machine": {"processor": ..., "cpu_model": ..., "cpu_count": ..., "platform": ..., "python": ...},
      "versions": {"torch": ..., "torchaudio": ..., "neurocodec": ..., ...},
      "figures": [                            # the numbers BENCHMARKS.md shows, one row each
        {"metric": "encode+decode speed", "value": 180.0, "unit": "x real time",
         "reference": "encodec 24 kHz, random weights", "reference_value": 20.0, "ratio": 9.0,
         "target": "single_stream_speed", "target_text": ">= 50x real time ...", "met": true},
        ...
      ],
      "params": {...},                        # optional: settings of the run (threads, durations, ...)
      "notes": "..."                          # optional free text
    }

  Build the figure rows with `figure(...)`: it computes `ratio` (value / reference_value) and `met`
  against a target, either one of `TARGETS` (the targets table of DESIGN.md) or an explicit
  `(op, value)` pair. Any other keys in the dict are kept and shown as-is; a JSON without `figures`
  is still listed in BENCHMARKS.md (its scalar keys become rows).

`bench/run_all` runs every `bench/*.py` (except this file) and regenerates `docs/BENCHMARKS.md` from
all JSONs in `docs/bench/` (see `neurocodec/eval/benchmarks.py`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "docs" / "bench"

# DESIGN.md "Targets". op compares a figure's value (or its ratio, when "on" is "ratio") with the threshold.
TARGETS: dict[str, dict] = {
    "algorithmic_latency": {"op": "<=", "value": 20.0, "on": "value",
                            "text": "one frame (20 ms for 50 Hz codecs), no lookahead"},
    "streaming_equals_offline": {"op": "<=", "value": 1e-5, "on": "value",
                                 "text": "codes identical, audio within 1e-5, any chunking"},
    "single_stream_speed": {"op": ">=", "value": 50.0, "on": "value",
                            "text": "encode + decode >= 50x real time on one CPU thread (default model)"},
    "served_streams": {"op": ">=", "value": 100.0, "on": "value",
                       "text": ">= 100 concurrent real-time streams on 2 CPU cores, p99 added latency <= one frame"},
    "served_p99_latency": {"op": "<=", "value": 20.0, "on": "value",
                           "text": "p99 added latency <= one frame (20 ms)"},
    "export_throughput": {"op": ">=", "value": 500.0, "on": "value",
                          "text": "export >= 500x real time on 2 CPU cores"},
    "quality_vs_opus6": {"op": ">=", "value": 1.0, "on": "ratio",
                         "text": "at 2 kbps, PESQ-WB >= that of Opus at 6 kbps on held-out real speakers"},
    "codebook_usage": {"op": ">=", "value": 0.95, "on": "value",
                       "text": ">= 95% of entries used on the validation set, every quantizer"},
}


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The common command line of a benchmark: `--quick` (short run). Add your own options to it."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="short run to check the script works (figures marked quick)")
    return parser


def cpu_model() -> str:
    """The CPU's marketing name (platform.processor() is often empty or just 'x86_64' on Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    info = {
        "processor": platform.processor(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }
    try:
        info["affinity_cpus"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pass
    return info


def versions() -> dict:
    """Installed versions of the packages our figures depend on (read from metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("neurocodec", "torch", "torchaudio", "numpy", "vector-quantize-pytorch", "lightning", "grpcio",
                 "pyarrow", "encodec"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def _compare(op: str, a: float, b: float) -> bool:
    return {">=": a >= b, ">": a > b, "<=": a <= b, "<": a < b, "==": a == b}[op]


def figure(metric: str, value: float, unit: str = "", *, reference: str | None = None,
           reference_value: float | None = None, target: str | tuple[str, float] | None = None,
           target_text: str | None = None, higher_is_better: bool = True, **extra) -> dict:
    """One row of a benchmark's `figures`: value, reference measured in the same run, ratio, target, met.

    `target` is a key of `TARGETS` or an explicit `(op, threshold)` compared with the value.
    """
    row = {"metric": metric, "value": float(value), "unit": unit, "higher_is_better": higher_is_better}
    if reference is not None:
        row["reference"] = reference
    if reference_value is not None:
        row["reference_value"] = float(reference_value)
        row["ratio"] = float(value) / float(reference_value) if reference_value else None
    if target is not None:
        if isinstance(target, str):
            spec = TARGETS[target]
            row["target"] = target
            row["target_text"] = target_text or spec["text"]
            on = row.get("ratio") if spec["on"] == "ratio" else row["value"]
            row["met"] = None if on is None else _compare(spec["op"], on, spec["value"])
        else:
            op, threshold = target
            row["target_text"] = target_text or f"{op} {threshold:g} {unit}".strip()
            row["met"] = _compare(op, float(value), float(threshold))
    row.update(extra)
    return row


def write_result(name: str, result: dict, quick: bool | None = None, out_dir: str | Path | None = None) -> Path:
    """Write `docs/bench/<name>.json` (atomically) with machine, versions and date added; return the path."""
    data = dict(result)
    data["name"] = name
    if quick is not None:
        data["quick"] = bool(quick)
    data.setdefault("quick", "--quick" in sys.argv)
    data.setdefault("date", _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat())
    data.setdefault("machine", machine_info())
    data.setdefault("versions", versions())
    out = Path(out_dir or os.environ.get("NEUROCODEC_BENCH_DIR") or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"wrote {path}")
    return path


def _jsonable(obj):
    if hasattr(obj, "item"):
        return obj.item()
    if isinstance(obj, (set, tuple)):
        return list(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def timed(fn, repeats: int) -> float:
    """Median wall-clock seconds of `repeats` calls of `fn`."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
