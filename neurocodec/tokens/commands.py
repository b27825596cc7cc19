"""`neurocodec export` (manifest -> token dataset) and `neurocodec decode-tokens` (a row -> audio)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..config import DEFAULT_MODEL, MODEL_HELP
from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="encode a manifest into a sharded Parquet token dataset (resumable)",
                       description="Encode every utterance of a manifest into Parquet token shards plus dataset.json and "
                                   "a dataset card. Rerunning the same command resumes: finished shards are kept. "
                                   "The same command runs on many GPUs/nodes (Lightning predict loop, one writer per rank).")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--manifest", required=True, help="JSONL manifest (id, path, text, speaker, ...); for an image model, a folder of images")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--shard-size", type=int, default=1000, help="utterances per shard (default 1000)")
    p.add_argument("--batch-size", type=int, default=16, help="utterances per encoder batch (default 16)")
    p.add_argument("--num-codebooks", type=int, default=None, help="keep the first K codebooks (lower bitrate)")
    p.add_argument("--workers", type=int, default=1, help="audio-loading worker processes per rank (default 1)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, cpu, gpu, ... (default auto)")
    p.add_argument("--devices", default="auto", help="Lightning devices per node: auto, N, or a list (default auto)")
    p.add_argument("--num-nodes", type=int, default=1, help="Lightning nodes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an export of something else in --out")
    p.add_argument("--float32", action="store_true",
                   help="encode in float32 (several times faster on CPU; a few near-tie frames may then differ from "
                        "`neurocodec encode`; recorded in dataset.json). Default: exact float64 encoding")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("decode-tokens", help="resynthesise one row of a token dataset to audio")
    p.add_argument("dataset", help="token dataset folder (with dataset.json)")
    p.add_argument("--id", required=True, help="utterance id")
    p.add_argument("-o", "--output", required=True, help="audio file (.wav, .flac, ...)")
    p.add_argument("--model", default=None,
                   help="checkpoint or config[:preset]; default: the model recorded in dataset.json")
    p.add_argument("--allow-other-model", action="store_true",
                   help="decode even if the model's weights differ from those that made the dataset")
    p.set_defaults(func=cmd_decode_tokens)


def cmd_export(args: argparse.Namespace) -> int:
    from ..codecs.checkpoint import family_of_spec
    from .export import ExportOptions, run_export

    family = family_of_spec(args.model)
    own = family.hook("export") if family is not None else None
    if own is not None:  # e.g. an image codec: --manifest is a folder of images (neurocodec/image/export.py)
        return own(args)
    info = run_export(ExportOptions(model=args.model, manifest=args.manifest, out=args.out, shard_size=args.shard_size,
                                    batch_size=args.batch_size, num_codebooks=args.num_codebooks, workers=args.workers,
                                    accelerator=args.accelerator, devices=args.devices, num_nodes=args.num_nodes,
                                    overwrite=args.overwrite, encoding="float32" if args.float32 else "exact"))
    if info:  # rank 0
        print(f"{args.out}: {info['rows']} rows, {info['hours']:.3f} h of audio, {len(info['files'])} shards, "
              f"{info['num_bad']} unreadable file(s) skipped; {info['num_codebooks']} codebooks at "
              f"{info['frame_rate']:g} frames/s ({info['bitrate_bps'] / 1000:.2f} kbps = sum log2(cardinality) x frame rate)")
        for bad in info["bad_files"][:10]:
            print(f"  skipped {bad['id']}: {bad['error']}", file=sys.stderr)
    return 0


def codec_for_dataset(info: dict, model: str | None = None, allow_other: bool = False):
    """The codec that made a dataset: `model` if given, else its checkpoint, else its config and seed."""
    import tempfile

    import yaml

    from ..codecs.checkpoint import load_codec
    from ..codecs.checkpoint import weights_sha256

    desc = info["codec"]
    if model is not None:
        codec = load_codec(model)
    elif desc.get("checkpoint") and Path(desc["checkpoint"]).is_file():
        codec = load_codec(desc["checkpoint"])
    elif desc.get("config_only"):
        # Through load_codec itself (a config file holding the recorded model section), so the model gets
        # exactly the seeded init, codebook warm start and inference preparation the export had.
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "model.yaml"
            path.write_text(yaml.safe_dump({"name": desc["name"].split(":")[0], "model": desc["config"]}))
            codec = load_codec(str(path))
        codec._name = desc["name"]
    else:
        raise UserError(f"the dataset's checkpoint {desc.get('checkpoint')} is not there; pass --model")
    if weights_sha256(codec) != desc["weights_sha256"] and not allow_other:
        raise UserError("the model's weights differ from those that made the dataset "
                        f"(weights sha256 {desc['weights_sha256'][:16]}…); pass --allow-other-model to decode anyway")
    return codec


def cmd_decode_tokens(args: argparse.Namespace) -> int:
    import torch

    from ..audio import save_audio
    from .reader import TokenDataset

    ds = TokenDataset(args.dataset)
    row = ds.row(args.id)
    torch.set_grad_enabled(False)
    codec = codec_for_dataset(ds.info, args.model, args.allow_other_model)
    codes = torch.from_numpy(row["codes"]).unsqueeze(0)
    wav = codec.decode(codes)[..., : row["n_samples"]]
    save_audio(args.output, wav[0], codec.sample_rate)
    print(f"{args.id}: {codes.shape[1]} codebooks x {codes.shape[2]} frames -> {wav.shape[-1] / codec.sample_rate:.2f} s "
          f"at {codec.sample_rate} Hz -> {args.output}")
    return 0
