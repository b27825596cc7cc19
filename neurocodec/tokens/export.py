"""`neurocodec export`: a manifest of audio -> a sharded Parquet token dataset (format: see format.py).

One code path on a laptop CPU and on many GPUs / nodes: a Lightning predict loop. Each rank encodes the
shards assigned to it and a `BasePredictionWriter` callback writes them, one writer per rank.

Reproducibility and resume:
  * shard i holds utterances [i*S, (i+1)*S) of the manifest (S = --shard-size) and belongs to rank
    i % world_size, so a rerun recomputes exactly the same shards whatever was done before;
  * a shard is written to a hidden temp file and renamed into place, so it is either complete or absent;
    shards already present (written by any rank) are skipped;
  * `dataset.json` carries a fingerprint (weights, config, codebooks, manifest hash, shard size); a rerun
    into a folder made by a different export is refused rather than mixed;
  * codes do not depend on batching: items are zero-padded to the longest of the batch and cut back to
    ceil(n_samples / frame_size) frames, and the codec is causal, so padding never reaches their frames.
Unreadable audio is skipped, and listed in the shard's metadata, `dataset.json` and the card.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..codecs.checkpoint import weights_sha256
from ..data.manifest import Utterance, read_manifest
from ..errors import UserError
from . import format as fmt

# Test hook: SIGKILL this process in the middle of writing shard N+1 (after its temp file is written,
# before the rename), to check that a killed export resumes to the same dataset.
KILL_AFTER_ENV = "NEUROCODEC_EXPORT_KILL_AFTER_SHARDS"


# -- what to export ------------------------------------------------------------------------------------
def is_checkpoint_spec(spec: str) -> bool:
    """Same rule as `load_codec`: a `.safetensors` path or an existing non-YAML file is a checkpoint."""
    path = Path(spec)
    return spec.endswith(".safetensors") or (path.is_file() and path.suffix not in (".yaml", ".yml"))


def describe_codec(codec, spec: str) -> dict:
    from ..codecs.checkpoint import config_of, file_sha256

    out = {"name": codec.name, "family": codec.config.family, "spec": spec, "config": config_of(codec)}
    if is_checkpoint_spec(spec):
        out.update(checkpoint=str(Path(spec).resolve()), checkpoint_sha256=file_sha256(spec), config_only=False)
    else:
        out.update(checkpoint=None, checkpoint_sha256=None, config_only=True, seed=codec.config.seed,
                   note="no checkpoint file: weights initialised from the config's seed (and k-means warm start "
                        "of the codebooks on seeded noise), identical in every process; see weights_sha256")
    out["weights_sha256"] = weights_sha256(codec)
    return out


@dataclass
class Plan:
    utterances: list[Utterance]
    shard_size: int
    text_columns: list[str]
    manifest: dict
    fingerprint: str

    @property
    def num_shards(self) -> int:
        return -(-len(self.utterances) // self.shard_size)

    def shard_range(self, index: int) -> range:
        return range(index * self.shard_size, min(len(self.utterances), (index + 1) * self.shard_size))


def make_plan(manifest_path: str | Path, shard_size: int, codec_desc: dict, num_codebooks: int,
              encoding: str = "exact", batch_size: int = 16) -> Plan:
    if shard_size < 1:
        raise UserError("--shard-size must be at least 1")
    from ..codecs.checkpoint import file_sha256

    utterances = read_manifest(manifest_path)
    if not utterances:
        raise UserError(f"manifest {manifest_path} has no utterances")
    text_columns = [c for c in fmt.OPTIONAL_TEXT_COLUMNS if any(getattr(u, c) is not None for u in utterances)]
    manifest = {"path": str(Path(manifest_path).resolve()), "sha256": file_sha256(manifest_path),
                "utterances": len(utterances)}
    key = {"format": fmt.FORMAT, "weights_sha256": codec_desc["weights_sha256"], "config": codec_desc["config"],
           "num_codebooks": num_codebooks, "manifest_sha256": manifest["sha256"], "shard_size": shard_size,
           "encoding": encoding}
    if encoding != "exact":  # float32 codes depend on batch shapes: a resume must batch the same way
        key["batch_size"] = batch_size
    fingerprint = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    return Plan(utterances, shard_size, text_columns, manifest, fingerprint)


def existing_shards(out: Path) -> dict[int, list[Path]]:
    found: dict[int, list[Path]] = {}
    if out.is_dir():
        for path in sorted(out.iterdir()):
            m = fmt.SHARD_RE.match(path.name)
            if m:
                found.setdefault(int(m.group(2)), []).append(path)
    return found


# -- data: audio items and batches that never straddle shards ------------------------------------------
class AudioItems(torch.utils.data.Dataset):
    def __init__(self, utterances: list[Utterance], sample_rate: int) -> None:
        self.utterances = utterances
        self.sample_rate = sample_rate

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int):
        from ..audio import load_audio

        try:
            return index, load_audio(self.utterances[index].path, self.sample_rate)[0], None
        except Exception as err:  # noqa: BLE001 - a corpus export skips and lists any file it cannot read
            return index, None, f"{type(err).__name__}: {err}"


class ShardBatches(torch.utils.data.Sampler):
    """Batches of manifest positions that never straddle two shards; within a shard, similar durations go
    together (less padding). Any order gives the same codes; this one is also deterministic."""

    def __init__(self, plan: Plan, shards: list[int], batch_size: int) -> None:
        self.batches = []
        for s in shards:
            idx = sorted(plan.shard_range(s), key=lambda i: plan.utterances[i].duration or 0.0)
            self.batches += [idx[j:j + batch_size] for j in range(0, len(idx), batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def collate(items) -> dict:
    good = [(i, w) for i, w, _ in items if w is not None]
    lengths = torch.tensor([w.shape[-1] for _, w in good], dtype=torch.long)
    wav = torch.zeros(len(good), 1, int(lengths.max()) if good else 0)
    for row, (_, w) in enumerate(good):
        wav[row, 0, : w.shape[-1]] = w
    return {"index": [i for i, _ in good], "wav": wav, "lengths": lengths,
            "bad": [(i, err) for i, w, err in items if w is None]}


# -- Lightning: the model step, the data, the writer -----------------------------------------------------
def _lightning():
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import BasePredictionWriter

    class EncodeModule(pl.LightningModule):
        def __init__(self, codec) -> None:
            super().__init__()
            self.codec = codec

        def predict_step(self, batch, batch_idx):
            wav, lengths = batch["wav"], batch["lengths"]
            if wav.shape[0] == 0:
                return []
            codes = self.codec.encode(wav).to(torch.int32).cpu()
            if codes.numel() and int(codes.min()) < 0:  # would wrap round in the unsigned column
                raise RuntimeError("the codec returned negative codes")
            frames = (lengths + self.codec.frame_size - 1) // self.codec.frame_size
            return [codes[b, :, : int(frames[b])].numpy() for b in range(codes.shape[0])]

    class ExportData(pl.LightningDataModule):
        def __init__(self, plan: Plan, sample_rate: int, batch_size: int, workers: int, out: Path) -> None:
            super().__init__()
            self.plan, self.sample_rate, self.batch_size, self.workers, self.out = plan, sample_rate, batch_size, workers, out
            self.todo: list[int] = []

        def predict_dataloader(self):
            rank, world = self.trainer.global_rank, self.trainer.world_size
            done = existing_shards(self.out)
            self.todo = [s for s in range(self.plan.num_shards) if s % world == rank and s not in done]
            batches = ShardBatches(self.plan, self.todo, self.batch_size)
            return torch.utils.data.DataLoader(AudioItems(self.plan.utterances, self.sample_rate), batch_sampler=batches,
                                               num_workers=self.workers, collate_fn=collate,
                                               persistent_workers=False, prefetch_factor=4 if self.workers else None)

    class ShardWriter(BasePredictionWriter):
        """Collects each shard's rows as its batches come in; writes a shard as soon as it is whole."""

        def __init__(self, plan: Plan, out: Path, codec, data: ExportData) -> None:
            super().__init__(write_interval="batch")
            self.plan, self.out, self.data = plan, out, data
            self.sample_rate, self.frame_size = codec.sample_rate, codec.frame_size
            self.schema = fmt.row_schema(codec.cardinality, plan.text_columns)
            self.code_type = fmt.code_dtype(codec.cardinality)
            self.pending: dict[int, dict] = {}
            self.written = 0
            self.kill_after = int(os.environ.get(KILL_AFTER_ENV, "-1"))
            self.bar = None
            self.seconds_done = 0.0
            self.started = 0.0

        def on_predict_start(self, trainer, pl_module) -> None:
            from tqdm import tqdm

            durations = [self.plan.utterances[i].duration for s in self.data.todo for i in self.plan.shard_range(s)]
            total = sum(durations) / 3600 if durations and all(d is not None for d in durations) else None
            fmt_bar = ("{desc}: {percentage:3.0f}%|{bar}| {n:.4f}/{total:.4f} h audio [{elapsed}<{remaining}{postfix}]"
                       if total else "{desc}: {n:.4f} h audio [{elapsed}{postfix}]")
            self.bar = tqdm(total=total, desc=f"export r{trainer.global_rank}", bar_format=fmt_bar,
                            disable=trainer.global_rank != 0, dynamic_ncols=True, file=sys.stderr)
            self.started = time.perf_counter()

        def on_predict_end(self, trainer, pl_module) -> None:
            if self.bar is not None:
                if self.bar.total is not None:
                    self.bar.n = self.bar.total
                    self.bar.refresh()
                self.bar.close()

        def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx):
            indices = list(batch["index"]) + [i for i, _ in batch["bad"]]
            if not indices:
                return
            shard = indices[0] // self.plan.shard_size
            acc = self.pending.setdefault(shard, {"rows": {}, "bad": [], "seen": 0})
            for i, codes, n in zip(batch["index"], prediction, batch["lengths"].tolist()):
                acc["rows"][i] = (codes, n)
            acc["bad"] += list(batch["bad"])
            acc["seen"] += len(indices)
            seconds = float(batch["lengths"].sum()) / self.sample_rate
            self.seconds_done += seconds
            if self.bar is not None:
                elapsed = max(time.perf_counter() - self.started, 1e-9)
                self.bar.set_postfix_str(f"{self.seconds_done / 3600 / elapsed:.4f} h audio/s, "
                                         f"{self.seconds_done / elapsed:.0f}x real time", refresh=False)
                # manifest durations are rounded: never step past the total
                step = seconds / 3600 if self.bar.total is None else min(seconds / 3600, self.bar.total - self.bar.n)
                self.bar.update(max(step, 0.0))
            if acc["seen"] == len(self.plan.shard_range(shard)):
                self.write_shard(shard, self.pending.pop(shard), trainer.global_rank)

        def write_shard(self, shard: int, acc: dict, rank: int) -> None:
            order = sorted(acc["rows"])
            table = self.rows_table(order, acc["rows"])
            bad = [{"id": self.plan.utterances[i].id, "path": os.path.abspath(self.plan.utterances[i].path), "error": err}
                   for i, err in sorted(acc["bad"])]
            meta = {"shard": shard, "rank": rank, "first": self.plan.shard_range(shard).start,
                    "stop": self.plan.shard_range(shard).stop, "rows": table.num_rows,
                    "seconds": float(sum(n for _, n in acc["rows"].values())) / self.sample_rate, "bad": bad}
            table = table.replace_schema_metadata({fmt.METADATA_KEY: json.dumps(meta, ensure_ascii=False)})
            name = fmt.shard_name(rank, shard)
            tmp = self.out / f".{name}.tmp-{os.getpid()}"
            if table.num_rows:
                pq.write_table(table, tmp, compression="zstd")
            else:  # every file of the shard unreadable: no row group at all (a 0-row group trips `datasets`)
                pq.ParquetWriter(tmp, table.schema, compression="zstd").close()
            if self.written == self.kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            tmp.replace(self.out / name)
            self.written += 1

        def rows_table(self, order: list[int], rows: dict) -> pa.Table:
            utts = [self.plan.utterances[i] for i in order]
            codes = [rows[i][0] for i in order]
            n_samples = [rows[i][1] for i in order]
            k = [c.shape[0] for c in codes]
            t = [c.shape[1] for c in codes]
            # list<list<uint>> built from flat buffers: outer offsets step by K, inner ones by T.
            values = (np.concatenate([c.ravel() for c in codes]) if codes else np.zeros(0)).astype(
                self.code_type.to_pandas_dtype())
            inner = np.concatenate([[0], np.cumsum(np.repeat(t, k))]).astype(np.int32)
            outer = np.concatenate([[0], np.cumsum(k)]).astype(np.int32)
            codes_arr = pa.ListArray.from_arrays(pa.array(outer), pa.ListArray.from_arrays(pa.array(inner), pa.array(values)))
            columns = {
                "id": pa.array([u.id for u in utts], pa.string()),
                "codes": codes_arr,
                "n_codebooks": pa.array(k, pa.int32()),
                "n_frames": pa.array(t, pa.int32()),
                "n_samples": pa.array(n_samples, pa.int64()),
                "duration": pa.array([n / self.sample_rate for n in n_samples], pa.float64()),
            }
            for col in self.plan.text_columns:
                columns[col] = pa.array([getattr(u, col) for u in utts], pa.string())
            columns["source"] = pa.array([os.path.abspath(u.path) for u in utts], pa.string())
            return pa.Table.from_pydict(columns, schema=self.schema)

    return pl, EncodeModule, ExportData, ShardWriter


