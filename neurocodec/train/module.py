"""The Lightning module that trains a codec as a GAN generator (manual optimisation).

One training step = one discriminator step (once `optim.disc_start_step` generator steps have passed)
followed by one generator step. `gen_step` counts generator steps; it is a buffer, so it is saved in and
restored from checkpoints. Lightning's own `global_step` counts every optimizer.step() (so it runs ahead
of `gen_step` once the discriminator trains): `lightning_max_steps` converts a generator-step budget into
Lightning's unit, and everything we show the user (progress bar, logs, checkpoint names) uses `gen_step`.

Validation runs on the EMA generator in eval mode (codebooks frozen, no quantizer dropout), accumulates
per-codebook usage over the whole validation set (summed across processes), scores PESQ-WB / STOI on a
few items and logs audio examples.
"""

from __future__ import annotations

import copy

import lightning as L
import torch
import torch.distributed as dist
from torch import nn

from ..codecs.quantizers import CodebookUsage
from ..config import ConfigError
from ..eval.metrics import pesq_score, stoi_score, stream_start_overshoot_db
from .config import TrainConfig, discriminator_on_at, discriminator_steps, loss_weights_at, stage_index
from .discriminators import Discriminators
from .ema import WeightEMA
from .losses import (DifferentiablePesqLoss, MultiResolutionMelLoss, MultiScaleSTFTLoss, discriminator_loss,
                     feature_matching_loss, generator_adversarial_loss)
from .stages import StageWork


def training_files_for_fitting(config):
    """What a codec that fits something on the training data before training (semanticodec's k-means) reads:
    a function giving the training split's utterances, or None under DDP (each process would fit its own)."""
    from ..data.manifest import read_manifest
    from ..distributed import world_size

    if world_size(config.trainer) > 1:
        return None
    return lambda: read_manifest(config.data.manifest, config.data.train_split)


def lightning_max_steps(max_steps: int, disc_start_step: int, has_disc: bool, config: TrainConfig | None = None) -> int:
    """Lightning counts each optimizer.step(): G steps plus D steps (D steps start at disc_start_step; with
    `config`, only in the training stages whose discriminator is on)."""
    if config is not None:
        return max_steps + discriminator_steps(config, max_steps)
    return max_steps + (max(0, max_steps - disc_start_step) if has_disc else 0)


def gan_optimizers(generator: nn.Module, disc: nn.Module | None, o) -> tuple[list, list]:
    """AdamW for the generator (and the discriminator when there is one), each with its own ExponentialLR
    (each schedule counts its own optimizer's steps). Audio and image training share it."""
    optimizers = [torch.optim.AdamW(generator.parameters(), lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay)]
    if disc is not None:
        optimizers.append(torch.optim.AdamW(disc.parameters(), lr=o.disc_lr, betas=tuple(o.betas),
                                            weight_decay=o.weight_decay))
    return optimizers, [torch.optim.lr_scheduler.ExponentialLR(opt, gamma=o.lr_gamma) for opt in optimizers]


