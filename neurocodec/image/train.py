"""Training the image codec with the same entry point: `python train/fit.py --config image_fsq.yaml`.

`train/fit.py` hands a config whose `model.family` is an image family to `main` here. The run folder,
Lightning trainer, atomic checkpoints, exact resume, EMA export to `codec.safetensors`, progress bar and
loggers are those of the audio training (`neurocodec.train.engine.build_trainer`, `callbacks.py`,
`progress.py`); what differs is the config sections `data` (image folders), `loss` (L1, SSIM/MS-SSIM,
perceptual, adversarial) and `disc` (PatchGAN), and the Lightning module below.

One training step = one PatchGAN step (after `optim.disc_start_step` generator steps) then one generator
step; `gen_step` counts generator steps, as in `neurocodec.train.module`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist
import yaml
from torch import nn

from ..codecs.model import CodecConfig
from ..codecs.quantizers import CodebookUsage
from ..config import ConfigError, from_dict, load_config
from ..distributed import world_size
from ..errors import UserError
from ..train.config import OptimConfig, TrainerConfig, _check_types, drop_run_record, option_help, split_lightning_args
from ..train.engine import build_trainer as build_codec_trainer
from ..train.engine import fit_in_run_dir, print_or_train, resume_hint, run_dir_of_checkpoint
from ..train.ema import WeightEMA
from ..train.module import gan_optimizers
from ..train.losses import discriminator_loss, feature_matching_loss, generator_adversarial_loss
from .data import ImageDataConfig, ImageDataModule
from .discriminator import ImageDiscriminators, PatchDiscConfig
from .losses import ImageLossConfig, PerceptualLoss, reconstruction_losses
from .metrics import ms_ssim, psnr, quantize_8bit, ssim


@dataclass
class ImageTrainConfig:
    name: str = "image"
    preset: str | None = None
    model: CodecConfig = field(default_factory=lambda: CodecConfig(family="image"))
    data: ImageDataConfig = field(default_factory=ImageDataConfig)
    loss: ImageLossConfig = field(default_factory=ImageLossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    disc: PatchDiscConfig = field(default_factory=PatchDiscConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


def parse_image_train_config(raw: dict) -> ImageTrainConfig:
    raw = split_lightning_args(raw)
    config = from_dict(ImageTrainConfig, _check_types(ImageTrainConfig, raw, "config"), "config")
    from .model import ImageNetConfig

    from_dict(ImageNetConfig, config.model.image, "config.model.image")  # typos in model.image are errors now
    return config


class ImageTrainingModule(L.LightningModule):
    def __init__(self, config: ImageTrainConfig, codec: nn.Module) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.config = config
        self.codec = codec  # built before DDP starts (sync_codebook is fixed at construction)
        self.disc = ImageDiscriminators(config.disc) if config.disc.kinds else None
        self.perceptual = PerceptualLoss(config.loss.perceptual_model) if config.loss.perceptual_model else None
        # As the audio module: average the decoder only; the encoder must match the live codebooks.
        self.ema = (WeightEMA(codec, config.optim.ema_decay, live_prefixes=("encoder.", "quantizer."))
                    if config.optim.ema_decay > 0 else None)
        self.register_buffer("gen_step", torch.zeros((), dtype=torch.long))
        self.steps_before = 0  # as the audio module: steps of the model this run was fine-tuned from
        self._val: dict = {}

    def configure_optimizers(self):
        return gan_optimizers(self.codec, self.disc, self.config.optim)

    @staticmethod
    def _as_list(x) -> list:
        return list(x) if isinstance(x, (list, tuple)) else [x]

    def on_train_epoch_start(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if dm is not None and getattr(dm, "train_set", None) is not None:
            dm.train_set.epoch = self.current_epoch  # new random crops every (virtual) epoch

    def weighted_total(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        total = losses["l1"] * 0.0
        for name, value in losses.items():
            weight = getattr(self.config.loss, name)
            if weight:
                total = total + weight * value
        return total

    def training_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        o, lc = self.config.optim, self.config.loss
        step = int(self.gen_step)
        optimizers, schedulers = self._as_list(self.optimizers()), self._as_list(self.lr_schedulers())
        real = batch
        out = self.codec(real)
        fake = out.image
        use_gan = self.disc is not None and step >= o.disc_start_step
        logs: dict[str, torch.Tensor] = {}
        if use_gan:
            opt_d = optimizers[1]
            loss_d = discriminator_loss([r[0] for r in self.disc(real)], [f[0] for f in self.disc(fake.detach())],
                                        lc.adversarial_kind)
            opt_d.zero_grad(set_to_none=True)
            self.manual_backward(loss_d)
            if o.disc_grad_clip > 0:
                self.clip_gradients(opt_d, gradient_clip_val=o.disc_grad_clip, gradient_clip_algorithm="norm")
            opt_d.step()
            schedulers[1].step()
            logs["train/disc"] = loss_d.detach()

        losses = reconstruction_losses(fake, real, lc, self.perceptual)
        losses["quantizer"] = out.quantizer_loss.float()
        if use_gan:
            out_fake = self.disc(fake)
            losses["adversarial"] = generator_adversarial_loss([f[0] for f in out_fake], lc.adversarial_kind)
            if lc.feature > 0:
                with torch.no_grad():
                    out_real = self.disc(real)
                losses["feature"] = feature_matching_loss([r[1] for r in out_real], [f[1] for f in out_fake])
        total = self.weighted_total(losses)
        opt_g = optimizers[0]
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(total)
        if o.grad_clip > 0:
            params = [p for p in self.codec.parameters() if p.grad is not None]
            logs["train/grad_norm"] = torch.nn.utils.get_total_norm([p.grad for p in params]).detach()
            self.clip_gradients(opt_g, gradient_clip_val=o.grad_clip, gradient_clip_algorithm="norm")
        opt_g.step()
        schedulers[0].step()
        self.gen_step += 1
        if self.ema is not None:
            self.ema.update(self.codec, copy_only=step < o.ema_start_step)

        b = real.shape[0]
        logs.update({f"train/{k}": v.detach() for k, v in losses.items()})
        logs["train/total"] = total.detach()
        logs["train/psnr"] = psnr(fake.detach().clamp(0, 1), real).mean()
        logs["train/lr"] = torch.tensor(opt_g.param_groups[0]["lr"])
        logs.update({f"train/{k}": v.float() for k, v in out.metrics.items()})
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=b)
        self.log("gen_step", self.gen_step.float(), on_step=True, prog_bar=True, batch_size=b)
        self.log("l1", losses["l1"].detach(), on_step=True, prog_bar=True, logger=False, batch_size=b)
        self.log("psnr", logs["train/psnr"], on_step=True, prog_bar=True, logger=False, batch_size=b)

    def averaged_codec(self) -> nn.Module:
        if self.ema is not None:
            return self.ema.averaged(self.codec)
        return copy.deepcopy(self.codec).eval().requires_grad_(False)

    # -- validation: PSNR / SSIM / MS-SSIM of the EMA codec on fixed crops, codebook usage, examples --
    def on_validation_epoch_start(self) -> None:
        self._val = {"codec": self.averaged_codec(), "usage": CodebookUsage(self.codec.quantizer.cardinalities)}

    def validation_step(self, batch: torch.Tensor, batch_idx: int) -> None:
        codec = self._val["codec"]
        with torch.no_grad():
            out = codec(batch)
        fake = quantize_8bit(out.image.float())
        b = batch.shape[0]
        self.log("valid/psnr", psnr(fake, batch).mean(), sync_dist=True, batch_size=b)
        self.log("valid/ssim", ssim(fake, batch), sync_dist=True, batch_size=b)
        self.log("valid/ms_ssim", ms_ssim(fake, batch), sync_dist=True, batch_size=b)
        self.log("valid/l1", torch.nn.functional.l1_loss(fake, batch), sync_dist=True, batch_size=b)
        self._val["usage"].update(out.codes.flatten(2))
        if batch_idx == 0 and self.global_rank == 0:
            for logger in self.loggers:
                writer = getattr(logger, "experiment", None)
                if hasattr(writer, "add_images"):
                    n = min(self.config.trainer.audio_examples, b)
                    writer.add_images("images/original_decoded", torch.cat([batch[:n], fake[:n]]), int(self.gen_step))

    def on_validation_epoch_end(self) -> None:
        usage = self._val["usage"]
        counts = torch.stack(usage.counts)
        if dist.is_available() and dist.is_initialized():
            device = self.device if self.device.type != "cpu" else torch.device("cpu")
            counts = counts.to(device)
            dist.all_reduce(counts)
            counts = counts.cpu()
        usage.counts = list(counts)
        metrics = {f"valid/{k}": float(x) for k, x in usage.compute().items()}
        n = len(usage.counts)
        metrics["valid/usage_mean"] = sum(metrics[f"valid/codebook{k}/usage"] for k in range(n)) / n
        self.log_dict(metrics, sync_dist=False)
        self._val = {}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["neurocodec"] = {"gen_step": int(self.gen_step), "steps_before": self.steps_before}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.steps_before = int((checkpoint.get("neurocodec") or {}).get("steps_before", 0))


def build_trainer(config: ImageTrainConfig, run_dir: Path, world: int, extra_callbacks=(), loggers: bool = True):
    """The audio runs' trainer (`neurocodec.train.engine.build_trainer`); Lightning's max_steps counts G + D steps."""
    t, o = config.trainer, config.optim
    d_steps = max(0, t.max_steps - o.disc_start_step) if config.disc.kinds else 0
    return build_codec_trainer(config, run_dir, world, extra_callbacks, loggers, lightning_steps=t.max_steps + d_steps)


# -- train/fit.py for image configs (the image family's `training` entry, image/family.py) ----------------------
def resolve_image_config(args) -> ImageTrainConfig:
    from_saved = args.config is None
    name = args.config or str(run_dir_of_checkpoint(Path(args.ckpt_path)) / "config.yaml")
    raw = load_config(name, None if from_saved else args.preset, args.overrides)
    drop_run_record(raw)
    if from_saved and args.preset is None:
        raw["preset"] = (yaml.safe_load(Path(name).read_text()) or {}).get("preset")
    try:
        return parse_image_train_config(raw)
    except ConfigError as err:
        raise ConfigError(str(err).replace("config.", "--")) from None


def run_image_training(config: ImageTrainConfig, run_dir: Path, ckpt_path: str | None = None, loggers: bool = True,
                       extra_callbacks=(), init_from: str | None = None):
    from ..codecs.checkpoint import build_codec, lineage_steps, load_weights_for_training

    run_dir = Path(run_dir)
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise UserError(f"checkpoint {ckpt_path} does not exist")
    world = world_size(config.trainer)
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    codec = build_codec(config.model, sync_codebook=world > 1, name=run_dir.name)
    # fine-tuning (see --init_from in train/fit.py); weights first, as the module's weight EMA starts from them
    init_meta = load_weights_for_training(codec, init_from) if init_from is not None else None
    module = ImageTrainingModule(config, codec)
    if init_meta is not None:
        module.steps_before = lineage_steps(init_meta)
    datamodule = ImageDataModule(config.data, codec.downsample, seed=config.trainer.seed)
    trainer, export = build_trainer(config, run_dir, world, extra_callbacks, loggers)
    fit_in_run_dir(trainer, module, datamodule, config, run_dir, ckpt_path, init_from)
    return trainer, module, export


def main(args) -> int:
    """`train/fit.py` for image configs (`args`: `neurocodec.train.engine.FitArgs`)."""
    if args.help:
        from .model import ImageNetConfig

        config = resolve_image_config(args)
        print("Image codec options (--SECTION.KEY VALUE); default -> value in this config:")
        rows = [r for r in option_help(ImageTrainConfig(), config)
                if not r[0].startswith(("model.seanet.", "model.sample_rate", "model.image"))]  # audio-only / below
        rows += option_help(ImageNetConfig(), from_dict(ImageNetConfig, config.model.image, "model.image"), "model.image.")
        for key, default, value in sorted(rows, key=lambda r: (not r[0].startswith("model."), r[0])):
            print(f"  --{key:<38}{default}" + (f"  ->  {value}" if value != default else ""))
        return 0
    config = resolve_image_config(args)
    finished = print_or_train(args, config, run_image_training)
    if finished is not None:
        run_dir, export = finished
        m = export.summary.get("metrics", {})
        if m.get("valid/psnr") is not None:
            print(f"last validation (EMA codec): PSNR {m['valid/psnr']:.2f} dB, MS-SSIM {m.get('valid/ms_ssim', float('nan')):.3f}, "
                  f"codebook usage {m.get('valid/usage_mean', float('nan')):.0%}")
        codec = export.codec_path
        print(f"image codec: {codec}\n"
              f"  neurocodec encode photo.png -o tokens.npy --model {codec}\n"
              f"  neurocodec decode tokens.npy -o decoded.png --model {codec}\n"
              f"  neurocodec eval --model {codec} --data data/images/test --report docs/image\n"
              f"resume: {resume_hint(run_dir, config.trainer, export.summary.get('gen_step', 0))}")
    return 0
