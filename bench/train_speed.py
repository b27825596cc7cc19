"""Training speed: generator steps per second of the DEFAULT-size grvq_4cb (full GAN step: D step + G step).

    python bench/train_speed.py [--config grvq_4cb] [--batch 4] [--segment 1.0] [--steps 10] [--warmup 2]
                                [--accelerator cpu] [--precision 32-true | bf16-mixed] [--threads N]

Runs the real training path (Lightning Trainer, manual optimisation, all losses and the config's
discriminators, EMA) on a fixed batch of demo-corpus audio, timing each step after `--warmup` steps
(the first step runs k-means codebook init). In the same run it also times generator-only steps (no
discriminator: as during the `disc_start_step` warm-up) and reports the ratio, plus the training
throughput as seconds of audio per second of wall time. Figures go to docs/bench/train_speed.json.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

from common import arg_parser, figure, write_result  # noqa: E402

from neurocodec.data.dataset import AudioSegmentDataset  # noqa: E402
from neurocodec.train.datamodule import CodecDataModule  # noqa: E402
from neurocodec.train.fit import FitArgs, resolve_config, run_training  # noqa: E402


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, batch: torch.Tensor) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return 1_000_000

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batch


class FixedBatch(CodecDataModule):
    """One batch of real speech repeated: the benchmark measures the model, not the data loading."""

    def train_dataloader(self):
        manifest = REPO / self.config.manifest
        ds = AudioSegmentDataset(manifest, self.sample_rate, self.config.segment_seconds, split=self.config.train_split,
                                 train=False, frame_size=self.frame_size, length=self.config.batch_size)
        items = [ds[i % len(ds)] for i in range(self.config.batch_size)]
        return torch.utils.data.DataLoader(_Repeat(torch.stack(items)), batch_size=None, num_workers=0)


class StepTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - self._t0)


def measure(args, gan: bool) -> dict:
    overrides = [f"data.batch_size={args.batch}", f"data.segment_seconds={args.segment}", "data.num_workers=0",
                 f"trainer.max_steps={args.steps + args.warmup}", "trainer.val_every=1000000",
                 "trainer.enable_progress_bar=false", f"trainer.accelerator={args.accelerator}",
                 f"trainer.precision={args.precision}", "optim.disc_start_step=0"]
    if not gan:
        overrides.append("disc.kinds=[]")
    cfg = resolve_config(FitArgs(config=args.config, overrides=overrides))
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        data = FixedBatch(cfg.data, cfg.model.sample_rate, cfg.model.seanet.hop_length)
        run_training(cfg, Path(tmp) / "run", datamodule=data, extra_callbacks=[timer], loggers=False)
    times = timer.times[args.warmup:]
    step = statistics.median(times)
    return {"steps_timed": len(times), "median_step_s": step, "steps_per_s": 1.0 / step,
            "audio_s_per_s": args.batch * args.segment / step, "disc": list(cfg.disc.kinds) if gan else []}


def main() -> None:
    p = arg_parser(__doc__.splitlines()[0])
    p.add_argument("--config", default="grvq_4cb")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--segment", type=float, default=1.0, help="seconds per training crop")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--accelerator", default="cpu")
    p.add_argument("--precision", default="32-true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args()
    if args.quick:
        args.batch, args.segment, args.steps, args.warmup = 2, 0.5, 2, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    gan = measure(args, gan=True)
    gen_only = measure(args, gan=False)
    setting = f"batch {args.batch} x {args.segment:g} s, {args.accelerator}, {args.precision}"
    figures = [
        figure(f"generator steps/s, full GAN step ({', '.join(gan['disc'])})", gan["steps_per_s"], "steps/s",
               reference="generator-only step (no discriminator), same run", reference_value=gen_only["steps_per_s"],
               setting=setting),
        figure("training throughput, full GAN step", gan["audio_s_per_s"], "s of audio per s", setting=setting),
    ]
    print(f"{args.config} (default size), {setting}, {torch.get_num_threads()} threads:")
    for row in figures:
        print(f"  {row['metric']}: {row['value']:.3f} {row['unit']}")
    print(f"  generator-only step: {gen_only['steps_per_s']:.3f} steps/s")
    write_result("train_speed", {
        "title": "Training speed, default-size grvq_4cb (issue 3)",
        "figures": figures,
        "params": {"config": args.config, "size": "default (no preset)", "batch": args.batch,
                   "segment_seconds": args.segment, "accelerator": args.accelerator, "precision": args.precision,
                   "torch_threads": torch.get_num_threads(),
                   "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "gan_step": gan, "generator_only_step": gen_only,
    }, quick=args.quick)


if __name__ == "__main__":
    main()