class CodecTrainingModule(L.LightningModule):
    def __init__(self, config: TrainConfig, codec: nn.Module, fine_tuning: bool = False) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.config = config
        self.codec = codec  # built by the caller BEFORE DDP starts (sync_codebook is fixed at construction)
        self.disc = Discriminators(config.disc) if config.disc.kinds else None
        loss = config.loss
        self.mel_loss = MultiResolutionMelLoss(codec.sample_rate, loss.mel_windows, loss.mel_bins)
        self.stft_loss = MultiScaleSTFTLoss(loss.stft_n_ffts)
        # Built only when some stage gives it weight: it costs ~0.15 s per batch of 16 x 1 s on one CPU thread.
        self.pesq_loss = DifferentiablePesqLoss(codec.sample_rate) if config.uses_pesq_loss else None
        # Only the decoder is averaged. The EMA codebooks track the LIVE encoder's output; an averaged
        # encoder lags behind it, so its latents fall on a few codes (validation usage dropped to 1-10%
        # while the live model used 50-58% of the entries on the same clips).
        self.ema = (WeightEMA(codec, config.optim.ema_decay, live_prefixes=("encoder.", "quantizer."))
                    if config.optim.ema_decay > 0 else None)
        self.register_buffer("gen_step", torch.zeros((), dtype=torch.long))
        # Generator steps of the model this run was fine-tuned from (--init_from), so that the exported codec
        # knows its whole training (`total_steps`); kept in checkpoints beside gen_step.
        self.steps_before = 0
        # Frozen semantic teacher (codecs/teacher.py) for families that train against one. Kept out of the
        # module's registered children (set through __dict__): it is not in Lightning checkpoints, not
        # wrapped by DDP, not in the EMA, not exported; `teacher_features` moves it to the batch's device.
        self.__dict__["teacher"] = None
        if getattr(codec, "uses_teacher", False):
            from ..codecs.teacher import build_teacher

            self.__dict__["teacher"] = build_teacher(config.teacher)
            if hasattr(codec, "prepare_for_training"):  # e.g. semanticodec loads (or fits) its k-means centroids
                codec.prepare_for_training(self.teacher, training_files=training_files_for_fitting(config),
                                           seed=config.trainer.seed, fine_tuning=fine_tuning)
        self._pending_rng: dict | None = None
        self._val: dict = {}
        parts = dict(codec.named_children())
        for i, stage in enumerate(config.stages):
            unknown = sorted(set(stage.freeze) - set(parts))
            if unknown:
                raise ConfigError(f"stages[{i}].freeze names {', '.join(unknown)}, which this codec does not have; "
                                  f"its parts: {', '.join(sorted(parts))}")
        if any(stage.balance_code_frames for stage in config.stages) and not hasattr(codec.quantizer, "thresholds"):
            raise ConfigError("a stage sets balance_code_frames, but the quantizer keeps no thresholds: it needs "
                              "model.quantizer.kind: lfq with model.quantizer.balanced_thresholds: true")
        self.stage_work = StageWork(config, codec)  # freezing, norm recalibration, code thresholds (stages.py)

    def configure_callbacks(self):
        return [self.stage_work]  # installed with the module, whoever builds the Trainer

    # -- optimisers ---------------------------------------------------------------------------------
    def configure_optimizers(self):
        return gan_optimizers(self.codec, self.disc, self.config.optim)

    def _as_list(self, x) -> list:
        return list(x) if isinstance(x, (list, tuple)) else [x]

    # -- training -----------------------------------------------------------------------------------
    def generator_losses(self, real: torch.Tensor, fake: torch.Tensor, quantizer_loss: torch.Tensor,
                         use_gan: bool) -> dict[str, torch.Tensor]:
        losses = {
            "mel": self.mel_loss(fake, real),
            "stft": self.stft_loss(fake, real),
            "waveform": torch.nn.functional.l1_loss(fake.float(), real.float()),
            "quantizer": quantizer_loss.float(),
        }
        if self.pesq_loss is not None and self.current_loss_weights()["pesq"] > 0:
            skip = self.config.loss.pesq_skip_ms * self.codec.sample_rate // 1000  # the stream start: LossConfig
            losses["pesq"] = self.pesq_loss(fake[..., skip:], real[..., skip:])
        if use_gan:
            out_fake = self.disc(fake)
            with torch.no_grad():
                out_real = self.disc(real)
            kind = self.config.loss.adversarial_kind
            losses["adversarial"] = generator_adversarial_loss([o[0] for o in out_fake], kind)
            losses["feature"] = feature_matching_loss([o[1] for o in out_real], [o[1] for o in out_fake])
        return losses

    def current_loss_weights(self, step: int | None = None) -> dict[str, float]:
        """Loss weights of the training stage at generator step `step` (default: the current step)."""
        return loss_weights_at(self.config, int(self.gen_step) if step is None else step)

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = None
        weights = self.current_loss_weights()
        for name, value in losses.items():
            weight = weights[name] if name in weights else getattr(self.config.loss, name)
            if weight:  # 0: computed and logged, but no gradient
                total = weight * value if total is None else total + weight * value
        return total if total is not None else losses["mel"] * 0.0

    def teacher_features(self, wav: torch.Tensor) -> torch.Tensor | None:
        """The teacher's features [B, D, T] of the real batch at the codec frame rate (None without a teacher)."""
        if self.teacher is None:
            return None
        self.teacher.to(wav.device)
        with torch.no_grad():
            return self.teacher.features(wav.float(), self.codec.frame_rate, sample_rate=self.codec.sample_rate,
                                         num_frames=wav.shape[-1] // self.codec.frame_size)

    def run_codec(self, codec: nn.Module, wav: torch.Tensor):
        """The codec's training forward, with the teacher's features for families that use a teacher."""
        if self.teacher is None:
            return codec(wav)
        return codec(wav, teacher_features=self.teacher_features(wav))

    def on_train_batch_start(self, batch, batch_idx) -> None:
        if self._pending_rng is not None:  # restore after the data pipeline has started (it draws seeds)
            _set_rng_state(self._pending_rng)
            self._pending_rng = None

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        o = self.config.optim
        step = int(self.gen_step)
        optimizers = self._as_list(self.optimizers())
        schedulers = self._as_list(self.lr_schedulers())
        opt_g = optimizers[0]
        real = batch
        out = self.run_codec(self.codec, real)
        fake = out.audio
        use_gan = self.disc is not None and discriminator_on_at(self.config, step)  # warm-up and stages
        logs: dict[str, torch.Tensor] = {}

        if use_gan:
            opt_d = optimizers[1]
            out_real = self.disc(real)
            out_fake = self.disc(fake.detach())
            loss_d = discriminator_loss([r[0] for r in out_real], [f[0] for f in out_fake], self.config.loss.adversarial_kind)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            if o.disc_grad_clip > 0:
                self.clip_gradients(opt_d, gradient_clip_val=o.disc_grad_clip, gradient_clip_algorithm="norm")
            opt_d.step()
            schedulers[1].step()  # the discriminator's schedule counts its own steps
            logs["train/disc"] = loss_d.detach()

        losses = self.generator_losses(real, fake, out.quantizer_loss, use_gan)
        losses.update(out.aux_losses)  # family-specific (semantic CE, distillation), weighted by loss.<name>
        total = self.weighted_total(losses)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(total)
        if o.grad_clip > 0:
            norm = self.clip_gradients_norm(opt_g, o.grad_clip)
            logs["train/grad_norm"] = norm
        opt_g.step()
        schedulers[0].step()
        self.gen_step += 1
        if self.ema is not None:
            self.ema.update(self.codec, copy_only=step < o.ema_start_step)

        logs.update({f"train/{k}": v.detach() for k, v in losses.items()})
        logs["train/total"] = total.detach()
        if self.pesq_loss is not None:
            logs["train/pesq_bad_clips"] = torch.tensor(float(self.pesq_loss.bad_clips))  # since this process started
        logs["train/lr"] = torch.tensor(opt_g.param_groups[0]["lr"])
        logs.update({f"train/{k}": v.float() for k, v in out.metrics.items()})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=real.shape[0])
        self.log("gen_step", self.gen_step.float(), on_step=True, prog_bar=True, batch_size=real.shape[0])
        if self.config.stages:
            self.log("train/stage", float(stage_index(self.config, step) + 1), on_step=True, prog_bar=True,
                     batch_size=real.shape[0])
        self.log("mel", losses["mel"].detach(), on_step=True, prog_bar=True, logger=False, batch_size=real.shape[0])

    def clip_gradients_norm(self, optimizer, max_norm: float) -> torch.Tensor:
        """Clip through Lightning (so precision plugins unscale first) and return the pre-clip norm."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        return norm.detach()

    # -- the generator used for evaluation / export ----------------------------------------------
    def averaged_codec(self) -> nn.Module:
        """The EMA generator (or a copy of the live one without EMA), detached and in eval mode."""
        if self.ema is not None:
            return self.ema.averaged(self.codec)
        return copy.deepcopy(self.codec).eval().requires_grad_(False)

    # -- validation ---------------------------------------------------------------------------------
    def on_validation_epoch_start(self) -> None:
        self._val = {"codec": self.averaged_codec(), "usage": CodebookUsage(self.codec.quantizer.cardinalities),
                     "pesq": [], "stoi": [], "scored": 0}

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        v, c = self._val, self.config.trainer
        codec = v["codec"]
        with torch.no_grad():
            out = self.run_codec(codec, batch)
        fake = out.audio.float()
        b = batch.shape[0]
        for name, value in out.aux_losses.items():
            self.log(f"valid/{name}", value.float(), sync_dist=True, batch_size=b)
        self.log("valid/mel", self.mel_loss(fake, batch), sync_dist=True, batch_size=b)
        self.log("valid/waveform", torch.nn.functional.l1_loss(fake, batch.float()), sync_dist=True, batch_size=b)
        v["usage"].update(out.codes)
        sr = codec.sample_rate
        for i in range(b):
            if v["scored"] >= c.pesq_items:
                break
            ref, deg = batch[i, 0].float().cpu().numpy(), fake[i, 0].cpu().numpy()
            try:
                v["pesq"].append(pesq_score(ref, deg, sr))
            except Exception:  # PESQ refuses silent / too short signals: skip the item
                pass
            v["stoi"].append(stoi_score(ref, deg, sr))
            v["scored"] += 1
        if batch_idx == 0 and self.global_rank == 0:
            self._log_audio(batch, fake, sr)

    def _log_audio(self, real: torch.Tensor, fake: torch.Tensor, sr: int) -> None:
        for logger in self.loggers:
            writer = getattr(logger, "experiment", None)
            if hasattr(writer, "add_audio"):
                step = int(self.gen_step)
                for i in range(min(self.config.trainer.audio_examples, real.shape[0])):
                    writer.add_audio(f"audio/{i}/original", real[i, 0].float().cpu().clamp(-1, 1), step, sample_rate=sr)
                    writer.add_audio(f"audio/{i}/decoded", fake[i, 0].float().cpu().clamp(-1, 1), step, sample_rate=sr)

    def on_validation_epoch_end(self) -> None:
        v = self._val
        sizes = [len(c) for c in v["usage"].counts]  # cardinalities may differ per codebook (semanticodec)
        counts = torch.cat(v["usage"].counts)  # the K histograms of this process, end to end
        scores = torch.tensor([sum(v["pesq"]), len(v["pesq"]), sum(v["stoi"]), len(v["stoi"])], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            device = self.device if self.device.type != "cpu" else torch.device("cpu")
            counts, scores = counts.to(device), scores.to(device)
            dist.all_reduce(counts)
            dist.all_reduce(scores)
            counts, scores = counts.cpu(), scores.cpu()
        usage = CodebookUsage(v["usage"].cardinalities)
        usage.counts = list(counts.split(sizes))
        metrics = {f"valid/{k}": float(x) for k, x in usage.compute().items()}
        n = len(usage.counts)
        metrics["valid/usage_mean"] = sum(metrics[f"valid/codebook{k}/usage"] for k in range(n)) / n
        metrics["valid/perplexity_mean"] = sum(metrics[f"valid/codebook{k}/perplexity"] for k in range(n)) / n
        if scores[1] > 0:
            metrics["valid/pesq"] = float(scores[0] / scores[1])
        if scores[3] > 0:
            metrics["valid/stoi"] = float(scores[2] / scores[3])
        # The stream-start click (eval/metrics.py), the same on every process: a PESQ loss learns to make a stream's
        # start loud, which PESQ rewards and no validation score shows (days 27-28; LossConfig.pesq_skip_ms).
        metrics["valid/stream_start_overshoot_db"] = stream_start_overshoot_db(v["codec"], -30.0)
        # Values are already the same on every process: log without another reduction.
        self.log_dict(metrics, sync_dist=False)
        self._val = {}

    # -- checkpoints ----------------------------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["neurocodec"] = {"gen_step": int(self.gen_step), "rng": _get_rng_state(),
                                    "steps_before": self.steps_before}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        extra = checkpoint.get("neurocodec") or {}
        self.steps_before = int(extra.get("steps_before", 0))
        if "rng" in extra:
            self._pending_rng = extra["rng"]
        # The losses' buffers (mel filterbanks, windows) follow from the loss config and are not learnt: take
        # this run's, so that a run can resume with other loss resolutions (e.g. fine-tuning with a finer mel
        # loss) instead of failing on filterbank shapes.
        state = checkpoint.get("state_dict")
        if state is not None:
            for name in [k for k in state if k.startswith(_DERIVED_PREFIXES)]:
                del state[name]
            state.update({k: v for k, v in self.state_dict().items() if k.startswith(_DERIVED_PREFIXES)})


_DERIVED_PREFIXES = ("mel_loss.", "stft_loss.", "pesq_loss.")  # buffers computed from the config (see on_load_checkpoint)


def _get_rng_state() -> dict:
    import random

    import numpy as np

    # Plain types and tensors only, so that checkpoints load with torch.load(weights_only=True).
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        try:
            torch.cuda.set_rng_state_all(state["cuda"])
        except RuntimeError:  # a different number of GPUs than when saved: keep the fresh state
            pass
