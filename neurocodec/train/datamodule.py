"""Training / validation data for the codec trainer: crops of the audio in a manifest.

The crops themselves (random in training, fixed in validation, resampling, gain) come from
`neurocodec.data.dataset.AudioSegmentDataset`; this module only wires them into Lightning and reports
files that had to be skipped (unreadable, empty, too short), so that none is lost silently.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import torch

from ..data.dataset import AudioSegmentDataset
from ..errors import UserError
from .config import DataConfig

log = logging.getLogger(__name__)
REPO_ROOT = Path(__file__).resolve().parents[2]


def resolve_manifest(path: str) -> Path:
    """A relative manifest path is tried from the working directory, then from the repository root
    (so the shipped configs' `data/demo/manifest.jsonl` works from anywhere)."""
    p = Path(path)
    if p.is_absolute() or p.is_file():
        return p
    if (REPO_ROOT / p).is_file():
        return REPO_ROOT / p
    raise UserError(f"manifest {path} does not exist (set --data.manifest PATH; `neurocodec data scan DIR -o m.jsonl` builds one)")


class CodecDataModule(L.LightningDataModule):
    def __init__(self, config: DataConfig, sample_rate: int, frame_size: int, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        self.sample_rate = sample_rate
        self.frame_size = frame_size
        self.seed = seed
        self.train_set: AudioSegmentDataset | None = None
        self.valid_set: AudioSegmentDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        c = self.config
        manifest = resolve_manifest(c.manifest)
        self.train_set = AudioSegmentDataset(manifest, self.sample_rate, c.segment_seconds, split=c.train_split,
                                             train=True, frame_size=self.frame_size, seed=self.seed,
                                             gain_db=tuple(c.gain_db), min_seconds=c.min_seconds,
                                             length=c.epoch_length, speaker_balance=c.speaker_balance,
                                             speed_factors=tuple(c.speed_perturb))
        self.valid_set = AudioSegmentDataset(manifest, self.sample_rate, c.valid_segment_seconds, split=c.valid_split,
                                             train=False, frame_size=self.frame_size, seed=self.seed,
                                             min_seconds=c.min_seconds, length=c.valid_items)
        if self.skipped:
            log.warning("data: skipped %d file(s) of %s; first: %s (%s)", len(self.skipped), manifest,
                        *self.skipped[0])

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(path, reason) of every file skipped so far, both splits (as seen in this process)."""
        return [*(self.train_set.skipped if self.train_set else []), *(self.valid_set.skipped if self.valid_set else [])]

    def _loader(self, dataset, batch_size: int, shuffle: bool, drop_last: bool) -> torch.utils.data.DataLoader:
        workers = self.config.num_workers
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                                           num_workers=workers, persistent_workers=workers > 0,
                                           pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> torch.utils.data.DataLoader:
        # Fewer crops than one batch would give an empty epoch with drop_last: keep the partial batch then.
        drop = len(self.train_set) >= self.config.batch_size
        return self._loader(self.train_set, self.config.batch_size, shuffle=True, drop_last=drop)

    def val_dataloader(self) -> torch.utils.data.DataLoader:
        return self._loader(self.valid_set, self.config.valid_batch_size, shuffle=False, drop_last=False)
