"""CLI glue for images: `neurocodec image-data`, and the image branches of `encode`, `decode`, `info`, `eval`
and `export` (those commands live with the audio ones and hand image models / image files to the functions
here, so both kinds of input get one command each).

Token files: `neurocodec encode photo.png -o tokens.npy --model image_fsq` writes an int32 array
[K, h, w] (h = ceil(H/f), w = ceil(W/f)); `neurocodec decode tokens.npy -o out.png --model image_fsq
[--size WxH]` writes the decoded image (h*f x w*f, or cropped to the original size with --size, which
`encode` prints).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from ..codecs.commands import load_codes
from ..errors import UserError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("image-data", help="build a folder of real photographs (scikit-image's CC0 / public-domain "
                                          "samples) for training and evaluating image codecs",
                       description="Writes OUT/train, OUT/valid, OUT/test (PNG) and OUT/SOURCES.md with each image's "
                                   "licence. The images come from an installed scikit-image or from its wheel, "
                                   "fetched with pip from the package registry (nothing is installed).")
    p.add_argument("-o", "--output", default="data/images", help="output folder (default data/images)")
    p.add_argument("--wheel", default=None, help="use this scikit-image wheel file instead of fetching one")
    p.add_argument("--force", action="store_true", help="rebuild even if the folder is complete")
    p.set_defaults(func=cmd_image_data)


def cmd_image_data(args: argparse.Namespace) -> int:
    from .sample_data import build_image_folder

    info = build_image_folder(args.output, args.wheel, args.force)
    what = "already complete" if info.pop("reused") else "written"
    print(f"{args.output}: {', '.join(f'{n} {k}' for k, n in info.items())} images {what} "
          f"(licences in {Path(args.output) / 'SOURCES.md'})")
    return 0


# -- encode / decode ------------------------------------------------------------------------------------
def encode_image(args: argparse.Namespace, codec) -> int:
    """`neurocodec encode` with an image model (the image family's "encode" hook, image/family.py)."""
    from .io import is_image_path, load_image

    if not is_image_path(args.input):
        raise UserError(f"{args.input}: model {codec.name} is an image codec; give it an image file "
                        f"(.png, .jpg, .webp, ...)")
    img = load_image(args.input)
    if getattr(args, "chunk_ms", None) is not None:
        raise UserError("--chunk-ms is for audio; images are encoded whole")
    h, w = img.shape[-2:]
    codes = codec.encode(img.unsqueeze(0))[0].cpu().numpy().astype(np.int32)
    np.save(args.output, codes)
    print(f"{args.input}: {w}x{h} pixels -> {codes.shape[0]} codebooks x {codes.shape[1]}x{codes.shape[2]} grid "
          f"({codec.bpp(h, w):.4f} bpp = {codec.bits_per_token:.2f} bits per token x {codes.shape[1] * codes.shape[2]} "
          f"tokens / {h * w} pixels) -> {args.output}  (decode with --size {w}x{h} to crop the padding)")
    return 0


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise UserError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 500x375") from None
    if w < 1 or h < 1:
        raise UserError(f"--size {text!r}: sizes must be positive")
    return w, h


def decode_image(args: argparse.Namespace, codec) -> int:
    from .io import is_image_path, save_image

    if not is_image_path(args.output):
        raise UserError(f"{args.output}: model {codec.name} is an image codec; the output must be an image file (.png, ...)")
    if getattr(args, "chunk_frames", None):
        raise UserError("--chunk-frames is for audio; image grids are decoded whole")
    codes = torch.from_numpy(load_codes(args.input, axes=("K", "h", "w")).astype(np.int64)).unsqueeze(0)
    img = codec.decode(codes)[0]
    if getattr(args, "size", None):
        w, h = parse_size(args.size)
        if w > img.shape[-1] or h > img.shape[-2]:
            raise UserError(f"--size {w}x{h} is larger than the decoded {img.shape[-1]}x{img.shape[-2]} image")
        img = img[:, :h, :w]
    save_image(args.output, img)
    print(f"{args.input}: {codes.shape[1]} codebooks x {codes.shape[2]}x{codes.shape[3]} grid -> "
          f"{img.shape[-1]}x{img.shape[-2]} pixels -> {args.output}")
    return 0


def print_info(info: dict) -> None:
    rows = [
        ("model", info["name"]),
        ("family", f"{info['family']} (images)"),
        ("downsampling", f"{info['downsample']} (token grid = ceil(H/{info['downsample']}) x ceil(W/{info['downsample']}))"),
        ("quantizer", info["quantizer"]),
        ("codebooks", f"{info['num_codebooks']} (allowed: {', '.join(map(str, info['allowed_num_codebooks']))})"),
        ("cardinalities", ", ".join(map(str, info["cardinality"]))),
        ("bits per token", f"{info['bits_per_token']:.2f} (sum of log2(cardinality))"),
        ("bits per pixel", f"{info['bpp_256x256']:.4f} at 256x256 ({info['bpp_note']})"),
        ("parameters", f"{info['parameters']:,}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
