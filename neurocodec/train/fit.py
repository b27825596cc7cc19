"""`python train/fit.py --config grvq_4cb.yaml [--preset tiny] [--section.key value ...]` (also `neurocodec train`).

Reads a config (bare names are looked up in `configs/`), applies a size preset and command-line
overrides, validates every key against the dataclasses in `neurocodec.train.config`, builds the codec
(before Lightning starts DDP: the quantizer fixes codebook synchronisation at construction), and runs a
Lightning Trainer. Each run lives in `runs/<name>/`: `config.yaml` (the resolved config), `checkpoints/`
(Lightning checkpoints, `last.ckpt`), `codec.safetensors` (EMA generator, for `neurocodec encode --model`),
`tb/` (TensorBoard), `csv/metrics.csv` and `summary.json`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..config import ConfigError, load_config
from ..errors import UserError
from .config import TrainConfig, TrainerConfig, drop_run_record, max_time_seconds, option_help, parse_train_config

if TYPE_CHECKING:  # Lightning is imported only when training starts (a fast --help)
    from .callbacks import CodecExport

RUN_DIR_ENV = "NEUROCODEC_RUN_DIR"  # rank 0 hands its run directory to the DDP processes it launches

USAGE = """usage: python train/fit.py --config NAME [--preset PRESET] [--ckpt_path CKPT | --init_from MODEL] [--print_config]
                         [--SECTION.KEY VALUE ...]

