"""`neurocodec train ...`: the same as `python train/fit.py ...` (all arguments are passed through)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", add_help=False, prefix_chars="+",  # pass every --option through to fit.py
                       help="train a codec (same options as train/fit.py; --help lists them)")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from .fit import main

    return main(args.args)
