"""Image codec speed on one CPU thread: encode + decode of real photos, ours vs Pillow's JPEG and WebP.

Ours: `image_fsq:tiny` (0.3 M parameters) and, without --quick, the real-size `image_fsq` (22.9 M), both with
all 4 codebooks, in inference mode as `neurocodec encode/decode` run them (exact float64 encoder, float32
decoder). References measured in the same run on the same images: Pillow JPEG (quality 75) and WebP
(quality 75, method 6, as `neurocodec eval` uses) encode + decode. Speed = megapixels per second (median of
repeats); ratios are ours / reference. Images: the test photos of `neurocodec image-data` (data/images/test)
if present, else a synthetic photo-like 512x384 image.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arg_parser, figure, timed, write_result  # noqa: E402

from neurocodec.codecs.checkpoint import load_codec  # noqa: E402
from neurocodec.image.evaluate import codec_file  # noqa: E402
from neurocodec.image.io import list_images, load_image_uint8, to_tensor  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def images() -> list[np.ndarray]:
    folder = ROOT / "data/images/test"
    if folder.is_dir() and list_images(folder):
        return [load_image_uint8(p) for p in list_images(folder)]
    rng = np.random.default_rng(0)
    coarse = torch.from_numpy(rng.random((1, 3, 6, 8))).float()
    img = torch.nn.functional.interpolate(coarse, size=(384, 512), mode="bicubic", align_corners=False)[0]
    return [(img.clamp(0, 1) * 255).byte().permute(1, 2, 0).numpy()]


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    repeats = 1 if args.quick else 5
    arrays = images()
    megapixels = sum(a.shape[0] * a.shape[1] for a in arrays) / 1e6
    tensors = [to_tensor(a).unsqueeze(0) for a in arrays]

    ref = {}
    for kind in ("jpeg", "webp"):
        ref[kind] = megapixels / timed(lambda: [codec_file(a, kind, 75) for a in arrays], repeats)

    figures, params = [], {"images": len(arrays), "megapixels": megapixels, "repeats": repeats, "threads": 1}
    for spec in (["image_fsq:tiny"] if args.quick else ["image_fsq:tiny", "image_fsq"]):
        codec = load_codec(spec)
        with torch.no_grad():
            def round_trip():
                for t in tensors:
                    codec.decode(codec.encode(t))
            round_trip()  # warm-up
            speed = megapixels / timed(round_trip, repeats)
        params[spec] = {"parameters": codec.info()["parameters"], "bpp": [codec.bpp(a.shape[0], a.shape[1]) for a in arrays]}
        for kind, name in (("jpeg", "Pillow JPEG q75"), ("webp", "Pillow WebP q75 method 6")):
            figures.append(figure(f"{spec} encode+decode vs {kind}", speed, "Mpixel/s", reference=name,
                                  reference_value=ref[kind]))
        print(f"{spec}: {speed:.3f} Mpixel/s  (JPEG {ref['jpeg']:.2f}, WebP {ref['webp']:.2f} Mpixel/s; "
              f"ratio {speed / ref['jpeg']:.4f} / {speed / ref['webp']:.4f})")
    path = write_result("image_speed", {"title": "Image codec speed (one CPU thread)", "figures": figures,
                                        "params": params})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
