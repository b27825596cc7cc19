"""Training data for the image codec: random crops from a folder of images (recursive; PNG/JPEG/WebP/...).

Images are decoded once and kept in memory as uint8 (a folder of photos for a CPU run is megabytes);
each training item is a random crop after a random down-scaling (so a few large photos give many
different views) and a random horizontal flip. Validation uses fixed crops (the centre and corners of
each image), so its scores are comparable from one validation to the next. Unreadable files are skipped
and listed (`skipped`), as the audio datamodule does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..errors import UserError
from .io import list_images, load_image_uint8, to_tensor
from .model import ImageError


@dataclass
class ImageDataConfig:
    train: str = "data/images/train"  # folder of training images (`neurocodec image-data` builds data/images)
    valid: str | None = "data/images/valid"  # folder of validation images; None: no validation
    crop: int = 256  # training crop size (pixels, a multiple of the codec's downsampling)
    valid_crop: int = 256
    scale: list[float] = field(default_factory=lambda: [0.5, 1.0])  # random down-scaling of training images
    flip: bool = True
    batch_size: int = 8
    valid_batch_size: int = 8
    num_workers: int = 0
    epoch_length: int = 1000  # random crops per (virtual) epoch
    valid_crops_per_image: int = 5  # centre + 4 corners (fewer: the first ones)

    def __post_init__(self) -> None:
        if self.crop < 8 or self.valid_crop < 8:
            raise ValueError("crop sizes must be >= 8 pixels")
        if len(self.scale) != 2 or not 0 < self.scale[0] <= self.scale[1]:
            raise ValueError("data.scale must be [min, max] with 0 < min <= max")
        if self.batch_size < 1 or self.valid_batch_size < 1 or self.epoch_length < 1:
            raise ValueError("batch sizes and epoch_length must be >= 1")


def read_folder(folder: str | Path) -> tuple[list[np.ndarray], list[tuple[str, str]]]:
    images, skipped = [], []
    for path in list_images(folder):
        try:
            images.append(load_image_uint8(path))
        except ImageError as err:
            skipped.append((str(path), str(err)))
    return images, skipped


class RandomCrops(Dataset):
    def __init__(self, images: list[np.ndarray], config: ImageDataConfig, seed: int = 0) -> None:
        self.images = [to_tensor(a) for a in images]
        self.c = config
        self.seed = seed
        self.epoch = 0

    def __len__(self) -> int:
        return self.c.epoch_length

    def __getitem__(self, index: int) -> torch.Tensor:
        # A generator per item (seed, epoch, index): the same crops whatever the worker count.
        g = torch.Generator().manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFFFFFF)
        img = self.images[int(torch.randint(len(self.images), (1,), generator=g))]
        crop = self.c.crop
        lo, hi = self.c.scale
        s = lo + (hi - lo) * float(torch.rand((), generator=g))
        h, w = img.shape[-2:]
        s = max(s, crop / min(h, w))  # never smaller than the crop
        if abs(s - 1.0) > 1e-3:
            size = (max(crop, round(h * s)), max(crop, round(w * s)))
            img = F.interpolate(img.unsqueeze(0), size=size, mode="bilinear", antialias=s < 1,
                                align_corners=False)[0].clamp(0, 1)
            h, w = size
        y = int(torch.randint(h - crop + 1, (1,), generator=g))
        x = int(torch.randint(w - crop + 1, (1,), generator=g))
        out = img[:, y:y + crop, x:x + crop]
        if self.c.flip and bool(torch.rand((), generator=g) < 0.5):
            out = out.flip(-1)
        return out.contiguous()


class FixedCrops(Dataset):
    def __init__(self, images: list[np.ndarray], crop: int, per_image: int) -> None:
        self.items = []
        for arr in images:
            img = to_tensor(arr)
            h, w = img.shape[-2:]
            if min(h, w) < crop:  # upscale small images to the crop size
                s = crop / min(h, w)
                img = F.interpolate(img.unsqueeze(0), size=(max(crop, round(h * s)), max(crop, round(w * s))),
                                    mode="bilinear", align_corners=False)[0].clamp(0, 1)
                h, w = img.shape[-2:]
            corners = [((h - crop) // 2, (w - crop) // 2), (0, 0), (0, w - crop), (h - crop, 0), (h - crop, w - crop)]
            for y, x in corners[:per_image]:
                self.items.append(img[:, y:y + crop, x:x + crop].contiguous())

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.items[index]


class ImageDataModule(L.LightningDataModule):
    def __init__(self, config: ImageDataConfig, downsample: int, seed: int = 0) -> None:
        super().__init__()
        self.c = config
        self.seed = seed
        for name in ("crop", "valid_crop"):
            if getattr(config, name) % downsample:
                raise UserError(f"data.{name} = {getattr(config, name)} is not a multiple of the codec's "
                                f"downsampling factor {downsample}")
        self.skipped: list[tuple[str, str]] = []
        self.train_set: RandomCrops | None = None
        self.valid_set: FixedCrops | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        hint = "build the sample photos with `neurocodec image-data` or point data.train at a folder of images"
        if not Path(self.c.train).is_dir():
            raise UserError(f"data.train: {self.c.train} is not a folder ({hint})")
        train, skipped = read_folder(self.c.train)
        self.skipped += skipped
        if not train:
            raise UserError(f"data.train: no readable image in {self.c.train} ({hint})")
        self.train_set = RandomCrops(train, self.c, self.seed)
        if self.c.valid:
            if not Path(self.c.valid).is_dir():
                raise UserError(f"data.valid: {self.c.valid} is not a folder (or set --data.valid null)")
            valid, skipped = read_folder(self.c.valid)
            self.skipped += skipped
            if valid:
                self.valid_set = FixedCrops(valid, self.c.valid_crop, self.c.valid_crops_per_image)

    def train_dataloader(self) -> DataLoader:
        self.train_set.epoch = self.trainer.current_epoch if self.trainer is not None else 0
        return DataLoader(self.train_set, batch_size=self.c.batch_size, shuffle=False, drop_last=True,
                          num_workers=self.c.num_workers, persistent_workers=False)

    def val_dataloader(self):
        if self.valid_set is None:
            return []
        return DataLoader(self.valid_set, batch_size=self.c.valid_batch_size, shuffle=False,
                          num_workers=0)
