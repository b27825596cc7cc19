"""`python train/fit.py --config grvq_4cb.yaml [--preset tiny] [--section.key value ...]` (also `neurocodec train`).

Reads a config (bare names are looked up in `configs/`), applies a size preset and command-line
overrides, validates every key against the dataclasses in `neurocodec.train.config`, builds the codec
(before Lightning starts DDP: the quantizer fixes codebook synchronisation at construction), and runs a
Lightning Trainer. Each run lives in `runs/<name>/`: `config.yaml` (the resolved config), `checkpoints/`
(Lightning checkpoints, `last.ckpt`), `codec.safetensors` (EMA generator, for `neurocodec encode --model`),
`tb/` (TensorBoard), `csv/metrics.csv` and `summary.json`.

`main` hands the command line to the training entry of the config's family (codecs/registry.py): `train_codec`
here for the audio families. The run folder and the Trainer come from `engine.py`, shared with the image family.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from ..config import ConfigError, load_config
from ..errors import UserError
from .config import TrainConfig, option_help, parse_train_config, drop_run_record
# The run folder, Trainer and fit that audio and image runs share (re-exported: tests and scripts use them here).
from ..distributed import world_size
from .engine import (FitArgs, build_trainer, choose_run_dir, family_of_args, fit_in_run_dir, parse_args,  # noqa: F401
                     print_or_train, resume_hint, run_dir_of_checkpoint)

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
Any other argument of Lightning's Trainer passes through: --trainer.accumulate_grad_batches 2,
--trainer.limit_val_batches 0.5, --trainer.default_root_dir DIR (the same as --trainer.root_dir).
"""


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


def main(argv: list[str] | None = None) -> int:
    """Parse the command line and hand it to the training entry of the config's codec family (codecs/registry.py):
    `train_codec` below for the audio families, their own for others (images: neurocodec/image/train.py)."""
    from ..codecs.registry import resolve

    args = parse_args(sys.argv[1:] if argv is None else argv)
    return resolve(family_of_args(args).training)(args)


def train_codec(args: FitArgs) -> int:
    """Training of the audio families (the `training` entry of seanet, semanticodec and xy_single)."""
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
