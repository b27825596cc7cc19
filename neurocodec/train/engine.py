"""What every codec run shares, audio and image alike: its command line, its run folder, the Lightning
Trainer (checkpoints, EMA codec export, progress bar, logs, DDP strategy) and the fit in that folder.

`train/fit.py` (audio families) and `image/train.py` (the image family) each parse their own config and build
their own module and data, then call these; neither imports the other.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..config import ConfigError, load_config
from ..errors import UserError
from .config import TrainConfig, TrainerConfig, max_time_seconds

if TYPE_CHECKING:  # Lightning is imported only when training starts (a fast --help)
    from .callbacks import CodecExport

RUN_DIR_ENV = "NEUROCODEC_RUN_DIR"  # rank 0 hands its run directory to the DDP processes it launches


# -- the command line of every run (train/fit.py) ----------------------------------------------------------------
@dataclasses.dataclass
class FitArgs:
    config: str | None = None
    preset: str | None = None
    ckpt_path: str | None = None
    init_from: str | None = None
    print_config: bool = False
    help: bool = False
    overrides: list[str] = dataclasses.field(default_factory=list)


def parse_args(argv: list[str]) -> FitArgs:
    args = FitArgs()
    i = 0
    while i < len(argv):
        token = argv[i]
        if token in ("-h", "--help"):
            args.help = True
            i += 1
            continue
        if token == "--print_config":
            args.print_config = True
            i += 1
            continue
        if not token.startswith("--"):
            raise ConfigError(f"unexpected argument {token!r} (options look like --trainer.max_steps 1000)")
        key, eq, value = token[2:].partition("=")
        if not eq:
            if i + 1 >= len(argv):
                raise ConfigError(f"option --{key} needs a value")
            value = argv[i + 1]
            i += 1
        i += 1
        if key in ("config", "preset", "ckpt_path", "init_from"):
            setattr(args, key, value)
        elif "." in key or key == "stages":  # --stages takes a whole YAML list (multi-stage training)
            args.overrides.append(f"{key}={value}")
        else:
            raise ConfigError(f"unknown option --{key}; options are --config, --preset, --ckpt_path, --init_from, --print_config "
                              f"and --SECTION.KEY (sections: model, data, loss, optim, disc, trainer); see --help")
    if args.init_from is not None and args.ckpt_path is not None:
        raise ConfigError("--init_from starts a new run from a model's weights and --ckpt_path resumes a run: give one")
    return args


def family_of_args(args: FitArgs):
    """The codec family (codecs/registry.py) of the config `train/fit.py` was given, or of the run config of
    --ckpt_path; the audio family `seanet` when the config cannot be read (its training then reports why)."""
    from ..codecs.registry import get_family

    name = args.config
    if name is None and args.ckpt_path:
        name = run_dir_of_checkpoint(Path(args.ckpt_path)) / "config.yaml"
    family = "seanet"
    if name is not None:
        try:
            raw = load_config(name, args.preset if args.config else None, args.overrides)
            family = (raw.get("model") or {}).get("family") or family
        except UserError:
            pass
    return get_family(family)


# -- run folder, processes, Trainer ------------------------------------------------------------------------------
def run_dir_of_checkpoint(ckpt: Path) -> Path:
    ckpt = ckpt.resolve()
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent


def choose_run_dir(config: TrainConfig, ckpt_path: str | None) -> Path:
    if os.environ.get(RUN_DIR_ENV) and os.environ.get("LOCAL_RANK") not in (None, "0"):
        return Path(os.environ[RUN_DIR_ENV])  # a DDP process started by rank 0: same folder as rank 0
    t = config.trainer
    if ckpt_path and t.run_name is None:
        return run_dir_of_checkpoint(Path(ckpt_path))
    name = t.run_name or (config.name + (f"-{config.preset}" if config.preset else ""))
    base = Path(t.root_dir) / name
    if t.run_name is not None or not (base / "config.yaml").exists():
        return base
    n = 1
    while (Path(t.root_dir) / f"{name}-{n}" / "config.yaml").exists():  # never mix two runs in one folder
        n += 1
    return Path(t.root_dir) / f"{name}-{n}"


def make_strategy(t: TrainerConfig, world: int):
    from lightning.pytorch.strategies import DDPStrategy

    s = t.strategy
    if world > 1 and (s == "auto" or s.startswith("ddp")):
        # Manual GAN optimisation leaves part of the module without gradients in each backward (the codec
        # in the D step, the discriminator during warm-up). Codebook buffers are kept in sync by the
        # quantizer's own all-reduce (sync_codebook), so DDP must not overwrite them with rank 0's.
        return DDPStrategy(find_unused_parameters=True, broadcast_buffers=False,
                           start_method="spawn" if s.startswith("ddp_spawn") else "popen")
    return s


def build_trainer(config: TrainConfig, run_dir: Path, world: int, extra_callbacks=(), loggers: bool = True,
                  lightning_steps: int | None = None):
    """The Lightning trainer of every codec run (audio and image): checkpoints named by generator step, EMA
    codec export, a progress bar over generator steps, atomic checkpoint writes, TensorBoard + CSV logs.
    `lightning_steps`: Lightning's max_steps (it counts G and D optimizer steps); default: the audio rule."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger

    from .callbacks import AtomicCheckpointIO, CodecExport, ResumableCSVLogger
    from .module import lightning_max_steps
    from .progress import GeneratorStepBar

    t = config.trainer
    checkpoint = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="step{gen_step:07.0f}",
                                 auto_insert_metric_name=False, monitor="gen_step", mode="max",
                                 save_top_k=t.keep_checkpoints, save_last=True,
                                 # a resumed run overwrites last.ckpt (atomically, AtomicCheckpointIO): with
                                 # the counter on, Lightning left last-v1.ckpt, last-v2.ckpt, ... beside it
                                 enable_version_counter=False)
    export = CodecExport(run_dir, config.name, keep_exports=t.keep_exports)
    callbacks = [checkpoint, export, *extra_callbacks]
    if t.enable_progress_bar:
        callbacks.append(GeneratorStepBar(t.max_steps))
    logger = [TensorBoardLogger(save_dir=str(run_dir), name="", version="tb"),
              ResumableCSVLogger(save_dir=str(run_dir), name="", version="csv")] if loggers else False
    if lightning_steps is None:
        lightning_steps = lightning_max_steps(t.max_steps, config.optim.disc_start_step, bool(config.disc.kinds), config)
    arguments = dict(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=make_strategy(t, world),
        precision=t.precision, max_steps=lightning_steps,
        max_time=t.max_time, max_epochs=-1, val_check_interval=t.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        log_every_n_steps=t.log_every, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        enable_progress_bar=t.enable_progress_bar, deterministic=t.deterministic, default_root_dir=str(run_dir),
        enable_model_summary=False)
    arguments.update(t.lightning_args)  # any other Trainer argument from the command line (config.split_lightning_args)
    trainer = L.Trainer(**arguments)
    return trainer, export