Train a codec. NAME is a config in configs/ (grvq_4cb, rvq_8cb, fsq; '.yaml' optional) or a path.
Any option below can be given as --SECTION.KEY VALUE or --SECTION.KEY=VALUE (values are YAML:
--optim.betas [0.5,0.9], --data.min_seconds null).

  --config NAME        config name or path (may be left out with --ckpt_path: the run's config.yaml is used)
  --preset PRESET      size preset inside the config (e.g. tiny: small network, short CPU run)
  --ckpt_path CKPT     resume exactly from a Lightning checkpoint (e.g. runs/NAME/checkpoints/last.ckpt)
  --init_from MODEL    fine-tune: a new run (step 0, fresh discriminator and optimisers) whose codec starts
                       from MODEL's weights: `default` (with --config grvq_4cb --preset tiny) or an exported
                       runs/NAME/codec.safetensors
  --print_config       print the resolved config and exit
  -h, --help           this help (with --config: also the values the config sets)

Multi-GPU / multi-node: --trainer.devices N --trainer.num_nodes M --trainer.strategy ddp;
CPU processes: --trainer.accelerator cpu --trainer.devices 2 --trainer.strategy ddp (gloo);
mixed precision on GPU: --trainer.precision bf16-mixed. --trainer.max_steps counts generator steps.
"""


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


def resolve_config(args: FitArgs) -> TrainConfig:
    from_saved = False
    if args.config is None:
        if args.ckpt_path is None:
            raise ConfigError("--config NAME is required (e.g. --config grvq_4cb.yaml); see --help")
        saved = run_dir_of_checkpoint(Path(args.ckpt_path)) / "config.yaml"
        if not saved.is_file():
            raise ConfigError(f"--config not given and {saved} does not exist")
        args.config, from_saved = str(saved), True
    raw = load_config(args.config, args.preset, args.overrides)
    drop_run_record(raw)
    named = {o.partition("=")[0] for o in args.overrides}
    if from_saved and not named & {"trainer.run_name", "trainer.root_dir"}:
        # The run is the folder the checkpoint is in, even when that folder was copied or moved since
        # (its saved run_name would point back at the original and mix two runs' checkpoints and logs).
        raw.setdefault("trainer", {})["run_name"] = None
    if from_saved and args.preset is None:  # a saved run config is already resolved: keep its preset label
        raw["preset"] = (yaml.safe_load(Path(args.config).read_text()) or {}).get("preset")
    raw.setdefault("model", {})
    try:
        return parse_train_config(raw)
    except ConfigError as err:
        raise ConfigError(str(err).replace("config.", "--")) from None


def print_help(args: FitArgs) -> None:
    current = None
    if args.config:
        try:
            current = resolve_config(args)
        except UserError as err:
            print(f"(cannot show the values of --config {args.config}: {err})\n")
    print(USAGE)
    rows = option_help(TrainConfig(), current)
    width = max(len(r[0]) for r in rows) + 2
    header = f"  {'option':<{width + 2}}default" + (f"  ->  in {current.name}" + (f":{current.preset}" if current.preset else "") if current else "")
    print(header)
    for key, default, value in rows:
        extra = f"  ->  {value}" if current is not None and value != default else ""
        print(f"  --{key:<{width}}{default}{extra}")


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


def world_size(t: TrainerConfig) -> int:
    import torch

    d = t.devices
    gpu = t.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    if isinstance(d, (list, tuple)):
        n = len(d)
    elif isinstance(d, int):
        n = d if d > 0 else (torch.cuda.device_count() if gpu else os.cpu_count() or 1)
    elif isinstance(d, str) and d != "auto":
        n = len([x for x in d.split(",") if x.strip()]) if "," in d else int(d)
    else:
        n = torch.cuda.device_count() if gpu else 1
    return max(1, n) * t.num_nodes


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
    export = CodecExport(run_dir, config.name)
    callbacks = [checkpoint, export, *extra_callbacks]
    if t.enable_progress_bar:
        callbacks.append(GeneratorStepBar(t.max_steps))
    logger = [TensorBoardLogger(save_dir=str(run_dir), name="", version="tb"),
              ResumableCSVLogger(save_dir=str(run_dir), name="", version="csv")] if loggers else False
    if lightning_steps is None:
        lightning_steps = lightning_max_steps(t.max_steps, config.optim.disc_start_step, bool(config.disc.kinds), config)
    trainer = L.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=make_strategy(t, world),
        precision=t.precision, max_steps=lightning_steps,
        max_time=t.max_time, max_epochs=-1, val_check_interval=t.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
        log_every_n_steps=t.log_every, logger=logger, callbacks=callbacks, plugins=[AtomicCheckpointIO()],
        enable_progress_bar=t.enable_progress_bar, deterministic=t.deterministic, default_root_dir=str(run_dir),
        enable_model_summary=False)
    return trainer, export


def run_training(config: TrainConfig, run_dir: Path, ckpt_path: str | None = None, datamodule=None,
                 extra_callbacks=(), loggers: bool = True, init_from: str | None = None):
    """Build codec, module, data and trainer; fit. Returns (trainer, module, export callback).
    `init_from`: a codec file whose weights the codec starts from (fine-tuning; see --init_from)."""
    import lightning as L

    from ..codecs.checkpoint import build_codec, lineage_steps, load_weights_for_training
    from .datamodule import CodecDataModule
    from .module import CodecTrainingModule

    run_dir = Path(run_dir)
    world = world_size(config.trainer)
    if ckpt_path is not None and not Path(ckpt_path).is_file():
        raise UserError(f"checkpoint {ckpt_path} does not exist")
    L.seed_everything(config.trainer.seed, workers=True, verbose=False)
    label = run_dir.name
    codec = build_codec(config.model, sync_codebook=world > 1, name=label)
    # Weights first: the module's weight EMA starts from them.
    init_meta = load_weights_for_training(codec, init_from) if init_from is not None else None
    module = CodecTrainingModule(config, codec, fine_tuning=init_meta is not None)
    if init_meta is not None:
        module.steps_before = lineage_steps(init_meta)
    if datamodule is None:
        datamodule = CodecDataModule(config.data, codec.sample_rate, codec.frame_size, seed=config.trainer.seed)
    trainer, export = build_trainer(config, run_dir, world, extra_callbacks, loggers)
    fit_in_run_dir(trainer, module, datamodule, config, run_dir, ckpt_path, init_from)
    return trainer, module, export


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


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    from ..image.train import is_image_config

    if is_image_config(args):  # image families have their own data, losses and module (neurocodec/image/train.py)
        from ..image.train import main as image_main

        return image_main(args)
    if args.help:
        print_help(args)
        return 0
    config = resolve_config(args)
    finished = print_or_train(args, config, run_training)
    if finished is not None:
        run_dir, export = finished
        s = export.summary
        codec = export.codec_path
        if s.get("metrics", {}).get("valid/pesq") is not None:
            m = s["metrics"]
            print(f"last validation (EMA codec): PESQ-WB {m['valid/pesq']:.2f}, STOI {m.get('valid/stoi', float('nan')):.3f}, "
                  f"codebook usage {m.get('valid/usage_mean', float('nan')):.0%}")
        if s.get("skipped_files"):
            print(f"warning: {len(s['skipped_files'])} unreadable or too short file(s) were skipped (see summary.json)")
        if s.get("world_size", 1) > 1:
            print(f"codebooks identical on all {s['world_size']} processes: {s['codebooks_in_sync']}")
        print(f"EMA codec: {codec}\n"
              f"  neurocodec encode speech.wav -o codes.npy --model {codec}\n"
              f"  neurocodec decode codes.npy -o decoded.wav --model {codec}\n"
              f"resume: {resume_hint(run_dir, config.trainer, s.get('gen_step', 0))}\n"
              f"logs: tensorboard --logdir {run_dir / 'tb'}")
    return 0


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


def cli() -> int:
    """Entry for train/fit.py: user errors as one line, exit code 2."""
    try:
        return main()
    except UserError as err:
        print(f"fit.py: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fit.py: interrupted (resume with --ckpt_path runs/<name>/checkpoints/last.ckpt)", file=sys.stderr)
        return 130