# -- the whole export -----------------------------------------------------------------------------------
@dataclass
class ExportOptions:
    model: str
    manifest: str
    out: str
    shard_size: int = 1000
    batch_size: int = 16
    num_codebooks: int | None = None
    workers: int = 1
    accelerator: str = "auto"
    devices: str | int = "auto"
    num_nodes: int = 1
    overwrite: bool = False
    encoding: str = "exact"  # "exact" (float64 encoder: codes equal `neurocodec encode`) or "float32" (faster)


ENCODING_NOTES = {
    "exact": "encoder and nearest-code search in float64 (the codec's exact encoding): codes equal "
             "`neurocodec encode` of each file, whatever the batching",
    "float32": "encoder in float32 (faster): reproducible for the same --batch-size (part of the fingerprint), but "
               "near-tie codes (a few percent of frames with an untrained model) differ from `neurocodec encode` "
               "of the file alone",
}


def load_export_codec(spec: str, num_codebooks: int | None):
    from ..codecs.checkpoint import load_codec

    codec = load_codec(spec)
    if num_codebooks is not None:
        codec.set_num_codebooks(num_codebooks)
    return codec


def check_output(out: Path, plan: Plan, overwrite: bool) -> None:
    """Refuse to mix two different exports in one folder; `overwrite` clears ours first."""
    info_path = out / fmt.INFO_FILE
    if overwrite and out.is_dir():
        for paths in existing_shards(out).values():
            for p in paths:
                p.unlink()
        for p in (info_path, out / fmt.CARD_FILE):
            p.unlink(missing_ok=True)
        return
    if info_path.is_file():
        info = fmt.read_info(out)
        if info.get("fingerprint") != plan.fingerprint:
            raise UserError(f"{out} holds an export of a different model, manifest, codebook count, shard size or "
                            "encoding precision; "
                            "choose another --out, or pass --overwrite to replace it")
    elif existing_shards(out):
        raise UserError(f"{out} has shard files but no {fmt.INFO_FILE}; choose another --out or pass --overwrite")