def quiet_lightning() -> None:
    """Hide Lightning's notices that say nothing to our users (few data workers on a small machine, a run
    folder that already holds checkpoints when resuming); real warnings still show."""
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")


def fit_in_run_dir(trainer, module, datamodule, config, run_dir: Path, ckpt_path: str | None,
                   init_from: str | None = None) -> None:
    """Save the resolved config beside the run (rank 0, atomically), then fit (audio and image runs)."""
    if trainer.is_global_zero:
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = dataclasses.asdict(config)
        resolved["resumed_from"] = str(ckpt_path) if ckpt_path else None
        origin = init_from
        if origin is None and ckpt_path and (run_dir / "config.yaml").is_file():  # a resumed fine-tuning run
            origin = (yaml.safe_load((run_dir / "config.yaml").read_text()) or {}).get("initialised_from")
        if origin is not None:
            resolved["initialised_from"] = str(origin)
        tmp = run_dir / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))
        tmp.replace(run_dir / "config.yaml")
    os.environ[RUN_DIR_ENV] = str(run_dir)  # DDP processes started by rank 0 use the same folder
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
    finally:
        os.environ.pop(RUN_DIR_ENV, None)


def print_or_train(args: FitArgs, config, run) -> tuple[Path, "CodecExport"] | None:
    """The flow shared by audio and image training: print the resolved config with --print_config, else run
    `run(config, run_dir, ckpt_path, init_from=...)` in its run folder and, on rank 0, say how many steps it
    trained. Returns (run folder, export callback) on rank 0 after training, else None."""
    if args.print_config:
        print(yaml.safe_dump(dataclasses.asdict(config), sort_keys=False), end="")
        return None
    run_dir = choose_run_dir(config, args.ckpt_path)
    quiet_lightning()
    trainer, module, export = run(config, run_dir, args.ckpt_path, init_from=args.init_from)
    if not trainer.is_global_zero:
        return None
    before = f" on top of the {module.steps_before} of the model it started from" if module.steps_before else ""
    print(f"\nTrained {int(module.gen_step)} generator steps{before} ({config.name}"
          f"{':' + config.preset if config.preset else ''}); run folder {run_dir}")
    return run_dir, export


def resume_hint(run_dir: Path, t, gen_step: int) -> str:
    """The command that continues a finished run. A run stopped by `trainer.max_time` needs a larger max_time, not
    more steps: Lightning's timer restores the time already trained, so the same max_time stops it at once."""
    command = f"python train/fit.py --ckpt_path {Path(run_dir) / 'checkpoints' / 'last.ckpt'}"
    if t.max_time and gen_step < t.max_steps:
        total = 2 * max_time_seconds(t.max_time)
        doubled = f"{total // 86400:02d}:{total // 3600 % 24:02d}:{total // 60 % 60:02d}:{total % 60:02d}"
        # a shell comment, so that the whole line can be pasted
        return f"{command} --trainer.max_time {doubled}  # the time already trained counts towards it"
    return f"{command} --trainer.max_steps {t.max_steps * 2}"
