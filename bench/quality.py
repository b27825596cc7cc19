"""Quality benchmark: our codec vs Opus 6 kbps on the held-out speaker of the demo corpus.

Figures: PESQ-WB and STOI of our model (its full K, e.g. 2 kbps for grvq_4cb) with Opus at 6 kbps measured
on the same clips in the same run (ratio = ours / Opus; target: ratio >= 1), and the smallest share of
codebook entries used over the set (target >= 95%). The model is `--model`, else the newest checkpoint
under runs/ (`*.safetensors`), else the untrained `grvq_4cb:tiny` (marked so in the JSON).

    python bench/quality.py [--quick] [--model M] [--data data/demo/manifest.jsonl] [--split test]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, arg_parser, figure, write_result  # noqa: E402


def newest_checkpoint() -> str | None:
    found = sorted((ROOT / "runs").rglob("*.safetensors"), key=lambda p: p.stat().st_mtime) \
        if (ROOT / "runs").is_dir() else []
    return str(found[-1]) if found else None


def _rel(path: str) -> str:
    """Paths inside the repository are shown relative to it (the JSON is committed)."""
    try:
        return str(Path(path).resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--data", default=str(ROOT / "data" / "demo" / "manifest.jsonl"))
    parser.add_argument("--split", default="test")
    args = parser.parse_args()

    import torch

    from neurocodec.codecs.checkpoint import load_codec
    from neurocodec.eval.baselines import parse_baselines
    from neurocodec.codecs.quantizers import uniform_usage
    from neurocodec.eval.runner import evaluate, find_clips

    torch.set_num_threads(1)
    spec = args.model or newest_checkpoint() or "grvq_4cb:tiny"
    clips = find_clips(args.data, args.split, 3 if args.quick else None)
    codec = load_codec(spec)
    result = evaluate(codec, clips, None, parse_baselines("opus:6"), model_spec=spec, data_label=args.data,
                      split=args.split)
    rows = {r["system"]: r for r in result.to_json()["systems"]}
    ours = next(r for r in rows.values() if r["kind"] == "model")
    opus = rows["Opus 6 kbps"]
    usage = min(r["usage"] for rows_k in result.codebooks.values() for r in rows_k)
    label = f"{ours['system']} ({ours['kbps']:.2f} kbps)"
    figures = [
        figure(f"PESQ-WB, {label}", ours["pesq"]["mean"], "MOS", reference="Opus 6 kbps (same clips)",
               reference_value=opus["pesq"]["mean"], target="quality_vs_opus6"),
        figure(f"STOI, {label}", ours["stoi"]["mean"], "", reference="Opus 6 kbps (same clips)",
               reference_value=opus["stoi"]["mean"]),
        figure("codebook usage (smallest over codebooks)", usage, "", target="codebook_usage"),
    ]
    for f in figures:
        ratio = f" = {f['ratio']:.2f}x the reference ({f['reference_value']:.3f})" if f.get("ratio") else ""
        met = {True: "met", False: "NOT met", None: ""}[f.get("met")] if "met" in f else ""
        print(f"{f['metric']}: {f['value']:.3f}{ratio} {met}")
    trained = result.model["trained"]
    frames, entries = result.data["seconds"] * codec.frame_rate, max(codec.cardinality)
    frames_per_entry = frames / entries
    write_result("quality", {
        "title": "Quality vs Opus 6 kbps (held-out speaker)" + ("" if trained else " — UNTRAINED model"),
        "figures": figures,
        "params": {"model": _rel(spec), "trained": trained, "data": _rel(args.data), "split": args.split,
                   "clips": result.data["n_scored"], "seconds": result.data["seconds"],
                   "frames_per_entry": round(frames_per_entry, 1)},
        "notes": "PESQ-WB at 16 kHz after time alignment; mean over clips. Ours: nominal bitrate "
                 "(sum log2(cardinality) x frame rate). Opus: opusenc --hard-cbr --bitrate 6. Codebook usage "
                 f"grows with the set: here {frames_per_entry:.1f} frames per entry, where perfectly uniform codes "
                 f"would use {uniform_usage(frames, entries):.0%} of the entries (1 - e^-n).",
    }, quick=args.quick)


if __name__ == "__main__":
    main()