def base_info(codec, codec_desc: dict, plan: Plan, encoding: str) -> dict:
    return {
        "format": fmt.FORMAT,
        "complete": False,
        "fingerprint": plan.fingerprint,
        "codec": codec_desc,
        "sample_rate": codec.sample_rate,
        "frame_rate": codec.frame_rate,
        "frame_size": codec.frame_size,
        "num_codebooks": codec.num_codebooks,
        "cardinality": codec.cardinality,
        "bitrate_bps": codec.bitrate,
        "bitrate_note": "sum over codebooks of log2(cardinality) x frame rate",
        "code_layout": fmt.code_layout(codec),
        "encoding": {"precision": encoding, "note": ENCODING_NOTES[encoding]},
        "columns": [f.name for f in fmt.row_schema(codec.cardinality, plan.text_columns)],
        "manifest": plan.manifest,
        "shard_size": plan.shard_size,
        "num_shards": plan.num_shards,
    }


def finalize(out: Path, info: dict, plan: Plan) -> dict:
    """Check every shard is there, total rows / hours / bad files, write dataset.json and the card."""
    for stale in out.glob(".shard-*.tmp-*"):  # temp files of killed runs
        stale.unlink(missing_ok=True)
    found = existing_shards(out)
    shards, bad, missing = [], [], []
    for index in range(plan.num_shards):
        paths = found.get(index)
        if not paths:
            missing.append(index)
            continue
        for extra in paths[1:]:  # same shard written under another world size: identical content, keep one
            extra.unlink()
        meta = pq.read_metadata(paths[0])
        extra_meta = json.loads(meta.metadata[fmt.METADATA_KEY])
        shards.append({"file": paths[0].name, "index": index, "rows": meta.num_rows,
                       "seconds": extra_meta["seconds"], "bad": len(extra_meta["bad"])})
        bad += extra_meta["bad"]
    info = dict(info)
    info.update(
        complete=not missing,
        rows=sum(s["rows"] for s in shards),
        hours=sum(s["seconds"] for s in shards) / 3600,
        num_bad=len(bad),
        bad_files=bad,
        files=[s["file"] for s in shards],
        shards=shards,
        created_with={"neurocodec": _version(), "torch": torch.__version__, "pyarrow": pa.__version__,
                      "finished": datetime.now(timezone.utc).isoformat(timespec="seconds")},
    )
    if missing:
        info["missing_shards"] = missing
    fmt.write_json_atomic(out / fmt.INFO_FILE, info)
    fmt.write_text_atomic(out / fmt.CARD_FILE, dataset_card(info))
    return info


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("neurocodec")
    except Exception:  # noqa: BLE001 - not installed: running from a source tree
        return "source"


