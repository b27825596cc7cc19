"""`neurocodec encode | decode | info`: whole files through a codec, offline or through the streaming path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ..config import DEFAULT_MODEL, MODEL_HELP
from ..errors import CodesError, UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("encode", help="audio file -> codes [K, T] (.npy)")
    p.add_argument("input", help="audio file (any rate / channel count soundfile reads)")
    p.add_argument("-o", "--output", required=True, help="codes file (.npy, integer array [K, T])")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--num-codebooks", type=int, default=None, help="keep the first K codebooks (lower bitrate)")
    p.add_argument("--chunk-ms", type=float, default=None,
                   help="feed the audio through the streaming path in chunks of this many ms (fractions allowed)")
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("decode", help="codes (.npy) -> audio file")
    p.add_argument("input", help="codes file (.npy, integer array [K, T])")
    p.add_argument("-o", "--output", required=True, help="audio file (.wav, .flac, ...)")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--chunk-frames", type=int, default=None, help="decode through the streaming path, N frames at a time")
    p.add_argument("--size", default=None, metavar="WxH", help="image models: crop the decoded image to this size")
    p.set_defaults(func=cmd_decode)

    p = sub.add_parser("export-onnx", help="the streaming encode/decode steps as ONNX graphs with explicit state",
                       description="Write encode_step.onnx and decode_step.onnx (one step of F frames; states in and out, "
                                   "batch in dimension 0), initial_states.npz and streaming.json to a folder. "
                                   "Run them with neurocodec.codecs.onnx_streaming.OnnxStreamingCodec or any ONNX host.")
    p.add_argument("-o", "--output", required=True, help="output folder")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--num-codebooks", type=int, default=None, help="keep the first K codebooks (lower bitrate)")
    p.add_argument("--frames-per-step", type=int, default=1, help="frames per graph call (default 1: one frame of latency)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="export for exactly this many streams: a static graph, faster (default: any number)")
    p.set_defaults(func=cmd_export_onnx)

    p = sub.add_parser("average", help="weighted average of codec files of one network (model soup, WiSE-FT)",
                       description="Average the weights of codec files that share a config: fine-tunes of one model "
                                   "from other seeds or steps (a model soup), or a fine-tune and the model it started "
                                   "from (`default A.safetensors --weights 0.5 0.5`). The result is a codec file like "
                                   "any other; its metadata lists the inputs (averaged_from).")
    p.add_argument("inputs", nargs="+", help="codec files (.safetensors) or `default`; at least two")
    p.add_argument("-o", "--output", required=True, help="codec file to write (.safetensors)")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="one relative weight per input, normalised to sum to 1 (default: uniform)")
    p.add_argument("--codebooks-from", type=int, default=None, metavar="N",
                   help="copy the quantizer's tensors from input N (1-based) instead of averaging them: needed when "
                        "the inputs' EMA codebooks differ, as they do after training (entries are re-drawn)")
    p.add_argument("--average-codebooks", action="store_true",
                   help="average differing codebooks anyway (only sound for inputs whose entries still correspond)")
    p.set_defaults(func=cmd_average)

    p = sub.add_parser("info", help="describe a model: rates, codebooks, bitrate, latency, size")
    p.add_argument("--model", default=DEFAULT_MODEL, help=MODEL_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)


def _load(spec: str, num_codebooks: int | None = None):
    from .checkpoint import load_codec

    torch.set_grad_enabled(False)
    codec = load_codec(spec)
    if num_codebooks is not None:
        codec.set_num_codebooks(num_codebooks)
    return codec


def chunk_bounds(total: int, chunk: float) -> list[tuple[int, int]]:
    """Boundaries of chunks of `chunk` samples (fractional sizes round per boundary, none is empty)."""
    if chunk <= 0:
        raise UserError("chunk size must be positive")
    bounds, start, i = [], 0, 1
    while start < total:
        end = min(total, max(start + 1, int(round(i * chunk))))
        bounds.append((start, end))
        start, i = end, i + 1
    return bounds


def encode_streaming(codec, wav: torch.Tensor, chunk_samples: float) -> torch.Tensor:
    """Codes of `wav` [B, 1, N] through the streaming path; equal to `codec.encode(wav)`."""
    pieces = []
    with codec.encoder.streaming(wav.shape[0]):
        for start, end in chunk_bounds(wav.shape[-1], chunk_samples):
            pieces.append(codec.encode_step(wav[..., start:end]))
        pieces.append(codec.encode_flush())
    return torch.cat(pieces, dim=-1)


def decode_streaming(codec, codes: torch.Tensor, chunk_frames: int) -> torch.Tensor:
    pieces = []
    with codec.decoder.streaming(codes.shape[0]):
        for start in range(0, codes.shape[-1], chunk_frames):
            pieces.append(codec.decode_step(codes[..., start:start + chunk_frames]))
    return torch.cat(pieces, dim=-1)


def cmd_encode(args: argparse.Namespace) -> int:
    from ..audio import load_audio
    from .registry import family_claiming, family_of

    codec = _load(args.model, args.num_codebooks)
    own = family_of(codec).hook("encode")  # a family whose inputs are not audio (images) encodes its own way
    if own is not None:
        return own(args, codec)
    other = family_claiming(args.input)
    if other is not None:
        raise UserError(f"{args.input} is an {other.modality}, but model {codec.name} is an audio codec (family "
                        f"{codec.config.family}); use a model of family {other.name}")
    wav = load_audio(args.input, codec.sample_rate).unsqueeze(0)
    if args.chunk_ms is not None:
        codes = encode_streaming(codec, wav, args.chunk_ms * codec.sample_rate / 1000.0)
    else:
        codes = codec.encode(wav)
    codes = codes[0].cpu().numpy().astype(np.int32)
    np.save(args.output, codes)
    seconds = wav.shape[-1] / codec.sample_rate
    print(f"{args.input}: {seconds:.2f} s -> {codes.shape[0]} codebooks x {codes.shape[1]} frames "
          f"({codec.bitrate / 1000:.2f} kbps = sum log2(cardinality) x {codec.frame_rate:g} frames/s) -> {args.output}")
    return 0


def load_codes(path: str | Path, axes: tuple[str, ...] = ("K", "T")) -> np.ndarray:
    """Read a .npy of integer codes with the given axes: [K, T] for audio, [K, h, w] for images."""
    try:
        codes = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        raise CodesError(f"{path}: not a readable .npy array ({err})") from None
    if codes.ndim != len(axes):
        raise CodesError(f"{path}: codes must be a [{', '.join(axes)}] array, got shape {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise CodesError(f"{path}: codes must be integers, got {codes.dtype}")
    return codes


def cmd_decode(args: argparse.Namespace) -> int:
    from ..audio import save_audio
    from .checkpoint import family_of_spec

    family = family_of_spec(args.model)
    own = family.hook("decode") if family is not None else None
    if own is not None:  # e.g. token grids [K, h, w] -> image
        return own(args, _load(args.model))
    codes_np = load_codes(args.input)
    codec = _load(args.model)
    codes = torch.from_numpy(codes_np.astype(np.int64)).unsqueeze(0)
    codec.check_codes(codes)
    if args.chunk_frames:
        wav = decode_streaming(codec, codes, args.chunk_frames)
    else:
        wav = codec.decode(codes)
    save_audio(args.output, wav[0], codec.sample_rate)
    print(f"{args.input}: {codes.shape[1]} codebooks x {codes.shape[2]} frames -> "
          f"{wav.shape[-1] / codec.sample_rate:.2f} s at {codec.sample_rate} Hz -> {args.output}")
    return 0


def cmd_export_onnx(args: argparse.Namespace) -> int:
    from .onnx_streaming import export_streaming_onnx

    codec = _load(args.model, args.num_codebooks)
    folder = export_streaming_onnx(codec, args.output, frames_per_step=args.frames_per_step, batch_size=args.batch_size)
    info = json.loads((folder / "streaming.json").read_text())
    print(f"{codec.name}: streaming steps of {info['frames_per_step']} frame(s) x {info['frame_size']} samples, "
          f"{info['num_codebooks']} codebooks, {len(info['encode_states'])} + {len(info['decode_states'])} state tensors "
          f"-> {folder}/")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    codec = _load(args.model)
    info = codec.info()
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    from .registry import family_of

    own = family_of(codec).hook("info")
    if own is not None:
        own(info)
        return 0
    rows = [
        ("model", info["name"]),
        ("family", info["family"]),
        ("sample rate", f"{info['sample_rate']} Hz"),
        ("frame rate", f"{info['frame_rate']:g} Hz ({info['frame_size']} samples per frame)"),
        ("codebooks", f"{info['num_codebooks']} (allowed: {', '.join(map(str, info['allowed_num_codebooks']))})"),
        ("cardinalities", ", ".join(map(str, info["cardinality"]))),
        ("bitrate", f"{info['bitrate_bps'] / 1000:.3f} kbps (sum of log2(cardinality) x frame rate)"),
        ("algorithmic latency", f"{info['algorithmic_latency_ms']:g} ms (one frame, no lookahead)"),
        ("parameters", f"{info['parameters']:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def cmd_average(args: argparse.Namespace) -> int:
    from .checkpoint import average_codec_files, load_checkpoint, save_codec_tensors

    if args.codebooks_from is not None and args.average_codebooks:
        raise UserError("--codebooks-from and --average-codebooks exclude each other")
    keep = None if args.codebooks_from is None else args.codebooks_from - 1
    tensors, meta = average_codec_files(args.inputs, args.weights, codebooks_from=keep,
                                        average_codebooks=args.average_codebooks)
    path = save_codec_tensors(tensors, meta, args.output)
    load_checkpoint(path)  # the result must load as a codec; a mismatch is our bug, not the user's
    for source in json.loads(meta["averaged_from"]):
        print(f"  {source['weight']:.4f} x {source['file']} ({source['total_steps']} steps)")
    print(f"codebooks: {meta['codebooks']}")
    print(f"averaged {len(args.inputs)} codec files -> {path}")
    return 0
