"""`neurocodec kmeans`: fit the k-means that turns semantic-teacher features into semantic token ids."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("kmeans", help="fit k-means over semantic-teacher features (semantic tokens)",
                       description="Mini-batch k-means over the features of one teacher layer at the codec frame "
                                   "rate; the result is loaded by semantic codecs (model.semanticodec.kmeans).")
    p.add_argument("--teacher", required=True,
                   help="a training config with a teacher: section (semanticodec, semanticodec:tiny, path.yaml), "
                        "or a teacher source: local save_pretrained folder or Hugging Face hub id")
    p.add_argument("--manifest", required=True, help="JSONL manifest of the audio to cluster")
    p.add_argument("-o", "--output", required=True, help="k-means file (.safetensors)")
    p.add_argument("--split", default="train", help="manifest split to use ('all' for every line; default train)")
    p.add_argument("--clusters", type=int, default=None,
                   help="number of clusters (default: the config's model.semanticodec.clusters, else 500)")
    p.add_argument("--layer", type=int, default=None, help="teacher hidden state (default: the config's teacher.layer)")
    p.add_argument("--frame-rate", type=float, default=None,
                   help="frames per second of the features (default: the config's codec frame rate, else 50)")
    p.add_argument("--batch-size", type=int, default=4096, help="frames per mini-batch")
    p.add_argument("--iters", type=int, default=300, help="mini-batch steps")
    p.add_argument("--max-frames", type=int, default=1_000_000, help="subsample the corpus to about this many frames")
    p.add_argument("--max-files", type=int, default=None, help="use only the first N files of the split")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device of the teacher (cpu, cuda)")
    p.set_defaults(func=cmd_kmeans)


def resolve_teacher(spec: str, layer: int | None = None):
    """(TeacherConfig, frame rate or None, clusters or None) from a config name/path or a teacher source."""
    from ..config import ConfigError, from_dict, load_config, resolve_config_path, split_model_spec
    from ..codecs.teacher import TeacherConfig

    if Path(spec).is_dir():
        teacher = TeacherConfig(source=spec)
        frame_rate = clusters = None
    else:
        name, preset = split_model_spec(spec)
        try:
            resolve_config_path(name)
            is_config = True
        except ConfigError:
            is_config = False
        if is_config:
            raw = load_config(name, preset)
            if not raw.get("teacher"):
                raise ConfigError(f"config {spec} has no teacher: section")
            teacher = from_dict(TeacherConfig, raw["teacher"], "teacher")
            frame_rate, clusters = _model_defaults(raw.get("model") or {})
        elif Path(spec).suffix in (".yaml", ".yml") or spec.startswith((".", "/")):
            raise UserError(f"--teacher {spec}: no such config or folder")
        else:  # a hub id
            teacher = TeacherConfig(source=spec)
            frame_rate = clusters = None
    if layer is not None:
        teacher.layer = layer
    return teacher, frame_rate, clusters


def _model_defaults(model: dict) -> tuple[float | None, int | None]:
    from ..codecs.model import CodecConfig

    config = CodecConfig.from_dict(model)
    frame_rate = config.sample_rate / config.seanet.hop_length
    clusters = (config.semanticodec or {}).get("clusters")
    return frame_rate, clusters


def cmd_kmeans(args: argparse.Namespace) -> int:
    from ..data.manifest import read_manifest
    from ..codecs.kmeans import assign, fit_minibatch_kmeans, inertia, save_kmeans, teacher_frames
    from ..codecs.quantizers import codebook_histogram
    from ..codecs.teacher import build_teacher

    for name in ("batch_size", "iters", "max_frames"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if not str(args.output).endswith(".safetensors"):
        raise UserError(f"-o {args.output}: the k-means file must end in .safetensors")
    teacher_config, config_rate, config_clusters = resolve_teacher(args.teacher, args.layer)
    clusters = args.clusters or config_clusters or 500
    frame_rate = args.frame_rate or config_rate or 50.0
    if clusters < 2:
        raise UserError("--clusters must be >= 2")
    if frame_rate <= 0:
        raise UserError("--frame-rate must be > 0")
    utterances = read_manifest(args.manifest, None if args.split == "all" else args.split)
    if args.max_files is not None:
        utterances = utterances[: args.max_files]
    if not utterances:
        raise UserError(f"manifest {args.manifest} has no files in split {args.split!r}")
    teacher = build_teacher(teacher_config).to(args.device)
    print(f"teacher: {teacher.kind}, layer {teacher.layer} of {teacher.num_layers}, {teacher.dim}-d; "
          f"{len(utterances)} file(s) at {frame_rate:g} frames/s")
    frames = teacher_frames(teacher, utterances, frame_rate, args.max_frames, args.seed)
    centroids = fit_minibatch_kmeans(frames, clusters, args.iters, args.batch_size, args.seed)
    ids = assign(frames, centroids)
    usage = float((codebook_histogram(ids, clusters) > 0).double().mean())
    fit_inertia = inertia(frames, centroids)
    save_kmeans(args.output, centroids, {
        "teacher": teacher_config.describe(), "kind": teacher.kind, "layer": teacher.layer,
        "frame_rate": frame_rate, "frames": int(frames.shape[0]), "inertia": fit_inertia, "usage": usage,
        "seed": args.seed, "manifest": str(args.manifest), "split": args.split,
        "teacher_config": json.dumps({k: v for k, v in vars(teacher_config).items()}),
    })
    print(f"k-means: {clusters} clusters over {frames.shape[0]} frames; mean squared distance {fit_inertia:.4g}, "
          f"{usage:.0%} of clusters used -> {args.output}")
    return 0
