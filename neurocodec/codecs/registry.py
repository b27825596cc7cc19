"""The registry of codec families: `model.family` in a config -> what builds, trains and serves that family.

Each family declares itself with a `Family` in its own module and is listed under the `neurocodec.families`
entry points in pyproject.toml (another package can add a family the same way, without touching ours).
So this package knows no family's code: `build_codec`, training (`train/fit.py`) and the commands look the
family up here, and a family whose inputs are not audio (the image codec) hands the commands hooks of its
own instead of their audio path.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.metadata import entry_points
from typing import Callable

from ..config import ConfigError

ENTRY_POINT_GROUP = "neurocodec.families"


@dataclass(frozen=True)
class Family:
    """One codec family.

    `codec_class(config: CodecConfig, sync_codebook: bool)` builds it and implements the codec interface
    (`model.py`). `training` is the "module:function" that `train/fit.py` hands its parsed arguments (FitArgs)
    to. `commands` maps a command to the "module:function" that replaces its audio path (imported only when
    used): "encode" and "decode" take (args, codec), "info" takes the info dict, "eval" takes (args, num_codebooks,
    default_baselines), "export" takes (args); each returns the exit code (info: None)."""

    name: str
    modality: str  # "audio" | "image": which data, metrics and services apply
    codec_class: type
    training: str = "neurocodec.train.fit:train_codec"
    commands: dict[str, str] = field(default_factory=dict)
    # File name endings of the inputs a non-audio family encodes, so that an audio model given one says so.
    input_suffixes: tuple[str, ...] = ()

    def hook(self, command: str) -> Callable | None:
        """The function that replaces `command`'s audio path for this family, or None (use the audio path)."""
        ref = self.commands.get(command)
        return resolve(ref) if ref is not None else None


def resolve(ref: str) -> Callable:
    """"package.module:function" -> the function."""
    module, _, attr = ref.partition(":")
    return getattr(importlib.import_module(module), attr)


@lru_cache(maxsize=1)
def families() -> dict[str, Family]:
    """Every registered family by name (entry points of the installed distributions; the first one wins)."""
    found: dict[str, Family] = {}
    for point in entry_points(group=ENTRY_POINT_GROUP):
        if point.name in found:
            continue
        family = point.load()
        if not isinstance(family, Family) or family.name != point.name:
            raise TypeError(f"entry point {ENTRY_POINT_GROUP}:{point.name} = {point.value} is not Family({point.name!r})")
        found[point.name] = family
    if not found:
        raise ConfigError("no codec families are registered: neurocodec is not installed in this environment "
                          "(run `bash scripts/setup.sh`, or `pip install -e .`)")
    return found


def family_claiming(path: str | os.PathLike) -> Family | None:
    """The non-audio family whose inputs end like `path` (a .png for image codecs), or None."""
    suffix = os.path.splitext(str(path))[1].lower()
    return next((f for f in families().values() if suffix and suffix in f.input_suffixes), None)


def get_family(name: str) -> Family:
    known = families()
    if name not in known:
        raise ConfigError(f"model.family {name!r} is not one of {', '.join(known)}")
    return known[name]


def family_of(codec) -> Family:
    """The family of a built codec."""
    return get_family(codec.config.family)
