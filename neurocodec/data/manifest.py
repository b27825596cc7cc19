"""Manifests: one JSON object per line describing one utterance.

Fields (only `path` is required when reading):
  id           unique utterance id (default: the file's stem)
  path         audio file, absolute or relative to the manifest's folder
  duration     seconds
  sample_rate  Hz of the file
  channels     channel count of the file
  text         transcript, when known
  speaker      speaker id, when known
  language     language code, when known
  split        train / valid / test, when the corpus defines one

Every consumer (training data, token export, evaluation) reads manifests through `read_manifest`, so
relative paths resolve the same way everywhere.
"""

from __future__ import annotations

import json
import os
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import UserError


VALID_EVERY = 20  # corpora we build send about 1 in 20 training utterances to `valid`


def train_or_valid(key: str) -> str:
    """The split of an utterance of a training speaker: `valid` for ~1 in VALID_EVERY keys, chosen by a hash of the
    key (stable across runs and machines), else `train`."""
    return "valid" if zlib.crc32(key.encode()) % VALID_EVERY == 0 else "train"


@dataclass
class Utterance:
    id: str
    path: str
    duration: float | None = None
    sample_rate: int | None = None
    channels: int | None = None
    text: str | None = None
    speaker: str | None = None
    language: str | None = None
    split: str | None = None

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v is not None}, ensure_ascii=False)


FIELDS = set(Utterance.__dataclass_fields__)


def iter_manifest(path: str | Path) -> Iterator[Utterance]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"manifest {path} does not exist")
    base = path.resolve().parent
    seen: set[str] = set()
    with path.open(encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{line_no}: not valid JSON ({err})") from None
            if not isinstance(row, dict) or "path" not in row:
                raise UserError(f"{path}:{line_no}: each line must be an object with a 'path'")
            audio = Path(row["path"])
            if not audio.is_absolute():
                audio = base / audio
            row = {k: v for k, v in row.items() if k in FIELDS}
            row["path"] = str(audio)
            row.setdefault("id", audio.stem)
            if row["id"] in seen:
                raise UserError(f"{path}:{line_no}: duplicate id {row['id']!r}")
            seen.add(row["id"])
            yield Utterance(**row)


def read_manifest(path: str | Path, split: str | None = None) -> list[Utterance]:
    rows = list(iter_manifest(path))
    return rows if split is None else [u for u in rows if u.split == split]


def write_manifest(path: str | Path, utterances: Iterable[Utterance], relative_to: str | Path | None = None) -> Path:
    """Write atomically; paths are made relative to `relative_to` (default: the manifest's folder)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    base = Path(relative_to or path.parent).resolve()
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for u in utterances:
            row = Utterance(**asdict(u))
            try:
                row.path = os.path.relpath(Path(u.path).resolve(), base)
            except ValueError:
                row.path = str(Path(u.path).resolve())
            f.write(row.to_json() + "\n")
    tmp.replace(path)
    return path
