"""Reading a token dataset: pyarrow or Hugging Face `datasets`, rows as [K, T] arrays, LM-ready sequences."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError
from . import format as fmt
from . import layout as _layout


class TokenDataset:
    """A token dataset folder written by `neurocodec export`.

    `info` is dataset.json; `files` the shard paths (in shard order); `table()` a pyarrow Table;
    `hf()` a `datasets.Dataset`; `codes(id)` the [K, T] array of one row; `sequences(...)` LM-ready items.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.info = fmt.read_info(self.folder)
        if not self.info.get("complete"):
            warnings.warn(f"{self.folder}: the export is incomplete (missing shards: "
                          f"{self.info.get('missing_shards', 'unknown')}); rerun it to finish", stacklevel=2)
        self.files = [self.folder / name for name in self.info.get("files", [])]
        missing = [str(p) for p in self.files if not p.is_file()]
        if missing:
            raise UserError(f"{self.folder}: shard files listed in {fmt.INFO_FILE} are missing: {', '.join(missing[:3])}")
        self._index: dict[str, tuple[int, int]] | None = None

    # -- description ----------------------------------------------------------------------------------
    @property
    def num_codebooks(self) -> int:
        return int(self.info["num_codebooks"])

    @property
    def cardinality(self) -> list[int]:
        return list(self.info["cardinality"])

    @property
    def pad_id(self) -> int:
        """Id of the empty cells of the delay pattern: one past the largest real code."""
        return int(max(self.cardinality))

    def __len__(self) -> int:
        return int(self.info["rows"])

    # -- whole-table access -------------------------------------------------------------------------------
    def table(self, columns: list[str] | None = None) -> pa.Table:
        if not self.files:
            return fmt.row_schema(self.cardinality, []).empty_table()
        return pa.concat_tables([pq.read_table(p, columns=columns) for p in self.files])

    def hf(self, **kwargs):
        """The dataset as a Hugging Face `datasets.Dataset` (split "train")."""
        import datasets

        return datasets.load_dataset("parquet", data_files=[str(p) for p in self.files], split="train", **kwargs)

    # -- rows --------------------------------------------------------------------------------------------
    def rows(self, columns: list[str] | None = None, batch_size: int = 256) -> Iterator[dict]:
        """Rows as dicts, `codes` as a numpy [K, T] array; one shard in memory at a time."""
        for path in self.files:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
                names = [n for n in batch.schema.names if n != "codes"]
                plain = batch.select(names).to_pylist()
                arrays = codes_arrays(batch.column("codes")) if "codes" in batch.schema.names else None
                for i, row in enumerate(plain):
                    if arrays is not None:
                        row["codes"] = arrays[i]
                    yield row

    def __iter__(self) -> Iterator[dict]:
        return self.rows()

    def row(self, utt_id: str) -> dict:
        if self._index is None:
            self._index = {}
            for f, path in enumerate(self.files):
                for r, i in enumerate(pq.read_table(path, columns=["id"]).column("id").to_pylist()):
                    self._index[i] = (f, r)
        if utt_id not in self._index:
            raise UserError(f"{self.folder}: no row with id {utt_id!r}")
        f, r = self._index[utt_id]
        table = pq.read_table(self.files[f]).slice(r, 1)
        row = table.drop_columns(["codes"]).to_pylist()[0]
        row["codes"] = codes_arrays(table.column("codes").combine_chunks())[0]
        return row

    def codes(self, utt_id: str) -> np.ndarray:
        return self.row(utt_id)["codes"]

    # -- LM-ready sequences ---------------------------------------------------------------------------------
    def sequences(self, layout: str = "flat", offset: bool = False) -> Iterator[dict]:
        """Yield {id, text, speaker, n_frames, tokens} per row (layouts: see `to_sequence`)."""
        for row in self.rows():
            yield {"id": row["id"], "text": row.get("text"), "speaker": row.get("speaker"), "n_frames": row["n_frames"],
                   "tokens": to_sequence(row["codes"], layout, self.cardinality, offset=offset, pad_id=self.pad_id)}


def codes_arrays(column: pa.Array) -> list[np.ndarray]:
    """A `codes` column (list<list<uint>>) -> one int64 [K, T] array per row, straight from Arrow buffers."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    outer = column.offsets.to_numpy()
    inner_lists = column.values
    inner = inner_lists.offsets.to_numpy()
    flat = inner_lists.values.to_numpy(zero_copy_only=False).astype(np.int64)
    out = []
    for i in range(len(column)):
        a, b = outer[i], outer[i + 1]
        out.append(flat[inner[a]:inner[b]].reshape(b - a, -1) if b > a else np.zeros((0, 0), np.int64))
    return out


def to_sequence(codes: np.ndarray, layout_name: str, cardinality: list[int], offset: bool = False,
                pad_id: int | None = None) -> np.ndarray:
    """codes [K, T] -> LM tokens.

    `flat`: [T*K] frame-major (with `offset`, codebook k's ids start at sum(cardinality[:k]));
    `delay`: [K, T+K-1] MusicGen delay pattern, empty cells = `pad_id` (default max(cardinality));
    `codes`: the [K, T] array unchanged.
    """
    if layout_name == "flat":
        return _layout.flatten(codes, cardinality if offset else None)
    if layout_name == "delay":
        return _layout.delay(codes, max(cardinality) if pad_id is None else pad_id)
    if layout_name == "codes":
        return np.asarray(codes, dtype=np.int64)
    raise UserError(f"unknown layout {layout_name!r}: use flat, delay or codes")


def load_table(folder: str | Path) -> pa.Table:
    return TokenDataset(folder).table()


def load_hf(folder: str | Path, **kwargs):
    return TokenDataset(folder).hf(**kwargs)
