"""YAML configs: lookup by bare name, size presets, dotted command-line overrides, strict validation.

A config file has top-level sections (`model`, and for training `loss`, `optim`, `data`, `trainer`, ...)
plus an optional `presets` mapping. A preset (e.g. `tiny`) is a partial config deep-merged over the
file, so smaller sizes are overrides of the real model, never copies of it. Likewise `extends: BASE` makes a
file a variant of another one: only what differs is written.

Bare names (`grvq_4cb`, `grvq_4cb.yaml`) are looked up in `$NEUROCODEC_CONFIG_DIR`, then in the configs
shipped in the package (`neurocodec/configs/`, which the repository's `configs/` links to); anything else is
a path.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import os
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import UserError

# Package data (pyproject.toml), so an installed neurocodec finds its configs from any folder.
CONFIG_DIR = Path(str(importlib.resources.files("neurocodec") / "configs"))


class ConfigError(UserError):
    """A config that cannot be used, with a message that says where and why."""


def config_dirs() -> list[Path]:
    dirs = []
    if os.environ.get("NEUROCODEC_CONFIG_DIR"):
        dirs.append(Path(os.environ["NEUROCODEC_CONFIG_DIR"]))
    dirs.append(CONFIG_DIR)
    return dirs


def available_configs() -> list[str]:
    names = set()
    for d in config_dirs():
        if d.is_dir():
            names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def resolve_config_path(name: str | os.PathLike) -> Path:
    path = Path(name)
    if path.is_file():
        return path
    if path.parent == Path("."):
        for d in config_dirs():
            for candidate in (d / path.name, d / f"{path.name}.yaml"):
                if candidate.is_file():
                    return candidate
    raise ConfigError(f"no config named {str(name)!r}: not a file, and not one of {', '.join(available_configs()) or 'nothing'} in {CONFIG_DIR}")


def deep_merge(base: dict, override: dict) -> dict:
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as err:
        raise ConfigError(f"override {text!r}: value is not valid YAML ({err})") from None
    return key.strip().split("."), value


def apply_overrides(config: dict, overrides: Iterable[str]) -> dict:
    config = copy.deepcopy(config)
    for text in overrides:
        keys, value = parse_override(text)
        node = config
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    return config


def read_config_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """A config file as a mapping, with `extends: BASE` resolved: the file is deep-merged over its base (a name
    looked up beside the file, then like any bare name), presets included, so that a variant states only how it
    differs (semanticodec_25tps.yaml extends semanticodec.yaml)."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections")
    base_name = raw.pop("extends", None)
    if base_name is None:
        return raw
    if not isinstance(base_name, str):
        raise ConfigError(f"{path}: extends must name one config, got {base_name!r}")
    beside = path.parent / base_name
    base_path = beside if beside.is_file() else resolve_config_path(base_name)
    if base_path.resolve() in seen + (path.resolve(),):
        raise ConfigError(f"{path}: extends {base_name} goes round in a circle")
    return deep_merge(read_config_file(base_path, seen + (path.resolve(),)), raw)


def load_config(name: str | os.PathLike, preset: str | None = None, overrides: Iterable[str] = ()) -> dict:
    """Read a config, merge a preset and overrides. The result records its source and preset."""
    path = resolve_config_path(name)
    raw = read_config_file(path)
    presets = raw.pop("presets", {}) or {}
    if preset:
        if preset not in presets:
            raise ConfigError(f"{path}: no preset {preset!r} (has: {', '.join(presets) or 'none'})")
        raw = deep_merge(raw, presets[preset])
    raw = apply_overrides(raw, overrides)
    raw.setdefault("name", path.stem)
    raw["preset"] = preset
    return raw


# `--model` names: `default` is the pretrained model shipped in the package (see codecs/checkpoint.py).
DEFAULT_MODEL = "default"
MODEL_HELP = ("`default` (the pretrained model shipped with the package), a checkpoint (.safetensors) "
              "or config[:preset] such as grvq_4cb:tiny (default: default)")


def split_model_spec(spec: str) -> tuple[str, str | None]:
    """`grvq_4cb:tiny` -> ('grvq_4cb', 'tiny'); a spec without ':' has no preset."""
    if ":" in spec and not Path(spec).exists():
        name, preset = spec.rsplit(":", 1)
        return name, preset or None
    return spec, None


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict | None, where: str) -> T:
    """Build dataclass `cls` from `data`, recursing into dataclass fields; unknown keys are errors."""
    data = dict(data or {})
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(f'{where}.{k}' for k in unknown)}; known: {', '.join(known)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            if not isinstance(value, dict):
                raise ConfigError(f"{where}.{key} must be a mapping, got {value!r}")
            value = from_dict(hint, value, f"{where}.{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from None


def to_dict(obj: Any) -> dict:
    return dataclasses.asdict(obj)
