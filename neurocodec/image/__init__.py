"""The image codec family: 2-D conv encoder/decoder (VQGAN-style) around the same quantizer adapter as the
audio codecs, trained with L1 + SSIM/MS-SSIM (+ optional perceptual) + PatchGAN losses.

Where things live: `model.py` (the codec and its config), `io.py` (reading/writing PNG/JPEG with Pillow),
`losses.py`, `discriminator.py`, `data.py` (image folders, random crops), `train.py` (Lightning module and
`train/fit.py` dispatch), `evaluate.py` (PSNR/SSIM/MS-SSIM/bpp vs JPEG and WebP, rate-distortion plot),
`export.py` (token grids as Parquet), `sample_data.py` (the real photographs shipped in scikit-image's
wheel), `commands.py` (CLI glue).
"""

from __future__ import annotations

IMAGE_FAMILIES = ("image",)


def is_image_codec(codec) -> bool:
    return getattr(getattr(codec, "config", None), "family", None) in IMAGE_FAMILIES


def spec_family(spec: str) -> str | None:
    """The `model.family` a `--model` spec names, read without building the model (None if unknown)."""
    import json
    from pathlib import Path

    from ..config import load_config, split_model_spec

    spec = str(spec)
    try:
        if spec.endswith(".safetensors") or (Path(spec).is_file() and Path(spec).suffix not in (".yaml", ".yml")):
            from ..codecs.checkpoint import read_metadata

            return json.loads(read_metadata(spec).get("config", "{}")).get("family", "seanet")
        name, preset = split_model_spec(spec)
        return (load_config(name, preset).get("model") or {}).get("family", "seanet")
    except Exception:  # noqa: BLE001 (unreadable spec: the normal loading path reports the real error)
        return None


def spec_is_image(spec: str) -> bool:
    return spec_family(spec) in IMAGE_FAMILIES
