"""What a training stage (`stages:` in a config) does to the codec around the training step, as a Lightning
callback that the training module brings along (`CodecTrainingModule.configure_callbacks`).

Before each training step: the stage's frozen parts take no gradient and run in eval mode; over a freezing
stage's first `norm_recalibration_steps` batches their BatchNorm statistics are re-estimated; right after that,
`balance_code_frames` fits the LFQ quantizer's per-prefix bit thresholds on whole training recordings. Every
decision is a function of the generator step (saved in checkpoints), so a resumed run does the same.
"""

from __future__ import annotations

import lightning as L
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from ..audio import load_audio
from ..config import ConfigError
from ..errors import AudioError
from .config import TrainConfig, frozen_at, stage_index, steps_into_stage


class StageWork(L.Callback):
    def __init__(self, config: TrainConfig, codec: nn.Module) -> None:
        self.config = config
        parts = dict(codec.named_children())
        # Parameters of every part that some stage freezes, with their own requires_grad (restored when unfrozen).
        self._freezable = {name: [(p, p.requires_grad) for p in parts[name].parameters()]
                           for name in sorted({n for stage in config.stages for n in stage.freeze})}
        self._norm_momentum = {m: m.momentum for name in self._freezable for m in parts[name].modules()
                               if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.hold_frozen_parts(module, int(module.gen_step))

    def hold_frozen_parts(self, module, step: int) -> None:
        """Apply the stage's `freeze` list: frozen parts take no gradient (AdamW skips parameters whose grad
        is None, so neither momentum nor weight decay moves them) and run in eval mode. Re-applied every
        step because Lightning switches the whole module back to train mode after each validation."""
        frozen = frozen_at(self.config, step)
        for name, params in self._freezable.items():
            for param, trainable in params:
                param.requires_grad_(trainable and name not in frozen)
            if name in frozen:
                getattr(module.codec, name).eval()
        if not frozen:
            return
        stage = self.config.stages[stage_index(self.config, step)]
        if stage.norm_recalibration_steps:
            self.recalibrate_frozen_norms(module.codec, step, frozen)
        # After the recalibration (its statistics shape the latent) and before the step that trains on the codes.
        if stage.balance_code_frames and steps_into_stage(self.config, step) == stage.norm_recalibration_steps:
            self.fit_code_thresholds(module, stage.balance_code_frames, seed=step)

    def recalibrate_frozen_norms(self, codec, step: int, frozen: frozenset[str]) -> None:
        """Over a freezing stage's first `norm_recalibration_steps` batches, the frozen parts' BatchNorm layers
        normalise with batch statistics and accumulate them as a plain average (momentum None); afterwards
        they are held. The average lives in the layers' buffers (with their batch count), so a run resumed
        during recalibration goes on with it. Under DDP each process averages its own batches; the ranks'
        averages are then averaged, so every process holds the same statistics."""
        n = self.config.stages[stage_index(self.config, step)].norm_recalibration_steps
        into = steps_into_stage(self.config, step)
        norms = [m for name in sorted(frozen) for m in getattr(codec, name).modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        for norm in norms:
            if into == 0:
                norm.reset_running_stats()
            # None: a cumulative average over the recalibration batches; the layer's own momentum afterwards
            norm.momentum = None if into < n else self._norm_momentum[norm]
            if into < n:
                norm.train()
        if into == n and dist.is_available() and dist.is_initialized():
            for norm in norms:
                for stat in (norm.running_mean, norm.running_var):
                    dist.all_reduce(stat)
                    stat.div_(dist.get_world_size())

    @torch.no_grad()
    def fit_code_thresholds(self, module, frames: int, seed: int) -> None:
        """Encode about `frames` frames of whole training recordings, as they are (no crop, level or gain
        change: what `encode` meets at inference), with the frozen encoder, and fit the quantizer's per-prefix
        thresholds on them. Why not the training crops: their random gains move the latent away from natural
        levels; fitted on crops, held-out usage was 94.3-95.1% (150k-600k frames) against 95.9% on the 144k
        frames of the recordings themselves (seed-1 encoder, docs/semantic/lab_log.md, day 12). Recordings are taken in a
        seeded order, so every DDP process fits the same; rank 0's thresholds are broadcast all the same (GPU
        kernels need not agree to the last bit). Unreadable files are skipped, as in training."""
        codec, dataset = module.codec, getattr(module.trainer.datamodule, "train_set", None)
        if dataset is None or not getattr(dataset, "files", None):
            raise ConfigError("balance_code_frames: the data module has no training recordings (`train_set.files`)")
        order = torch.randperm(len(dataset.files), generator=torch.Generator().manual_seed(seed))
        latents, have, skipped = [], 0, 0
        bar = tqdm(total=frames, desc="fitting code thresholds", unit="frame", leave=False,
                   disable=module.global_rank != 0)
        for index in order.tolist():
            if have >= frames:
                break
            try:
                wav = load_audio(dataset.files[index].path, codec.sample_rate)
            except AudioError:
                skipped += 1
                continue
            # no more than the frames still wanted, so a long last recording costs no more than it gives
            wav = codec.pad_to_frames(wav[:, : (frames - have) * codec.frame_size].unsqueeze(0)).to(module.device)
            with torch.autocast(module.device.type, enabled=False):  # full precision, as inference encodes
                latent = codec.encode_latent(wav)  # [1, D, T]: what the frozen quantizer sees at inference
            latents.append(latent[0].t().double())
            have += latents[-1].shape[0]
            bar.update(latents[-1].shape[0])
        bar.close()
        if have < 2:
            raise ConfigError("balance_code_frames: no readable training recording to fit the code thresholds on")
        codec.quantizer.fit_thresholds(torch.cat(latents))
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(codec.quantizer.thresholds, src=0)
        if module.global_rank == 0:
            note = f" (all of them; {frames:,} asked)" if have < frames else ""
            note += f", {skipped} unreadable file(s) skipped" if skipped else ""
            tqdm.write(f"step {int(module.gen_step)}: code thresholds fitted on {have:,} frames of training "
                       f"recordings{note}")
