"""Score several checkpoints of training runs on the held-out speakers, paired clip by clip against a reference model.

    .venv/bin/python scripts/compare_runs.py --corpus data/debian-more --arm A=runs/x-a --arm B=runs/x-b
    .venv/bin/python scripts/compare_runs.py --corpus DIR --arm A='snaps/a_*.safetensors' --steps 3000,4000 --jobs 2
    .venv/bin/python scripts/compare_runs.py --corpus DIR --arm A=runs/x-a --metric stoi   # from the same cache

Why: one checkpoint of a GAN-trained codec differs from the next by +-0.03-0.05 PESQ-WB on the same clips, as much
as most changes we try. An A/B is only readable over several checkpoints of each arm, at the same steps.

An arm is NAME=PATH: a run folder (its `exports/`, written with `--trainer.keep_exports true`) or a glob of codec
files; a file's step is its `gen_step` metadata (a lone file without it, e.g. from `neurocodec average`, is
step 0). Each file and the reference (`--reference`, default the shipped model) are scored with `neurocodec eval`
(no baselines) on the first --max-clips clips of every `test_<speaker>.jsonl` of the corpus; the results are
cached in `<out>/eval/`, named by the weights' SHA-256 and the clip count, so a rerun only scores what is new and a
changed file (a new shipped model) is scored again, as is a cached evaluation that predates the metric asked for or
stream-start priming.

`--metric` picks the per-clip score that is compared (default PESQ-WB; also STOI, mel distance, SI-SDR, PESQ-NB,
and the level in pauses, `pause_level_db`: how many dB louder than the original the output is in the clip's quiet
frames, the check that a PESQ loss does not fill pauses with noise):
every one is in the cached evaluations, so another metric costs no new scoring. A loss that targets one metric
(loss.pesq) is checked on the others this way. `--metric visqol` (ViSQOL v3, speech mode) is scored only when asked,
about doubling an evaluation's time; its evaluations are cached in files of their own (`..._visqol.json`). It is
the check that matters for a PESQ-trained model: on day 24, an arm that gained +0.54 PESQ-WB on a held-out speaker
lost 0.38 ViSQOL on the same clips.

Printed and written to `<out>/compare.md` (`compare_<metric>.md` for another metric):
- every checkpoint against the reference: PESQ-WB difference per speaker (mean +- 95% t half-width), and the mean
  over speakers;
- per arm, over the steps that every arm has: each clip's difference averaged over those checkpoints, then its
  interval (a checkpoint's noise averages out; the clips stay paired);
- every later arm against the first, the same way.
The first table is also drawn in `<out>/compare.png` (`compare_<metric>.png`): per speaker, each arm's difference
from the reference against its step, with the intervals.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neurocodec.codecs.checkpoint import read_metadata  # noqa: E402
from neurocodec.eval.runner import summarize  # noqa: E402


def arm_files(spec: str) -> tuple[str, dict[int, Path]]:
    """NAME=PATH -> (name, {gen_step: codec file})."""
    name, sep, where = spec.partition("=")
    if not sep or not name or not where:
        raise SystemExit(f"compare_runs: an arm is NAME=PATH (a run folder or a glob), got {spec!r}")
    path = Path(where)
    files = sorted(path.glob("exports/*.safetensors")) if path.is_dir() else [Path(p) for p in glob.glob(where)]
    if not files:
        hint = " (train with --trainer.keep_exports true)" if path.is_dir() else ""
        raise SystemExit(f"compare_runs: arm {name}: no codec files at {where}{hint}")
    steps: dict[int, Path] = {}
    for f in files:
        step = int(read_metadata(f).get("gen_step", -1))
        if step < 0 and len(files) == 1:  # one file not written by training (`neurocodec average`): an arm of step 0
            step = 0
        elif step < 0:
            raise SystemExit(f"compare_runs: {f} has no gen_step metadata (not written by training); an arm of "
                             "several files needs it to pair their steps")
        steps[step] = f
    return name, steps


def model_key(model: str) -> str:
    """What the evaluation cache is keyed by: the weights' SHA-256 (a file, or `default`), else the name."""
    from neurocodec.codecs.checkpoint import DEFAULT_MODEL_PATH, file_sha256

    path = DEFAULT_MODEL_PATH if model == "default" else Path(model)
    if path.is_file():
        return file_sha256(path)[:16]
    return "".join(c if c.isalnum() or c in "-." else "_" for c in model)


METRICS = {"pesq": "PESQ-WB", "stoi": "STOI", "mel_distance": "mel distance (lower is better)",
           "si_sdr": "SI-SDR (dB)", "pesq_nb": "PESQ-NB",
           "pause_level_db": "level in pauses, dB over the original (lower is better)",
           "visqol": "ViSQOL"}  # per-clip fields of `neurocodec eval --json`