def dataset_card(info: dict) -> str:
    codec = info["codec"]
    weights = (f"checkpoint `{codec['checkpoint']}` (sha256 `{codec['checkpoint_sha256']}`)" if not codec["config_only"]
               else f"no checkpoint: config `{codec['spec']}` initialised from seed {codec['seed']} "
                    f"(weights sha256 `{codec['weights_sha256'][:16]}…`)")
    layout = info["code_layout"]
    lines = [
        f"# Token dataset: {Path(info['manifest']['path']).parent.name or 'corpus'} → {codec['name']}",
        "",
        f"- **status**: {'complete' if info['complete'] else 'INCOMPLETE — missing shards ' + str(info.get('missing_shards'))}",
        f"- **rows**: {info['rows']} utterances, {info['hours']:.3f} h of audio, in {len(info['files'])} Parquet shards (zstd)",
        f"- **source manifest**: `{info['manifest']['path']}` ({info['manifest']['utterances']} lines, sha256 `{info['manifest']['sha256'][:16]}…`)",
        f"- **codec**: {codec['name']} ({codec['family']}), {weights}",
        f"- **codes**: {info['num_codebooks']} codebooks, cardinalities {info['cardinality']}, {info['frame_rate']:g} frames/s "
        f"at {info['sample_rate']} Hz, {info['bitrate_bps'] / 1000:.2f} kbps ({info['bitrate_note']})",
        f"- **layout**: column `codes` is `{layout['arrow_type']}`, {layout['axes']}; codebook order: {layout['order']}",
        f"- **encoding**: {info['encoding']['precision']} ({info['encoding']['note']})",
        f"- **columns**: {', '.join(info['columns'])}",
        f"- **skipped (unreadable) files**: {info['num_bad']}",
    ]
    for b in info["bad_files"][:50]:
        lines.append(f"  - `{b['id']}` ({b['path']}): {b['error']}")
    if info["num_bad"] > 50:
        lines.append(f"  - … and {info['num_bad'] - 50} more (see dataset.json)")
    lines += [
        "",
        "## Loading",
        "",
        "```python",
        "import datasets, glob",
        "ds = datasets.load_dataset(\"parquet\", data_files=sorted(glob.glob(\"DIR/shard-*.parquet\")), split=\"train\")",
        "import pyarrow.dataset  # or: duckdb.sql(\"SELECT id, codes FROM 'DIR/shard-*.parquet'\")",
        "table = pyarrow.dataset.dataset(\"DIR\", format=\"parquet\").to_table()",
        "from neurocodec.tokens import TokenDataset  # LM-ready sequences: flat or MusicGen delay pattern",
        "for item in TokenDataset(\"DIR\").sequences(layout=\"delay\"): ...",
        "```",
        "",
        "Resynthesise a row: `neurocodec decode-tokens DIR --id ID -o out.wav`.",
        "",
    ]
    return "\n".join(lines)


