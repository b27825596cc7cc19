"""`neurocodec export --model IMAGE_MODEL --manifest FOLDER --out DIR`: a folder of images -> Parquet token grids.

Same folder layout as audio token datasets (`neurocodec.tokens.format`): `dataset.json`, `README.md` and
`shard-r00-NNNNNN.parquet` shards (zstd). Row schema:

  id            string                 path of the image relative to the input folder, without suffix
  codes         list<list<list<u16>>>  codes[k][y][x] (uint32 if a codebook has > 65536 entries); np.asarray -> [K, h, w]
  n_codebooks   int32                  K
  grid_height   int32                  h = ceil(height / f)
  grid_width    int32                  w = ceil(width / f)
  height, width int32                  pixels of the image
  bpp           float64                sum_k log2(cardinality_k) * h * w / (height * width)
  source        string                 absolute path of the image

Codes equal those of `neurocodec encode` (each image is encoded alone, in exact float64 encoding). Resumable:
shard i holds images [i*S, (i+1)*S) of the sorted file list; finished shards are kept on a rerun of the same
export; a folder made by a different export is refused unless --overwrite. Unreadable images are skipped
and listed in dataset.json. Runs in one process (image folders for tokenizers of this size encode at
several images per second on a CPU); the Lightning multi-GPU path is the audio export's.
"""

from __future__ import annotations

import hashlib
import json
import sys
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ..errors import UserError
from ..tokens import format as fmt
from .io import list_images, load_image

IMAGE_FORMAT = "neurocodec.image_tokens.v1"


def row_schema(cardinalities: list[int]) -> pa.Schema:
    dtype = fmt.code_dtype(cardinalities)
    return pa.schema([
        pa.field("id", pa.string(), nullable=False),
        pa.field("codes", pa.list_(pa.list_(pa.list_(dtype))), nullable=False),
        pa.field("n_codebooks", pa.int32(), nullable=False),
        pa.field("grid_height", pa.int32(), nullable=False),
        pa.field("grid_width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("bpp", pa.float64(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ])


def run_image_export(model: str, folder: str, out: str, shard_size: int = 1000, num_codebooks: int | None = None,
                     overwrite: bool = False, progress: bool = True) -> dict:
    from tqdm import tqdm

    from ..codecs.checkpoint import load_codec
    from ..tokens.export import describe_codec

    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"{folder}: an image codec exports a folder of images; this is not a folder")
    if shard_size < 1:
        raise UserError("--shard-size must be >= 1")
    paths = list_images(root)
    if not paths:
        raise UserError(f"{folder}: no image files (.png, .jpg, .webp, ...)")
    torch.set_grad_enabled(False)
    codec = load_codec(model)
    if num_codebooks is not None:
        codec.set_num_codebooks(num_codebooks)
    desc = describe_codec(codec, model)
    files_hash = hashlib.sha256("\n".join(str(p.relative_to(root)) for p in paths).encode()).hexdigest()
    fingerprint = hashlib.sha256(json.dumps([desc["weights_sha256"], codec.num_codebooks, files_hash, shard_size]).encode()).hexdigest()
    out_dir = Path(out)
    info_path = out_dir / fmt.INFO_FILE
    if info_path.is_file():
        old = json.loads(info_path.read_text())
        if old.get("fingerprint") != fingerprint:
            if not overwrite:
                raise UserError(f"{out}: holds a different export (other model, codebooks, images or shard size); "
                                f"use another --out or --overwrite")
            for shard in out_dir.glob("shard-*.parquet"):
                shard.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = row_schema(codec.quantizer.cardinalities)
    num_shards = -(-len(paths) // shard_size)
    bad: list[dict] = []
    rows_total = 0
    bar = tqdm(total=len(paths), desc="images", unit="img", disable=not progress, file=sys.stderr)
    for index in range(num_shards):
        target = out_dir / fmt.shard_name(0, index)
        chunk = paths[index * shard_size:(index + 1) * shard_size]
        if target.is_file():  # finished by an earlier run of this export
            meta = json.loads((pq.read_schema(target).metadata or {}).get(fmt.METADATA_KEY, b"{}"))
            bad += meta.get("bad_files", [])
            rows_total += pq.read_metadata(target).num_rows
            bar.update(len(chunk))
            continue
        rows = {name: [] for name in schema.names}
        shard_bad = []
        for path in chunk:
            try:
                img = load_image(path)
            except UserError as err:
                shard_bad.append({"id": str(path.relative_to(root)), "error": str(err)})
                bar.update(1)
                continue
            h, w = img.shape[-2:]
            codes = codec.encode(img.unsqueeze(0))[0].cpu().numpy()
            rows["id"].append(str(path.relative_to(root).with_suffix("")))
            rows["codes"].append(codes.tolist())
            rows["n_codebooks"].append(codes.shape[0])
            rows["grid_height"].append(codes.shape[1])
            rows["grid_width"].append(codes.shape[2])
            rows["height"].append(h)
            rows["width"].append(w)
            rows["bpp"].append(codec.bpp(h, w))
            rows["source"].append(str(path.resolve()))
            bar.update(1)
        table = pa.Table.from_pydict(rows, schema=schema).replace_schema_metadata(
            {fmt.METADATA_KEY: json.dumps({"shard": index, "bad_files": shard_bad})})
        tmp = target.with_name("." + target.name + ".tmp")
        pq.write_table(table, tmp, compression="zstd")
        tmp.replace(target)  # a shard is complete or absent
        bad += shard_bad
        rows_total += table.num_rows
    bar.close()
    info = {
        "format": IMAGE_FORMAT, "modality": "image", "fingerprint": fingerprint,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "codec": desc, "num_codebooks": codec.num_codebooks, "cardinality": codec.cardinality,
        "downsample": codec.downsample, "bits_per_token": codec.bits_per_token,
        "code_layout": "codes[k][y][x]: codebook k (residual/group order of the quantizer), grid row y, column x",
        "source_folder": str(root.resolve()), "rows": rows_total, "shard_size": shard_size,
        "files": sorted(p.name for p in out_dir.glob("shard-*.parquet")), "num_bad": len(bad), "bad_files": bad,
    }
    fmt.write_json_atomic(info_path, info)
    card = ["# Image token dataset", "",
            f"{rows_total} images from `{root}` encoded by `{desc['name']}` ({desc['family']} family, downsampling "
            f"{codec.downsample}, {codec.num_codebooks} codebooks of {', '.join(map(str, codec.cardinality))} entries, "
            f"{codec.bits_per_token:.2f} bits per token).", "",
            "Load: `datasets.load_dataset('parquet', data_files='shard-*.parquet')`; "
            "`np.asarray(row['codes'])` is the [K, h, w] token grid; decode with "
            f"`neurocodec decode tokens.npy -o out.png --model {desc['spec']}` after `np.save('tokens.npy', codes)`."]
    fmt.write_text_atomic(out_dir / fmt.CARD_FILE, "\n".join(card) + "\n")
    return info


def export_image_tokens(args) -> int:
    """`neurocodec export` with an image model (the image family's "export" hook): --manifest is a folder of images."""
    info = run_image_export(args.model, args.manifest, args.out, args.shard_size, args.num_codebooks, args.overwrite)
    print(f"{args.out}: {info['rows']} images, {len(info['files'])} shards, {info['num_bad']} unreadable file(s) "
          f"skipped; {info['num_codebooks']} codebooks, {info['bits_per_token']:.2f} bits per token")
    return 0