SCORED_ON_REQUEST = {"visqol": "--visqol"}  # metrics an evaluation has only when asked: cached in files of their own


def clip_scores(payload: dict, metric: str = "pesq") -> dict[str, float]:
    """{clip id: score} of the model row of a `neurocodec eval --json` result (`metric`: a key of METRICS)."""
    out = {}
    for clip in payload["clips"]:
        rows = [v for k, v in clip.get("systems", {}).items() if k.startswith("ours")]
        if rows and rows[0].get(metric) is not None:
            out[clip["id"]] = rows[0][metric]
    return out


def paired(x: list[dict[str, float]], y: list[dict[str, float]]) -> dict:
    """Per clip, the mean over checkpoints of x[k] - y[k]; then mean and 95% t-interval over clips."""
    ids = sorted(set.intersection(*(set(a) & set(b) for a, b in zip(x, y))))
    diffs = [float(np.mean([a[i] - b[i] for a, b in zip(x, y)])) for i in ids]
    return summarize(diffs)


def cell(stat: dict) -> str:
    if stat["ci95"] is None:
        return "-" if stat["mean"] is None else f"{stat['mean']:+.3f}"
    return f"{stat['mean']:+.3f} ± {(stat['ci95'][1] - stat['ci95'][0]) / 2:.3f}"


def is_cached(out: Path, metric: str) -> bool:
    """A cached evaluation serves unless it was written before `neurocodec eval` had `metric` (its rows lack the
    field; e.g. pause_level_db, day 26), or before streams were primed (its model lacks `stream_start`, day 27: the
    same weights then gave other codes and audio at each clip's start). One whose every clip failed stays cached: it
    is reported, not rescored."""
    if not out.is_file():
        return False
    cached = json.loads(out.read_text())
    if "stream_start" not in cached.get("model", {}):
        return False
    rows = [row for clip in cached["clips"] for row in clip.get("systems", {}).values()]
    return not rows or any(metric in row for row in rows)


def evaluate(model: str, manifest: Path, out: Path, max_clips: int, extra: tuple[str, ...] = (),
             metric: str = "pesq") -> Path:
    if not is_cached(out, metric):
        tmp = out.with_name(f"{out.stem}.{os.getpid()}-{threading.get_ident()}.part.json")  # never shared
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        proc = subprocess.run([sys.executable, "-m", "neurocodec.cli", "eval", "--model", model, "--data",
                               str(manifest), "--baselines", "none", "--max-clips", str(max_clips), "--json",
                               str(tmp), *extra], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"compare_runs: eval of {model} on {manifest.name} failed:\n{proc.stderr[-2000:]}")
        tmp.replace(out)
    return out


def checkpoint_stats(speakers: list[str], arms: dict[str, dict[int, dict[str, dict]]],
                     ref_scores: dict[str, dict]) -> dict[str, dict[int, list[dict]]]:
    """Every checkpoint minus the reference, per speaker (`paired`): {arm: {step: [stat per speaker]}}, steps in
    order. The report's first table and the plot are drawn from it."""
    return {name: {step: [paired([steps[step][s]], [ref_scores[s]]) for s in speakers] for step in sorted(steps)}
            for name, steps in arms.items()}