def run_export(opts: ExportOptions, codec=None) -> dict:
    """Run an export; returns dataset.json's content on global rank 0 ({} on other ranks).

    `codec`: an already loaded codec for `opts.model` (benchmarks reuse one); by default it is loaded."""
    out = Path(opts.out)
    if codec is None:
        codec = load_export_codec(opts.model, opts.num_codebooks)
    elif opts.num_codebooks is not None:
        codec.set_num_codebooks(opts.num_codebooks)
    if opts.encoding not in ENCODING_NOTES:
        raise UserError(f"encoding {opts.encoding!r} is not one of {', '.join(ENCODING_NOTES)}")
    codec_desc = describe_codec(codec, opts.model)
    plan = make_plan(opts.manifest, opts.shard_size, codec_desc, codec.num_codebooks, opts.encoding, opts.batch_size)
    if opts.batch_size < 1:
        raise UserError("--batch-size must be at least 1")
    if opts.workers < 0:
        raise UserError("--workers must be 0 or more")
    out.mkdir(parents=True, exist_ok=True)
    check_output(out, plan, opts.overwrite)
    info = base_info(codec, codec_desc, plan, opts.encoding)
    if hasattr(codec, "set_exact_encoding"):
        codec.set_exact_encoding(opts.encoding == "exact")

    pl, EncodeModule, ExportData, ShardWriter = _lightning()
    data = ExportData(plan, codec.sample_rate, opts.batch_size, opts.workers, out)
    writer = ShardWriter(plan, out, codec, data)
    devices = int(opts.devices) if str(opts.devices).isdigit() else opts.devices
    with warnings.catch_warnings():
        # Lightning's advice for training loops does not apply here (our batch sampler returns every item).
        for message in (".*does not have many workers.*", ".*custom batch sampler.*", ".*LeafSpec.*",
                        ".*Total length of `DataLoader` across ranks is zero.*"):
            warnings.filterwarnings("ignore", message=message)
        trainer = pl.Trainer(accelerator=opts.accelerator, devices=devices, num_nodes=opts.num_nodes, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             use_distributed_sampler=False, inference_mode=True, callbacks=[writer])
        if trainer.is_global_zero:
            if not (out / fmt.INFO_FILE).is_file():
                fmt.write_json_atomic(out / fmt.INFO_FILE, info)  # fingerprint first: a killed run resumes safely
            done = len(existing_shards(out))
            if done:
                print(f"export: {done} of {plan.num_shards} shards already done in {out}; encoding the rest",
                      file=sys.stderr)
        trainer.predict(EncodeModule(codec), datamodule=data, return_predictions=False)
    trainer.strategy.barrier()
    if not trainer.is_global_zero:
        return {}
    result = finalize(out, info, plan)
    if not result["complete"]:
        raise UserError(f"{out}: shards {result['missing_shards']} are missing after the run; rerun the same command")
    return result
