"""`neurocodec eval`: a codec on a test set, side by side with Opus and Codec2 at chosen bitrates."""

from __future__ import annotations

import argparse
import shlex
import sys

from ..config import DEFAULT_MODEL, MODEL_HELP
from ..errors import UserError

DEFAULT_BASELINES = "opus:6,opus:8,opus:12,codec2:3200"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval", help="quality of a codec (PESQ, STOI, mel distance, SI-SDR, ViSQOL, codebook usage) vs Opus and Codec2",
        description="Code and decode every clip with the model (each K) and the baselines, align each decoded "
                    "signal to the reference and score it; print a table of means with 95%% t-intervals. "
                    "Our kbps = sum of log2(cardinality) x frame rate.")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--data", required=True, help="manifest (.jsonl) or folder of audio files")
    p.add_argument("--split", default=None, help="only this split of the manifest (e.g. test)")
    p.add_argument("--num-codebooks", nargs="+", default=None, metavar="K",
                   help="evaluate at these numbers of codebooks (e.g. 2 4 or 2,4); default: every allowed K of a "
                        "variable-bitrate model, else the model's K")
    p.add_argument("--baselines", default=DEFAULT_BASELINES,
                   help=f"comma list of opus:KBPS, codec2:MODE (3200, 2400, 1600, 1400, 1300, 1200, 700C, 450), "
                        f"identity, or none (default: {DEFAULT_BASELINES})")
    p.add_argument("--max-clips", type=int, default=None, help="evaluate only the first N clips")
    p.add_argument("--max-shift-ms", type=float, default=50.0, help="alignment search range (default: 50 ms)")
    p.add_argument("--visqol", action="store_true",
                   help="also score ViSQOL v3 (speech mode, MOS-LQO): a second full-reference opinion beside PESQ, "
                        "about as costly as every other metric together")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results (one row per system) as JSON")
    p.add_argument("--report", default=None, metavar="DIR",
                   help="write report.md, results.json and PNG plots to this folder")
    p.add_argument("--title", default=None, help="title of the Markdown report")
    p.add_argument("--no-plots", action="store_true", help="with --report: skip the PNG figures")
    p.set_defaults(func=cmd_eval)


def _ks(values: list[str] | None) -> list[int] | None:
    if not values:
        return None
    out = []
    for v in values:
        for part in str(v).split(","):
            if part.strip():
                try:
                    out.append(int(part))
                except ValueError:
                    raise UserError(f"--num-codebooks: {part!r} is not an integer") from None
    return sorted(set(out))


def _command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this evaluation (for the report)."""
    parts = ["neurocodec eval", "--model", args.model, "--data", args.data]
    if args.split:
        parts += ["--split", args.split]
    if args.num_codebooks:
        parts += ["--num-codebooks", *map(str, _ks(args.num_codebooks))]
    parts += ["--baselines", args.baselines]
    if args.max_clips:
        parts += ["--max-clips", str(args.max_clips)]
    if args.visqol:
        parts += ["--visqol"]
    if args.report:
        parts += ["--report", args.report]
    return " ".join(parts[:1] + [shlex.quote(str(p)) for p in parts[1:]])


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from ..codecs.checkpoint import load_codec
    from .baselines import parse_baselines
    from .report import results_table, target_lines, write_json, write_report
    from .runner import BITRATE_NOTE, evaluate, find_clips

    from ..codecs.checkpoint import family_of_spec

    family = family_of_spec(args.model)
    own = family.hook("eval") if family is not None else None
    if own is not None:  # e.g. image codecs: PSNR / SSIM / MS-SSIM / bpp vs JPEG and WebP
        return own(args, _ks(args.num_codebooks), DEFAULT_BASELINES)
    if args.max_clips is not None and args.max_clips < 1:
        raise UserError("--max-clips must be at least 1")
    baselines = parse_baselines(args.baselines)
    for b in baselines:
        b.check_tools()
    clips = find_clips(args.data, args.split, args.max_clips)
    torch.set_grad_enabled(False)
    codec = load_codec(args.model)
    print(f"evaluating {codec.name} on {len(clips)} clips from {args.data}"
          + (f" (split {args.split})" if args.split else "")
          + (f" with {', '.join(b.name for b in baselines)}" if baselines else ""), file=sys.stderr)
    result = evaluate(codec, clips, _ks(args.num_codebooks), baselines, model_spec=args.model,
                      max_shift_ms=args.max_shift_ms, progress=True,
                      data_label=str(args.data), split=args.split, visqol=args.visqol)
    payload = result.to_json()
    if not payload["model"]["trained"]:
        print("note: UNTRAINED model (random weights from the config): these scores prove the pipeline only")
    print(results_table(payload))
    print(f"(mean ± 95% t-interval half-width; our kbps: {BITRATE_NOTE})")
    for line in target_lines(payload):
        print(line.replace("*", ""))  # Markdown emphasis is noise on a terminal
    for e in payload["errors"]:
        who = f" [{e['system']}]" if e.get("system") else ""
        print(f"error: {e['clip']}{who}: {e['error']}")
    unscored = [(c["id"], name, m["visqol_error"]) for c in payload["clips"]
                for name, m in c.get("systems", {}).items() if m.get("visqol_error")]
    if unscored:  # their other scores stand; the ViSQOL column leaves them out
        clip, name, why = unscored[0]
        print(f"note: no ViSQOL for {len(unscored)} clip/system pair(s), e.g. {clip} [{name}]: {why}")
    if args.json:
        print(f"wrote {write_json(payload, args.json)}")
    if args.report:
        command = _command_line(args)
        paths = write_report(result, args.report, title=args.title, command=command, plots=not args.no_plots)
        print(f"wrote {paths['markdown']} ({', '.join(p.name for k, p in paths.items() if k != 'markdown')})")
    if payload["data"]["n_scored"] == 0:
        raise UserError("no clip could be scored (see the errors above)")
    return 0
