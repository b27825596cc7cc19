"""Checkpoint writing and codec export for training runs.

* `AtomicCheckpointIO`: Lightning writes through fsspec, whose local "transaction" stages the file in the
  system temp dir and then moves it — a copy, not an atomic rename, when /tmp is another filesystem. We
  write `<name>.tmp` beside the target and `os.replace` it, so a crash never leaves a torn checkpoint.
* `CodecExport`: every time a checkpoint is written, and at the end of training, the EMA generator is
  exported to `<run>/codec.safetensors` (the format `neurocodec encode --model` loads); with `keep_exports`
  each export is also kept as `<run>/exports/codec_step<gen step>.safetensors`, so that several checkpoints of
  a run can be scored afterwards (scripts/compare_runs.py). At the end it also
  saves `checkpoints/last.ckpt`, checks that every process holds the same codebooks, and writes
  `<run>/summary.json`.
* `ResumableCSVLogger`: Lightning's CSV logger deletes `metrics.csv` when its folder already exists, so a
  resumed run (the default model trains across days) would lose the curves of every earlier session.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.loggers import CSVLogger

from ..codecs.checkpoint import save_codec, weights_sha256


class AtomicCheckpointIO(TorchCheckpointIO):
    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def codebook_digest(codec: torch.nn.Module) -> str:
    """SHA-256 over the quantizer's state (codebooks and their EMA statistics)."""
    return weights_sha256(codec.quantizer)


class CodecExport(L.Callback):
    def __init__(self, run_dir: Path, config_name: str, keep_exports: bool = False) -> None:
        self.run_dir = Path(run_dir)
        self.config_name = config_name
        self.codec_path = self.run_dir / "codec.safetensors"
        self.keep_exports = keep_exports
        self.summary: dict = {}

    def export(self, trainer: L.Trainer, module) -> None:
        if not trainer.is_global_zero:
            return
        codec = module.averaged_codec()
        save_codec(codec, self.codec_path, metadata={
            "gen_step": int(module.gen_step), "steps_before": module.steps_before,
            "total_steps": module.steps_before + int(module.gen_step), "config_name": self.config_name,
            "ema": module.ema is not None, "run_dir": str(self.run_dir)})
        if self.keep_exports:
            kept = self.run_dir / "exports" / f"codec_step{int(module.gen_step):07d}.safetensors"
            kept.parent.mkdir(exist_ok=True)
            tmp = kept.with_name(kept.name + ".tmp")
            shutil.copyfile(self.codec_path, tmp)
            tmp.replace(kept)

    def on_save_checkpoint(self, trainer, module, checkpoint) -> None:
        self.export(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        last = self.run_dir / "checkpoints" / "last.ckpt"
        trainer.save_checkpoint(last, weights_only=False)  # full state for resume; also exports the codec
        digest = codebook_digest(module.codec)
        digests = [digest]
        if dist.is_available() and dist.is_initialized():
            digests = [None] * dist.get_world_size()
            dist.all_gather_object(digests, digest)
        if trainer.is_global_zero:
            datamodule = trainer.datamodule
            self.summary = {
                "gen_step": int(module.gen_step),
                "lightning_global_step": int(trainer.global_step),
                "world_size": trainer.world_size,
                "codebook_sha256_per_rank": digests,
                "codebooks_in_sync": len(set(digests)) == 1,
                "codec": str(self.codec_path),
                "checkpoint": str(last),
                "skipped_files": [list(x) for x in getattr(datamodule, "skipped", [])],
                # where the random training crops came from (data.speaker_balance moves these)
                "train_crops_per_speaker": train_speaker_shares(datamodule),
                "metrics": {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1},
            }
            tmp = self.run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(self.summary, indent=2))
            tmp.replace(self.run_dir / "summary.json")


def train_speaker_shares(datamodule) -> dict[str, float]:
    """Fraction of random training crops drawn from each speaker; {} for data without speakers (images)."""
    train_set = getattr(datamodule, "train_set", None)
    if not hasattr(train_set, "speaker_shares"):
        return {}
    return {spk if spk is not None else "(no speaker)": round(share, 6) for spk, share in train_set.speaker_shares().items()}


class ResumableCSVLogger(CSVLogger):
    """A CSV logger that appends to the run's `metrics.csv` instead of starting it anew.

    Steps logged after the last checkpoint of an interrupted session are logged again by the resumed one;
    readers keep the last row of a step (`neurocodec.eval.plots.plot_training_curve` does)."""

    @property
    def experiment(self):
        if self._experiment is None:
            previous = Path(self.log_dir) / "metrics.csv"
            saved = previous.read_bytes() if previous.is_file() else None
            with warnings.catch_warnings():  # its "previous log files will be deleted" is untrue here: they are kept
                warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
                writer = super().experiment  # creates the writer, which removes the old file
            if saved is not None and writer is not None:
                previous.write_bytes(saved)
                header = saved.split(b"\n", 1)[0].decode().strip()
                writer.metrics_keys = sorted(k for k in header.split(",") if k)
        return self._experiment