def report(speakers: list[str], reference: str, arms: dict[str, dict[int, dict[str, dict]]],
           ref_scores: dict[str, dict], metric: str = "pesq", stats: dict | None = None) -> str:
    """The Markdown report from the scores: arms[name][step][speaker] = {clip: score}; `stats`: their
    `checkpoint_stats` when the caller has them already (the plot is drawn from the same)."""
    head = "| " + " | ".join(speakers) + " | mean over speakers |"
    rule = "|---" * (len(speakers) + 2) + "|"
    lines = [f"# Checkpoints against {reference} ({METRICS[metric]}, paired per clip)", "",
             "Each cell: mean ± half-width of the 95% t-interval over the clips.", "",
             "## Every checkpoint minus the reference", "", "| arm, step " + head, rule]
    for name, steps in (stats or checkpoint_stats(speakers, arms, ref_scores)).items():
        for step, per_speaker in steps.items():
            lines.append(f"| {name} {step} | " + " | ".join(cell(x) for x in per_speaker)
                         + f" | {np.mean([x['mean'] for x in per_speaker]):+.3f} |")
    common = sorted(set.intersection(*(set(s) for s in arms.values())))
    lines += ["", f"## Over the steps every arm has ({', '.join(map(str, common)) or 'none'})", ""]
    if common:
        lines += ["| comparison " + head, rule]
        for name, steps in arms.items():
            stats = [paired([steps[k][s] for k in common], [ref_scores[s]] * len(common)) for s in speakers]
            lines.append(f"| {name} - reference | " + " | ".join(cell(x) for x in stats)
                         + f" | {np.mean([x['mean'] for x in stats]):+.3f} |")
        first, *others = list(arms)
        for name in others:
            stats = [paired([arms[name][k][s] for k in common], [arms[first][k][s] for k in common])
                     for s in speakers]
            lines.append(f"| {name} - {first} | " + " | ".join(cell(x) for x in stats)
                         + f" | {np.mean([x['mean'] for x in stats]):+.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", required=True, help="folder with test_<speaker>.jsonl manifests")
    p.add_argument("--arm", action="append", required=True, help="NAME=PATH (run folder or glob); repeat")
    p.add_argument("--reference", default="default", help="model the checkpoints are paired against")
    p.add_argument("--steps", help="comma-separated generator steps to score (default: every file)")
    p.add_argument("--max-clips", type=int, default=100)
    p.add_argument("--jobs", type=int, default=1, help="evaluations at once (one CPU thread each)")
    p.add_argument("--out", default="runs/compare", help="where eval/ (the cache) and compare.md go")
    p.add_argument("--metric", default="pesq", choices=sorted(METRICS), help="the per-clip score compared")
    args = p.parse_args(argv)

    manifests = sorted(Path(args.corpus).glob("test_*.jsonl"))
    if not manifests:
        raise SystemExit(f"compare_runs: no test_<speaker>.jsonl in {args.corpus}")
    speakers = [m.stem.removeprefix("test_") for m in manifests]
    wanted = {int(s) for s in args.steps.split(",")} if args.steps else None
    arms = {}
    for spec in args.arm:
        name, files = arm_files(spec)
        if name in arms:
            raise SystemExit(f"compare_runs: arm {name} given twice")
        arms[name] = {k: f for k, f in files.items() if wanted is None or k in wanted}
        if not arms[name]:
            raise SystemExit(f"compare_runs: arm {name} has none of the steps {sorted(wanted)}; it has {sorted(files)}")
    cache = Path(args.out) / "eval"
    cache.mkdir(parents=True, exist_ok=True)
    extra = (SCORED_ON_REQUEST[args.metric],) if args.metric in SCORED_ON_REQUEST else ()
    suffix = f"_{args.metric}" if extra else ""
    tag = lambda model: f"{model_key(model)}_n{args.max_clips}{suffix}"  # noqa: E731
    # (arm or None for the reference, step, model, manifest, speaker, cached result)
    jobs = [(None, None, args.reference, m, s, cache / f"reference_{tag(args.reference)}_{s}.json")
            for m, s in zip(manifests, speakers)]
    jobs += [(name, step, str(f), m, s, cache / f"{name}_step{step}_{tag(str(f))}_{s}.json")
             for name, files in arms.items() for step, f in sorted(files.items()) for m, s in zip(manifests, speakers)]
    from tqdm import tqdm

    with ThreadPoolExecutor(max(1, args.jobs)) as pool, tqdm(total=len(jobs), desc="scoring", unit="eval") as bar:
        futures = [pool.submit(evaluate, model, manifest, out, args.max_clips, extra, args.metric)
                   for _, _, model, manifest, _, out in jobs]
        for fut in as_completed(futures):
            fut.result()
            bar.update()
    def load(path: Path) -> dict[str, float]:
        payload = json.loads(path.read_text())
        scores = clip_scores(payload, args.metric)
        if not scores:  # e.g. a checkpoint whose weights went NaN: every clip failed
            errors = payload.get("errors") or [{"error": f"no clip has {args.metric}"}]
            raise SystemExit(f"compare_runs: {path.name}: no clip was scored ({len(payload.get('errors', []))} "
                             f"errors; first: {errors[0]['error']}); remove the file to score it again")
        return scores

    ref_scores: dict[str, dict] = {}
    scores: dict[str, dict[int, dict[str, dict]]] = {name: {} for name in arms}
    for name, step, _, _, speaker, out in jobs:
        if name is None:
            ref_scores[speaker] = load(out)
        else:
            scores[name].setdefault(step, {})[speaker] = load(out)
    stats = checkpoint_stats(speakers, scores, ref_scores)
    text = report(speakers, args.reference, scores, ref_scores, args.metric, stats)
    stem = "compare" if args.metric == "pesq" else f"compare_{args.metric}"
    (Path(args.out) / f"{stem}.md").write_text(text, encoding="utf-8")
    from neurocodec.eval.plots import plot_checkpoint_comparison

    ylabel = f"{METRICS[args.metric].split(' (')[0]} minus {Path(args.reference).name}"
    figure = plot_checkpoint_comparison(speakers, stats, ylabel, Path(args.out) / f"{stem}.png")
    print(text)
    print(f"plot: {figure}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
