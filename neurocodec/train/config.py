"""The training config: typed sections read from a YAML config (`configs/*.yaml`) plus overrides.

Sections: `model` (the codec, `neurocodec.codecs.model.CodecConfig`), `data`, `loss`, `optim`, `disc`,
`trainer`, and `teacher` (the frozen semantic teacher of semantic families, `codecs.teacher.TeacherConfig`). Every key is checked against these dataclasses, so a typo is an error that names the known
keys, and `train/fit.py --help` is generated from them (one source for options, defaults and help).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Union

from ..codecs.model import CodecConfig
from ..codecs.teacher import TeacherConfig
from ..config import ConfigError, from_dict, load_config
from ..data.dataset import MAX_SPEED, MIN_SPEED
from .discriminators import DiscConfig
from .losses import LossConfig


@dataclass
class DataConfig:
    manifest: str = "data/demo/manifest.jsonl"  # JSONL manifest (relative paths: from the repository / cwd)
    train_split: str | None = "train"
    valid_split: str | None = "valid"
    segment_seconds: float = 1.0  # training crop length (rounded down to whole frames)
    valid_segment_seconds: float = 2.0
    batch_size: int = 16  # per process
    valid_batch_size: int = 8
    num_workers: int = 2
    # Random gain of training crops around their -20 dB RMS normalisation (peaks stay below 0.99): -32 to
    # -14 dB RMS. Real recordings sit anywhere in that range (the Debian corpus: -15 to -21 dB); with the
    # old [-6, 0] every file louder than -20 dB was outside what the encoder had seen, and the BatchNorm
    # statistics of xy_single's latent no longer matched (measured: latent variance 3.5x the running one).
    gain_db: list[float] = field(default_factory=lambda: [-12.0, 6.0])
    min_seconds: float | None = None  # skip shorter files
    epoch_length: int | None = None  # training crops per (virtual) epoch; None: one per file
    # 0: crops drawn in proportion to audio duration; 1: every speaker (manifest `speaker`) equally often;
    # between: a speaker's share ~ its hours^(1 - speaker_balance). Needs epoch_length.
    speaker_balance: float = 0.0
    # Speed perturbation of training crops: each crop is played at a factor drawn from this list (uniformly;
    # pitch, formants and tempo together, like a smaller or larger speaker: ASR's [0.9, 1.0, 1.1]). [1.0]: off.
    speed_perturb: list[float] = field(default_factory=lambda: [1.0])
    valid_items: int | None = 64  # validation crops (fixed, deterministic); None: all

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.valid_batch_size < 1:
            raise ValueError("batch sizes must be >= 1")
        if self.segment_seconds <= 0 or self.valid_segment_seconds <= 0:
            raise ValueError("segment lengths must be > 0")
        if not 0.0 <= self.speaker_balance <= 1.0:
            raise ValueError(f"speaker_balance must be in [0, 1], got {self.speaker_balance}")
        if not self.speed_perturb or not all(MIN_SPEED <= x <= MAX_SPEED for x in self.speed_perturb):
            raise ValueError(f"speed_perturb factors must be between {MIN_SPEED} and {MAX_SPEED}, "
                             f"got {self.speed_perturb}")


@dataclass
class OptimConfig:
    lr: float = 3e-4  # generator AdamW
    betas: list[float] = field(default_factory=lambda: [0.8, 0.99])
    weight_decay: float = 0.0
    disc_lr: float = 3e-4  # discriminator AdamW (same betas / weight decay)
    lr_gamma: float = 0.999996  # ExponentialLR decay per optimizer step (G and D schedules each count their own steps)
    grad_clip: float = 1000.0  # max grad norm of the generator (0: off)
    disc_grad_clip: float = 10.0
    disc_start_step: int = 0  # generator steps before the discriminator and the GAN losses start
    ema_decay: float = 0.999  # EMA of generator weights (validation and export use it); 0: off
    ema_start_step: int = 0  # EMA copies the weights until this generator step


@dataclass
class TrainerConfig:
    max_steps: int = 200000  # GENERATOR steps (discriminator steps are not counted)
    max_time: str | None = None  # also stop (cleanly: checkpoint + export) after this long, "DD:HH:MM:SS"
    accelerator: str = "auto"  # cpu | gpu | auto
    devices: Any = 1  # int, list of device ids, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto | ddp | ddp_find_unused_parameters_true | ...
    precision: Any = "32-true"  # 32-true | bf16-mixed (GPU) | 16-mixed
    val_every: int = 1000  # generator steps between validations (and checkpoints, and codec export)
    log_every: int = 50  # generator steps between logged training losses
    pesq_items: int = 8  # validation items (per process) scored with PESQ-WB / STOI
    audio_examples: int = 2  # validation items written to TensorBoard as audio
    keep_checkpoints: int = 2  # most recent Lightning checkpoints kept (plus last.ckpt)
    # keep every codec export as <run>/exports/codec_step<N>.safetensors (for scoring several checkpoints)
    keep_exports: bool = False
    root_dir: str = "runs"
    run_name: str | None = None  # default: <config name>[-<preset>]
    seed: int = 0
    enable_progress_bar: bool = True
    deterministic: bool = False
    # Any other argument of Lightning's Trainer, given as --trainer.NAME VALUE (e.g. --trainer.accumulate_grad_batches);
    # `split_lightning_args` gathers them here and `build_trainer` passes them on.
    lightning_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_steps < 1 or self.val_every < 1 or self.log_every < 1:
            raise ValueError("max_steps, val_every and log_every must be >= 1")
        if self.max_time is not None:
            max_time_seconds(self.max_time)  # checked here, not when Lightning builds its timer after setup


# Lightning Trainer arguments that neurocodec sets itself: the option to use instead, or None (not settable).
LIGHTNING_ARGS_WE_SET = {"val_check_interval": "trainer.val_every", "log_every_n_steps": "trainer.log_every",
                         "callbacks": None, "logger": None, "plugins": None}
LIGHTNING_ALIASES = {"default_root_dir": "root_dir"}  # Lightning's name -> ours (the run folder goes under it)


def split_lightning_args(raw: dict) -> dict:
    """Move the `trainer` keys that are not TrainerConfig fields but are arguments of `lightning.Trainer` into
    `trainer.lightning_args`, as Lightning's own CLI accepts them; anything else stays for the strict check
    to report. Lightning is imported only when such a key is present (a fast --help otherwise)."""
    trainer = raw.get("trainer")
    if not isinstance(trainer, dict):
        return raw
    ours = {f.name for f in dataclasses.fields(TrainerConfig)}
    foreign = [k for k in trainer if k not in ours]
    if not foreign:
        return raw
    import inspect

    from lightning.pytorch import Trainer

    accepted = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    trainer = dict(trainer)
    passed = dict(trainer.get("lightning_args") or {})
    for key in foreign:
        if key in LIGHTNING_ALIASES:
            ours_key = LIGHTNING_ALIASES[key]
            value = trainer.pop(key)
            if ours_key in trainer and trainer[ours_key] != value:
                raise ConfigError(f"trainer.{key} and trainer.{ours_key} name the same folder: give one")
            trainer[ours_key] = value
        elif key in LIGHTNING_ARGS_WE_SET:
            instead = LIGHTNING_ARGS_WE_SET[key]
            raise ConfigError(f"trainer.{key} is set by neurocodec" + (f"; use --{instead}" if instead else
                                                                        " and cannot be given from a config"))
        elif key in accepted:
            passed[key] = trainer.pop(key)
    if passed:
        trainer["lightning_args"] = passed
    return {**raw, "trainer": trainer}


def max_time_seconds(max_time: str) -> int:
    """Seconds in a `trainer.max_time` of the form DD:HH:MM:SS, the one form Lightning's Timer accepts."""
    match = re.fullmatch(r"(\d+):(\d\d):(\d\d):(\d\d)", str(max_time).strip())
    if match is None:
        raise ValueError(f"trainer.max_time must be DD:HH:MM:SS (e.g. 00:01:30:00), got {max_time!r}")
    days, hours, minutes, seconds = (int(x) for x in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


def loss_weight_names() -> list[str]:
    """The loss weights of `LossConfig` (its float fields), which a training stage may override."""
    return [name for name, hint in typing.get_type_hints(LossConfig).items() if hint is float]


@dataclass
class StageConfig:
    """One stage of multi-stage training (`stages:` in a config), switched by generator step.

    A stage runs from the previous stage's `until_step` up to (not including) its own; the last stage may
    leave `until_step` out (to the end of training), and steps past every `until_step` stay in the last.
    Because the stage is a function of the generator step (saved in checkpoints), a resumed run lands in
    the right stage."""

    until_step: int | None = None
    loss: dict = field(default_factory=dict)  # loss weights that differ from the `loss:` section, e.g. {adversarial: 0}
    # Train the discriminator (and compute the GAN losses) in this stage. None: when this stage's
    # adversarial or feature weight is > 0 (after optim.disc_start_step).
    discriminator: bool | None = None
    # Parts of the codec (its top-level modules, e.g. [encoder, quantizer]) whose weights stay fixed in this
    # stage. They also run in eval mode (BatchNorm uses its running statistics), so the tokens the later
    # parts train on are the tokens inference produces. Typical use: a last stage that fine-tunes only the
    # decoder, so adversarial training cannot move the tokens learnt before it.
    freeze: list = field(default_factory=list)
    # With `freeze`: re-estimate the BatchNorm statistics of the frozen parts over the stage's first N
    # training batches (a plain average, not the running EMA), then hold them. The EMA that training kept
    # follows the last few batches of a moving network; these are the statistics inference will use.
    norm_recalibration_steps: int = 0
    # With `freeze` (quantizer and encoder among the parts): once the norms above are recalibrated, encode this
    # many frames of training audio with the frozen encoder and fit the LFQ's per-prefix bit thresholds on
    # them (model.quantizer.balanced_thresholds), so that the codes spread evenly over the entries; the decoder
    # then trains on those codes. 0: off.
    balance_code_frames: int = 0

    def __post_init__(self) -> None:
        known = loss_weight_names()
        unknown = sorted(set(self.loss) - set(known))
        if unknown:
            raise ValueError(f"unknown loss weight(s) {', '.join(unknown)} in a stage; known: {', '.join(known)}")
        for key, value in self.loss.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ValueError(f"stage loss weight {key} must be a number >= 0, got {value!r}")
        self.loss = {k: float(v) for k, v in self.loss.items()}
        if self.until_step is not None and (isinstance(self.until_step, bool) or not isinstance(self.until_step, int)
                                            or self.until_step < 1):
            raise ValueError(f"stage until_step must be a positive integer, got {self.until_step!r}")
        if self.discriminator is not None and not isinstance(self.discriminator, bool):
            raise ValueError(f"stage discriminator must be true, false or null, got {self.discriminator!r}")
        if not isinstance(self.freeze, list) or not all(isinstance(name, str) and name for name in self.freeze):
            raise ValueError(f"stage freeze must be a list of codec module names, e.g. [encoder, quantizer], "
                             f"got {self.freeze!r}")
        if (isinstance(self.norm_recalibration_steps, bool) or not isinstance(self.norm_recalibration_steps, int)
                or self.norm_recalibration_steps < 0):
            raise ValueError(f"stage norm_recalibration_steps must be an integer >= 0, got {self.norm_recalibration_steps!r}")
        if self.norm_recalibration_steps and not self.freeze:
            raise ValueError("stage norm_recalibration_steps applies to the parts the stage freezes; freeze is empty")
        if (isinstance(self.balance_code_frames, bool) or not isinstance(self.balance_code_frames, int)
                or self.balance_code_frames < 0):
            raise ValueError(f"stage balance_code_frames must be an integer >= 0, got {self.balance_code_frames!r}")
        if self.balance_code_frames and not {"encoder", "quantizer"} <= set(self.freeze):
            raise ValueError("stage balance_code_frames fits thresholds for a frozen tokenizer: the stage must freeze "
                             f"encoder and quantizer, it freezes {self.freeze}")


@dataclass
class TrainConfig:
    name: str = "codec"
    preset: str | None = None
    model: CodecConfig = field(default_factory=CodecConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    disc: DiscConfig = field(default_factory=DiscConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    # Frozen semantic teacher (codecs/teacher.py); used only by families with `uses_teacher` (semanticodec, xy_single).
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    stages: list[StageConfig] = field(default_factory=list)  # multi-stage training; empty: one stage = `loss:`

    def __post_init__(self) -> None:
        if not isinstance(self.stages, list):
            raise ConfigError(f"stages must be a list of stages, got {self.stages!r}")
        stages = []
        for i, stage in enumerate(self.stages):
            if isinstance(stage, dict):
                stage = from_dict(StageConfig, stage, f"stages[{i}]")
            elif not isinstance(stage, StageConfig):
                raise ConfigError(f"stages[{i}] must be a mapping, got {stage!r}")
            stages.append(stage)
        ends = [s.until_step for s in stages]
        if None in ends[:-1]:
            raise ConfigError("only the last stage may leave out until_step")
        bounded = [e for e in ends if e is not None]
        if any(b <= a for a, b in zip(bounded, bounded[1:])):
            raise ConfigError(f"stage until_step values must increase, got {bounded}")
        self.stages = stages
        scored_seconds = self.data.segment_seconds - self.loss.pesq_skip_ms / 1000
        if self.uses_pesq_loss and scored_seconds < PESQ_MIN_SECONDS:
            raise ConfigError(f"loss.pesq needs training crops of at least {PESQ_MIN_SECONDS} s after its "
                              f"loss.pesq_skip_ms ({self.loss.pesq_skip_ms} ms; PESQ averages over windows of 20 "
                              f"frames of 16 ms); data.segment_seconds is {self.data.segment_seconds}")

    @property
    def uses_pesq_loss(self) -> bool:
        """Whether the PESQ loss has weight anywhere in training (the `loss:` section or a stage)."""
        return self.loss.pesq > 0 or any(stage.loss.get("pesq", 0) > 0 for stage in self.stages)


PESQ_MIN_SECONDS = 0.34  # 19 hops of 256 + one window of 512 samples at 16 kHz: PESQ's 20-frame averaging span


# -- multi-stage training: what applies at a given generator step -----------------------------------------
def stage_index(config: TrainConfig, step: int) -> int:
    """The stage (0-based) that generator step `step` belongs to; 0 when the config has no stages."""
    for i, stage in enumerate(config.stages):
        if stage.until_step is None or step < stage.until_step:
            return i
    return max(0, len(config.stages) - 1)


def loss_weights_at(config: TrainConfig, step: int) -> dict[str, float]:
    """Every loss weight at generator step `step`: the `loss:` section with the stage's overrides."""
    weights = {name: getattr(config.loss, name) for name in loss_weight_names()}
    if config.stages:
        weights.update(config.stages[stage_index(config, step)].loss)
    return weights


def frozen_at(config: TrainConfig, step: int) -> frozenset[str]:
    """The codec modules held fixed at generator step `step` (the stage's `freeze` list)."""
    return frozenset(config.stages[stage_index(config, step)].freeze) if config.stages else frozenset()


def steps_into_stage(config: TrainConfig, step: int) -> int:
    """How many generator steps of its stage came before step `step` (0: the stage's first step)."""
    i = stage_index(config, step)
    return step - (config.stages[i - 1].until_step if i > 0 else 0)


def discriminator_on_at(config: TrainConfig, step: int) -> bool:
    """Whether the discriminator trains (and the GAN losses are computed) at generator step `step`."""
    if not config.disc.kinds or step < config.optim.disc_start_step:
        return False
    if not config.stages:
        return True
    stage = config.stages[stage_index(config, step)]
    if stage.discriminator is not None:
        return stage.discriminator
    weights = loss_weights_at(config, step)
    return weights["adversarial"] > 0 or weights["feature"] > 0


def discriminator_steps(config: TrainConfig, max_steps: int) -> int:
    """How many of generator steps 0..max_steps-1 also take a discriminator step (Lightning counts both)."""
    bounds = sorted({0, max_steps, config.optim.disc_start_step,
                     *(s.until_step for s in config.stages if s.until_step is not None)})
    bounds = [b for b in bounds if 0 <= b <= max_steps]
    # Within each interval between stage/warm-up boundaries the answer is constant: test its first step.
    return sum(b - a for a, b in zip(bounds, bounds[1:]) if discriminator_on_at(config, a))


def _check_types(cls: type, data: dict, where: str) -> dict:
    """Reject values of the wrong kind (`--data.batch_size eight`) before the dataclasses see them, and turn
    ints into floats where floats are due. Unknown keys are left for `from_dict` to report."""
    data = dict(data)
    hints = typing.get_type_hints(cls)
    for key, value in data.items():
        if key not in hints:
            continue
        hint, name = hints[key], f"{where}.{key}"
        if dataclasses.is_dataclass(hint) and isinstance(hint, type):
            if isinstance(value, dict):
                data[key] = _check_types(hint, value, name)
            continue
        options = typing.get_args(hint) if typing.get_origin(hint) in (Union, types.UnionType) else (hint,)
        if value is None:
            if type(None) not in options:
                raise ConfigError(f"{name} may not be empty")
            continue
        if hint is Any:
            continue
        ok = False
        for option in options:
            base = typing.get_origin(option) or option
            if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                data[key], ok = float(value), True
            elif base is float and isinstance(value, str) and _is_float(value):  # YAML 1.1 reads 3e-4 as a string
                data[key], ok = float(value), True
            elif base is int and isinstance(value, int) and not isinstance(value, bool):
                ok = True
            elif base in (str, bool, list, dict) and isinstance(value, base):
                ok = True
            if ok:
                break
        if not ok:
            wanted = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
            raise ConfigError(f"{name} must be {wanted}, got {value!r}")
    return data


def _is_float(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


# Written into a run's config.yaml by train/fit.py beside the resolved config: where the run resumed from and
# what it was fine-tuned from (--init_from). They record the run, they are not options.
RUN_RECORD_KEYS = ("resumed_from", "initialised_from")


def drop_run_record(raw: dict) -> None:
    """Take the run-record keys out of a config dict loaded from a run's config.yaml."""
    for key in RUN_RECORD_KEYS:
        raw.pop(key, None)


def parse_train_config(raw: dict) -> TrainConfig:
    """Validate a raw config dict (from `load_config`) into a `TrainConfig`; unknown keys are errors."""
    raw = split_lightning_args(raw)
    return from_dict(TrainConfig, _check_types(TrainConfig, raw, "config"), "config")


def load_train_config(name: str, preset: str | None = None, overrides: typing.Iterable[str] = ()) -> tuple[TrainConfig, dict]:
    """(validated config, resolved raw dict as saved with the run)."""
    raw = load_config(name, preset, overrides)
    raw.setdefault("model", {})
    config = parse_train_config(raw)
    return config, dataclasses.asdict(config)


def option_help(defaults: Any, current: Any | None = None, prefix: str = "") -> list[tuple[str, str, str]]:
    """(option, default, value in the chosen config) for every leaf field, from the dataclasses."""
    rows = []
    for f in dataclasses.fields(defaults):
        if prefix == "" and f.name in ("name", "preset"):
            continue
        d = getattr(defaults, f.name)
        c = getattr(current, f.name) if current is not None else None
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(d):
            rows.extend(option_help(d, c, key + "."))
        else:
            rows.append((key, repr(d), "" if current is None else repr(c)))
    return rows
