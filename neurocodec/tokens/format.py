"""The on-disk format of a token dataset (one place: the writer, the reader and the card use it).

A dataset is a folder:

  dataset.json                 what made it and how to read it (see `describe_codec`, `finalize` in export.py)
  README.md                    a short dataset card
  shard-rRR-NNNNNN.parquet     Parquet (zstd) shards; NNNNNN is the global shard index (utterances
                               NNNNNN*S .. NNNNNN*S+S-1 of the manifest, S = shard size), RR the rank that wrote it

Row schema (one row per utterance, in manifest order within a shard):

  id          string
  codes       list<list<uint16>>   codes[k][t]: codebook k, frame t (uint32 when a codebook has > 65536 entries)
  n_codebooks int32                K
  n_frames    int32                T = ceil(n_samples / frame_size)
  n_samples   int64                samples of the audio at the codec's sample rate
  duration    float64              seconds (n_samples / sample_rate)
  text, speaker, language          string, present as columns when any manifest line has them (null elsewhere)
  source      string               the audio file (absolute, normalised path as resolved from the manifest)

Nested lists are what `datasets` (Sequence(Sequence(Value('uint16')))), DuckDB (`USMALLINT[][]`), Spark and
pandas read without any custom decoding; `np.asarray(row["codes"])` gives the [K, T] array.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pyarrow as pa

from ..errors import UserError

FORMAT = "neurocodec.tokens.v1"
INFO_FILE = "dataset.json"
CARD_FILE = "README.md"
SHARD_RE = re.compile(r"^shard-r(\d+)-(\d+)\.parquet$")
OPTIONAL_TEXT_COLUMNS = ("text", "speaker", "language")
METADATA_KEY = b"neurocodec"  # Parquet key-value metadata of a shard: JSON (shard index, bad files, ...)


def shard_name(rank: int, index: int) -> str:
    return f"shard-r{rank:02d}-{index:06d}.parquet"


def code_dtype(cardinalities: list[int]) -> pa.DataType:
    return pa.uint16() if max(cardinalities) <= 1 << 16 else pa.uint32()


def row_schema(cardinalities: list[int], text_columns: list[str]) -> pa.Schema:
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("codes", pa.list_(pa.list_(code_dtype(cardinalities))), nullable=False),
        pa.field("n_codebooks", pa.int32(), nullable=False),
        pa.field("n_frames", pa.int32(), nullable=False),
        pa.field("n_samples", pa.int64(), nullable=False),
        pa.field("duration", pa.float64(), nullable=False),
    ]
    fields += [pa.field(name, pa.string()) for name in text_columns]
    fields.append(pa.field("source", pa.string(), nullable=False))
    return pa.schema(fields)


def codebook_order(codec) -> list[dict]:
    """What each row k of `codes` is, per quantizer family (see neurocodec/codecs/quantizers.py)."""
    q = codec.quantizer.config
    cards = codec.cardinality
    out = []
    for k in range(codec.num_codebooks):
        entry = {"index": k, "cardinality": cards[k]}
        if q.kind == "grvq":  # layer-major, then group (HiFi-Codec order)
            entry.update(layer=k // q.groups, group=k % q.groups)
        elif q.kind in ("rvq", "rfsq"):
            entry.update(layer=k)
        elif q.kind == "semantic+rvq":  # codecs/semanticodec.py: row 0 semantic, then acoustic RVQ layers
            entry.update({"role": "semantic"} if k == 0 else {"role": "acoustic", "layer": k - 1})
        out.append(entry)
    return out


ORDER_TEXT = {
    "grvq": "layer-major, then group: [L0G0, L0G1, ..., L1G0, ...] (HiFi-Codec order); "
            "the first `groups` codebooks are the coarsest residual layer",
    "rvq": "residual layer 0, 1, ... (coarse to fine)",
    "rfsq": "residual layer 0, 1, ... (coarse to fine)",
    "fsq": "one codebook (FSQ index)",
    "vq": "one codebook",
    "lfq": "one codebook (LFQ index)",
    "semantic+rvq": "row 0: semantic token (k-means id predicted by the causal student); then acoustic RVQ "
                    "layers 0, 1, ... (coarse to fine)",
}


def code_layout(codec) -> dict:
    cards = codec.cardinality
    return {
        "column": "codes",
        "arrow_type": f"list<list<{code_dtype(cards)}>>",
        "axes": "codes[k][t]: codebook k, frame t",
        "quantizer": codec.quantizer.config.kind,
        "order": ORDER_TEXT.get(codec.quantizer.config.kind, ""),
        "codebooks": codebook_order(codec),
        "flat_vocab_size": int(sum(cards)),
        "delay_pad_id": int(max(cards)),
    }




def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def read_info(folder: str | Path) -> dict:
    path = Path(folder) / INFO_FILE
    if not path.is_file():
        raise UserError(f"{folder}: not a token dataset (no {INFO_FILE})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err})") from None
    if info.get("format") != FORMAT:
        raise UserError(f"{path}: format {info.get('format')!r} is not {FORMAT}")
    return info
