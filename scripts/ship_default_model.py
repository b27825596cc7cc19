"""Ship the default model: evaluate a training run's EMA codec on the held-out speaker, then install it as
`neurocodec/weights/default.safetensors` (what `--model default` loads).

    .venv/bin/python scripts/ship_default_model.py                      # runs/default-model-lstm, data/debian-more
    .venv/bin/python scripts/ship_default_model.py --run runs/X --corpus /path/to/debian --max-clips 100

Writes docs/default_model/ (report.md with the table against Opus and Codec2, rate-quality plot,
spectrograms, codebook usage, and training_curve.png: validation PESQ/STOI/usage over the model's steps).
The recipe that produces the run is scripts/train_default_model.sh.

The curve covers the model's whole lineage: docs/default_model/validation_history.csv keeps the validation
points of the runs it grew from, so a run fine-tuned from the shipped model (`--init_from default`, e.g. on a
machine that lost the training run's checkpoints) continues the curve at the step where it started.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neurocodec.cli import main as neurocodec  # noqa: E402
from neurocodec.codecs.checkpoint import DEFAULT_MODEL_PATH, lineage_steps, load_codec, read_metadata  # noqa: E402
from neurocodec.eval.plots import plot_training_curve, read_validation_curve, write_validation_curve  # noqa: E402


def lineage_curve(run: Path, history: Path, steps_before: int, until: float | None = None) -> tuple[dict, dict]:
    """The validation curve of the model's lineage: the history's points up to `steps_before` (where this
    run started from the shipped model; 0 for a run from scratch), then the run's own, shifted by it, up to
    `until` (the shipped file's total step, where it is an earlier export than the run's last).
    Returns (curve, marks for the plot)."""
    mine = read_validation_curve(run / "csv" / "metrics.csv", step_offset=steps_before)
    if until is not None:
        mine = {key: {step: v for step, v in points.items() if step <= until} for key, points in mine.items()}
    if steps_before == 0 or not history.is_file():
        return mine, {}
    earlier = read_validation_curve(history)
    curve = {key: {s: v for s, v in earlier[key].items() if s <= steps_before} | mine[key] for key in mine}
    return curve, {steps_before: "fine-tuning restarts (new discriminator)"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/default-model-lstm", help="training run folder (default runs/default-model-lstm)")
    p.add_argument("--corpus", default="data/debian-more", help="corpus built by `neurocodec data debian --more-voices`")
    p.add_argument("--codec", help="which of the run's codec files to ship (default RUN/codec.safetensors, its last "
                   "export; a rule may pick an earlier one, e.g. RUN/exports/codec_step0002000.safetensors)")
    p.add_argument("--max-clips", type=int, default=100, help="held-out clips to score (default 100)")
    p.add_argument("--docs", default="docs/default_model", help="where the report goes")
    p.add_argument("--no-install", action="store_true", help="evaluate only; leave the shipped weights alone")
    args = p.parse_args()

    run, docs = Path(args.run), Path(args.docs)
    codec_path = Path(args.codec) if args.codec else run / "codec.safetensors"
    if not codec_path.is_file():
        print(f"{codec_path} does not exist: train first (scripts/train_default_model.sh)", file=sys.stderr)
        return 2
    meta = read_metadata(codec_path)
    steps_before, total = int(meta.get("steps_before") or 0), lineage_steps(meta)
    print(f"{codec_path}: generator step {meta.get('gen_step')} (total {total}), EMA={meta.get('ema')}")
    load_codec(str(codec_path))  # fails here, not halfway through, if the file is unusable
    history = docs / "validation_history.csv"
    curve, marks = lineage_curve(run, history, steps_before, until=total)
    plot = plot_training_curve(curve, docs / "training_curve.png", marks)
    if plot:
        print(f"training curve -> {plot}")
    rc = neurocodec(["eval", "--model", str(codec_path), "--data", f"{args.corpus}/manifest.jsonl", "--split", "test",
                     "--max-clips", str(args.max_clips), "--baselines", "opus:6,opus:8,opus:12,codec2:3200,codec2:1600",
                     "--report", str(docs), "--title", f"Default model (grvq_4cb, step {total})"])
    if rc != 0:
        return rc
    if not args.no_install:
        write_validation_curve(curve, history)  # the shipped model's history, for the run that continues it
        DEFAULT_MODEL_PATH.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(codec_path, DEFAULT_MODEL_PATH)
        print(f"installed {codec_path} -> {DEFAULT_MODEL_PATH} ({DEFAULT_MODEL_PATH.stat().st_size / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
