"""Score a model on every held-out speaker of a corpus, each against Opus 6 kbps on the same clips (issue 23).

    .venv/bin/python scripts/heldout_speakers.py --model default --corpus data/debian-more
    .venv/bin/python scripts/heldout_speakers.py --model runs/X/codec.safetensors --corpus DIR --out docs/default_model

Reads the corpus's `test_<speaker>.jsonl` manifests (`neurocodec data debian --more-voices` writes one per held-out
speaker), runs `neurocodec eval` on each (first --max-clips clips, Opus 6 kbps as the baseline) into
`<out>/heldout/<speaker>.json`, and writes `<out>/heldout_speakers.md`: PESQ-WB and STOI of both systems, and the
paired difference in PESQ-WB (ours - Opus, clip by clip, mean and 95% t-interval) with the verdict of DESIGN.md's
quality target for each speaker; then the same pairing in ViSQOL (speech mode), a second full-reference opinion
that a model trained with PESQ in its loss cannot have learned (`--no-visqol` skips it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neurocodec.cli import main as neurocodec  # noqa: E402
from neurocodec.eval.report import paired_difference  # noqa: E402

OPUS = "Opus 6 kbps"


def speaker_row(speaker: str, payload: dict) -> dict:
    rows = {r["system"]: r for r in payload["systems"]}
    ours = next(name for name in rows if name.startswith("ours"))
    diff = paired_difference(payload, ours, OPUS)
    return {"speaker": speaker, "clips": payload["data"]["n_scored"], "seconds": payload["data"]["seconds"],
            "ours": ours, "pesq": rows[ours]["pesq"], "stoi": rows[ours]["stoi"],
            "opus_pesq": rows[OPUS]["pesq"], "opus_stoi": rows[OPUS]["stoi"], "paired": diff,
            "visqol": rows[ours].get("visqol"), "opus_visqol": rows[OPUS].get("visqol"),
            "paired_visqol": paired_difference(payload, ours, OPUS, "visqol") if "visqol" in payload["scoring"]
            else None}


def _half_width(stat: dict) -> float:
    low, high = stat["ci95"]
    return (high - low) / 2


def _cell(stat: dict, digits: int) -> str:
    return f"{stat['mean']:.{digits}f} ± {_half_width(stat):.{digits}f}"


def table(rows: list[dict], model: str) -> str:
    lines = [f"# Held-out speakers: {model} against Opus 6 kbps", "",
             "Speakers that training never saw (`test_<speaker>.jsonl` of the corpus). Each cell: mean ± half-width "
             "of the 95% t-interval over the clips; paired = ours - Opus clip by clip. Ours at 2 kbps "
             "(sum of log2(cardinality) x frame rate).", "",
             "| speaker | clips | seconds | ours PESQ-WB | Opus 6 kbps PESQ-WB | paired difference | ours STOI | Opus STOI | "
             "PESQ-WB >= Opus 6 kbps |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        d = r["paired"]
        verdict = "met" if d["mean"] >= 0 else "not met"  # as `neurocodec eval`'s target line: on the mean
        lines.append(f"| {r['speaker']} | {r['clips']} | {r['seconds']:.0f} | {_cell(r['pesq'], 2)} | "
                     f"{_cell(r['opus_pesq'], 2)} | {d['mean']:+.3f} ± {_half_width(d):.3f} | {_cell(r['stoi'], 3)} | "
                     f"{_cell(r['opus_stoi'], 3)} | {verdict} |")
    scored = [r for r in rows if r["paired_visqol"] is not None]
    if scored:
        lines += ["", "ViSQOL v3 (speech mode, MOS-LQO) on the same clips: a second opinion that PESQ in the training "
                  "loss cannot have been fitted to (clips under 0.65 s, too short for ViSQOL, left out).", "",
                  "| speaker | clips | ours ViSQOL | Opus 6 kbps ViSQOL | paired difference |", "|---|---|---|---|---|"]
        for r in scored:
            d = r["paired_visqol"]
            lines.append(f"| {r['speaker']} | {d['n']} | {_cell(r['visqol'], 2)} | {_cell(r['opus_visqol'], 2)} | "
                         f"{d['mean']:+.3f} ± {_half_width(d):.3f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default")
    p.add_argument("--corpus", required=True, help="folder with test_<speaker>.jsonl manifests")
    p.add_argument("--max-clips", type=int, default=100, help="clips per speaker (default 100)")
    p.add_argument("--out", default="docs/default_model", help="where heldout/ and heldout_speakers.md go")
    p.add_argument("--no-visqol", action="store_true", help="skip ViSQOL (it about doubles the time)")
    args = p.parse_args()

    manifests = sorted(Path(args.corpus).glob("test_*.jsonl"))
    if not manifests:
        print(f"no test_<speaker>.jsonl in {args.corpus}: build it with `neurocodec data debian -o DIR --more-voices`",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    rows = []
    for manifest in manifests:
        speaker = manifest.stem.removeprefix("test_")
        result = out / "heldout" / f"{speaker}.json"
        rc = neurocodec(["eval", "--model", args.model, "--data", str(manifest), "--baselines", "opus:6",
                         "--max-clips", str(args.max_clips), "--json", str(result)]
                        + ([] if args.no_visqol else ["--visqol"]))
        if rc != 0:
            return rc
        rows.append(speaker_row(speaker, json.loads(result.read_text())))
    text = table(rows, args.model)
    (out / "heldout_speakers.md").write_text(text, encoding="utf-8")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
