"""Reading and writing images with Pillow: files <-> float tensors [3, H, W] in [0, 1] (RGB)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .model import ImageError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".ppm", ".pgm")


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def load_image_uint8(path: str | Path) -> np.ndarray:
    """[H, W, 3] uint8 RGB. Grey, palette and alpha images are converted (alpha dropped on white)."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
                rgba = im.convert("RGBA")
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                im = Image.alpha_composite(background, rgba)
            if im.mode == "I;16" or im.mode == "I":  # 16-bit grey: keep the top 8 bits
                arr = np.asarray(im, dtype=np.float64)
                im = Image.fromarray(np.clip(arr / 256.0, 0, 255).astype(np.uint8))
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"{path}: not a readable image ({err})") from None
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ImageError(f"{path}: empty image")
    return arr


def to_tensor(arr: np.ndarray) -> torch.Tensor:
    arr = arr if arr.flags.writeable and arr.flags.c_contiguous else np.array(arr)  # Pillow's arrays are read-only
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 255.0


def to_uint8(img: torch.Tensor) -> np.ndarray:
    """[3, H, W] in [0, 1] -> [H, W, 3] uint8 (rounded)."""
    return (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()


def load_image(path: str | Path) -> torch.Tensor:
    """[3, H, W] float32 in [0, 1]."""
    return to_tensor(load_image_uint8(path))


def save_image(path: str | Path, img: torch.Tensor, quality: int | None = None) -> Path:
    """Write [3, H, W] in [0, 1]; the format follows the suffix (PNG is lossless; JPEG/WebP use `quality`)."""
    from PIL import Image

    path = Path(path)
    if not is_image_path(path):
        raise ImageError(f"{path}: not an image file name (use .png, .jpg or .webp)")
    path.parent.mkdir(parents=True, exist_ok=True)
    kwargs = {} if quality is None or path.suffix.lower() == ".png" else {"quality": int(quality)}
    Image.fromarray(to_uint8(img)).save(path, **kwargs)
    return path


def list_images(folder: str | Path) -> list[Path]:
    """Image files under `folder` (recursively), sorted; a single image file is a list of one."""
    folder = Path(folder)
    if folder.is_file():
        return [folder] if is_image_path(folder) else []
    if not folder.is_dir():
        raise ImageError(f"{folder}: no such folder")
    return sorted(p for p in folder.rglob("*") if p.is_file() and is_image_path(p))
