"""The `neurocodec` command. Each area registers its own subcommands (one place per concern)."""

from __future__ import annotations

import argparse
import importlib
import sys

from .errors import UserError

# Modules with a `register(subparsers)` function, in the order their commands are listed in --help.
COMMAND_MODULES = [
    "neurocodec.codecs.commands",
    "neurocodec.train.kmeans_commands",
    "neurocodec.serve.commands",
    "neurocodec.train.commands",
    "neurocodec.data.commands",
    "neurocodec.eval.commands",
    "neurocodec.tokens.commands",
    "neurocodec.image.commands",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neurocodec",
        description="Neural audio codecs: train, stream, export tokens, evaluate. "
                    "--model takes a checkpoint (.safetensors) or a config name/path with an optional "
                    "size preset (grvq_4cb, grvq_4cb:tiny, configs/fsq.yaml).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UserError as err:
        print(f"neurocodec {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"neurocodec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
