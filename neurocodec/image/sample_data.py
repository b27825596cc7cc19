"""Real photographs that can be had offline: the sample images inside scikit-image's wheel (PyPI).

`neurocodec image-data -o data/images` takes them from an installed scikit-image if there is one, else
fetches the wheel with pip (`pip download scikit-image==0.26.0 --no-deps`: one file from the package
registry, nothing is installed) and reads the images straight out of the zip. Only images whose
licence scikit-image documents as public domain / CC0 / "no known copyright restrictions" are used
(the wording is quoted in SOURCES.md, from `skimage/data/_fetchers.py` of that release); drawings,
synthetic images and the Middlebury stereo pair (no licence stated) are left out.

Splits: the test photos (a cat, a cup of coffee) are natural colour photos that training never sees;
`valid` is one more held-out photo.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

WHEEL_VERSION = "0.26.0"


@dataclass(frozen=True)
class Photo:
    file: str  # inside skimage/data/
    split: str
    title: str
    licence: str  # scikit-image's own statement


PHOTOS = (
    Photo("astronaut.png", "train", "Eileen Collins, NASA astronaut (NASA Great Images)",
          "No known copyright restrictions, released into the public domain."),
    Photo("hubble_deep_field.jpg", "train", "Hubble eXtreme Deep Field (NASA)",
          "Captured by NASA; may be freely used in the public domain."),
    Photo("retina.jpg", "train", "Human retina (fundus photograph, Wikimedia Commons)",
          "Creative Commons CC0 1.0 Universal Public Domain Dedication."),
    Photo("ihc.png", "train", "Immunohistochemistry (IHC) staining of colon tissue",
          "No known copyright restrictions."),
    Photo("camera.png", "train", "Man with a camera (grey)", "No copyright restrictions. CC0 by the photographer (Lav Varshney)."),
    Photo("coins.png", "train", "Greek coins from Pompeii (Brooklyn Museum, grey)", "No known copyright restrictions."),
    Photo("brick.png", "train", "Brick wall texture (CC0Textures, grey)", "Creative Commons CC0 License."),
    Photo("grass.png", "train", "Grass texture (CC0Textures, grey)", "Creative Commons CC0 License."),
    Photo("gravel.png", "train", "Gravel texture (CC0Textures, grey)", "Creative Commons CC0 License."),
    Photo("rocket.jpg", "valid", "Launch of DSCOVR on a Falcon 9 (SpaceX)", "Captured by SpaceX and released in the public domain."),
    Photo("chelsea.png", "test", "Chelsea the cat", "No copyright restrictions. CC0 by the photographer (Stefan van der Walt)."),
    Photo("coffee.png", "test", "A cup of coffee", "No copyright restrictions. CC0 by the photographer (Rachel Michetti)."),
)


def _installed_data_dir() -> Path | None:
    try:
        import skimage  # noqa: F401
    except ImportError:
        return None
    folder = Path(sys.modules["skimage"].__file__).parent / "data"
    return folder if all((folder / p.file).is_file() for p in PHOTOS) else None


def _download_wheel(dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", f"scikit-image=={WHEEL_VERSION}", "--no-deps",
           "--only-binary=:all:", "-q", "-d", str(dest)]
    try:
        subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise UserError(f"could not fetch the scikit-image {WHEEL_VERSION} wheel with pip "
                        f"({detail.strip().splitlines()[-1] if detail.strip() else err})") from None
    wheels = sorted(dest.glob("scikit_image-*.whl"))
    if not wheels:
        raise UserError("pip download did not produce a scikit-image wheel")
    return wheels[0]


def build_image_folder(out: str | Path, wheel: str | Path | None = None, force: bool = False) -> dict:
    """Write out/{train,valid,test}/*.png and out/SOURCES.md; returns counts per split. Idempotent."""
    from PIL import Image

    out = Path(out)
    marker = out / "SOURCES.md"
    if marker.is_file() and not force and all((out / p.split / (Path(p.file).stem + ".png")).is_file() for p in PHOTOS):
        return {"reused": True, **_counts()}
    with tempfile.TemporaryDirectory() as tmp:
        installed = None if wheel else _installed_data_dir()
        if installed is not None:
            source = f"installed scikit-image ({installed})"
            read = lambda name: (installed / name).read_bytes()  # noqa: E731
        else:
            wheel_path = Path(wheel) if wheel else _download_wheel(Path(tmp))
            source = f"wheel {wheel_path.name} (PyPI: scikit-image=={WHEEL_VERSION})"
            try:
                zf = zipfile.ZipFile(wheel_path)
            except (OSError, zipfile.BadZipFile) as err:
                raise UserError(f"{wheel_path}: not a readable wheel ({err})") from None
            read = lambda name: zf.read(f"skimage/data/{name}")  # noqa: E731
        import io

        for photo in PHOTOS:
            try:
                data = read(photo.file)
            except (KeyError, OSError) as err:
                raise UserError(f"{photo.file} is not in the scikit-image data ({err})") from None
            target = out / photo.split / (Path(photo.file).stem + ".png")
            target.parent.mkdir(parents=True, exist_ok=True)
            with Image.open(io.BytesIO(data)) as im:
                im = im.convert("RGB") if im.mode not in ("RGB", "L") else im
                tmp_target = target.with_name(target.name + ".tmp.png")
                im.save(tmp_target)
                tmp_target.replace(target)
    lines = ["# Sample photographs", "",
             f"Built by `neurocodec image-data` from {source}. Images are scikit-image's sample data; the licence",
             "column quotes scikit-image's documentation of each image (`skimage/data/_fetchers.py`). Grey images",
             "are stored as grey PNG; the loaders expand them to RGB. JPEG sources were decoded once and stored as PNG.",
             "", "| split | file | image | licence |", "|---|---|---|---|"]
    for p in PHOTOS:
        lines.append(f"| {p.split} | {p.split}/{Path(p.file).stem}.png | {p.title} | {p.licence} |")
    marker.write_text("\n".join(lines) + "\n")
    return {"reused": False, **_counts()}


def _counts() -> dict:
    counts: dict[str, int] = {}
    for p in PHOTOS:
        counts[p.split] = counts.get(p.split, 0) + 1
    return counts
