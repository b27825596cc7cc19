"""Codebook usage against what the code says about the frame, for ways of cutting an LFQ xy_single latent.

    python scripts/xy_single_tradeoff.py --model runs/NAME/codec.safetensors --manifest M.jsonl
        [--train-split train] [--test-split test] [--train-clips 1200] [--json out.json]

Why: usage alone rewards a code that ignores the audio (a hash of the latent spreads frames evenly over the
entries and says little about them). This script freezes the trained encoder and compares ways of turning its
latent (what the quantizer sees) into one of 2^bits entries, each fitted on training frames and measured on
test frames:

* `model`: the trained LFQ code (signs of its learnt axes);
* `model_balanced_thresholds`: the same axes, each bit cut at the median of the frames with the same bits
  before it (`lfq_balance.fit_balanced_thresholds`), so the training frames spread evenly over the entries;
* `axes_whitened`: the same axes, ZCA-whitened with training statistics before the signs;
* `latent_whitened_random_axes`: the whole latent whitened, signs of `bits` random directions (a hash);
* `top{k}_whitened_random_axes`: the latent's top-k principal components whitened, signs of random directions;
* `kmeans`: the nearest of 2^bits k-means centroids of the latent (`neurocodec.codecs.kmeans`; only with at least
  2^bits training frames).

For each: `usage` on the test frames, and what the code carries, as R^2 on the test frames of the frame's
log-mel spectrum (`r2_log_mel`) and of the latent itself (`r2_latent`) predicted by the mean over training
frames that got the same entry (entries unseen in training predict the training mean).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import torchaudio
from tqdm import tqdm

from neurocodec.audio import load_audio
from neurocodec.codecs.checkpoint import load_codec
from neurocodec.codecs.kmeans import assign, fit_minibatch_kmeans
from neurocodec.codecs.lfq_balance import fit_balanced_thresholds, lfq_entries
from neurocodec.data.manifest import read_manifest


@torch.no_grad()
def latent_and_log_mel(codec, utts: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Per frame: the quantizer's input [N, D] and the log-mel spectrum of the frame's own samples [N, 40]."""
    hop = codec.frame_size
    # One window per frame, no centring: frame t's spectrum is of samples [t*hop, (t+1)*hop).
    mel = torchaudio.transforms.MelSpectrogram(codec.sample_rate, n_fft=hop, hop_length=hop, n_mels=40, center=False)
    latents, mels = [], []
    for utt in tqdm(utts, desc="clips", unit="clip", leave=False):
        wav = codec.pad_to_frames(load_audio(utt.path, codec.sample_rate).unsqueeze(0))
        latent, _ = codec.encoder_offline(codec.encoder.branches, wav.to(codec.encoder_dtype))
        latents.append(latent[0].t().double())
        mels.append((mel(wav[0, 0].float()) + 1e-7).log10().t().double())
        assert len(mels[-1]) == len(latents[-1]), f"{utt.path}: {len(mels[-1])} mel frames, {len(latents[-1])} codec frames"
    return torch.cat(latents), torch.cat(mels)


def r2_by_entry(train_ids: torch.Tensor, test_ids: torch.Tensor, train_y: torch.Tensor, test_y: torch.Tensor,
                entries: int) -> float:
    """R^2 on the test frames of y predicted by the mean y of the training frames with the same entry."""
    sums = torch.zeros(entries, train_y.shape[1], dtype=train_y.dtype).index_add_(0, train_ids, train_y)
    counts = torch.bincount(train_ids, minlength=entries).to(train_y.dtype)[:, None]
    table = torch.where(counts > 0, sums / counts.clamp_min(1), train_y.mean(dim=0))
    residual = (test_y - table[test_ids]).pow(2).sum()
    return float(1 - residual / (test_y - test_y.mean(dim=0)).pow(2).sum())


def zca(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    mean, (eigenvalues, eigenvectors) = x.mean(dim=0), torch.linalg.eigh(torch.cov(x.t()))
    return mean, eigenvectors @ torch.diag(eigenvalues.clamp_min(1e-12).rsqrt()) @ eigenvectors.t()


def compare_assignments(train: torch.Tensor, test: torch.Tensor, train_mel: torch.Tensor, test_mel: torch.Tensor,
                        project: torch.nn.Linear, kmeans_iters: int = 300, seed: int = 0) -> dict[str, dict]:
    """Usage on `test` and R^2 of mel / latent from the entry, for each way of cutting the latent (module doc)."""
    bits = project.out_features
    entries = 2 ** bits
    gen = torch.Generator().manual_seed(seed)
    random_axes = lambda d: torch.linalg.qr(torch.randn(d, bits, generator=gen, dtype=torch.float64))[0]  # noqa: E731
    weight, bias = project.weight.detach().double(), project.bias.detach().double()
    axes_train, axes_test = F.linear(train, weight, bias), F.linear(test, weight, bias)
    mean, whiten = zca(axes_train)
    thresholds = fit_balanced_thresholds(axes_train)
    ways = {"model": (lfq_entries(axes_train), lfq_entries(axes_test)),
            "model_balanced_thresholds": (lfq_entries(axes_train, thresholds), lfq_entries(axes_test, thresholds)),
            "axes_whitened": (lfq_entries((axes_train - mean) @ whiten), lfq_entries((axes_test - mean) @ whiten))}
    mean, whiten = zca(train)
    directions = whiten @ random_axes(train.shape[1])
    ways["latent_whitened_random_axes"] = (lfq_entries((train - mean) @ directions), lfq_entries((test - mean) @ directions))
    _, components = torch.linalg.eigh(torch.cov(train.t()))
    for k in (16, 32):
        if bits <= k < train.shape[1]:
            top = components[:, -k:]
            scale = ((train - mean) @ top).std(dim=0)
            directions = top / scale @ random_axes(k)
            ways[f"top{k}_whitened_random_axes"] = (lfq_entries((train - mean) @ directions),
                                                   lfq_entries((test - mean) @ directions))
    if len(train) >= entries:  # k-means needs a frame per centroid
        centroids = fit_minibatch_kmeans(train.float(), entries, iters=kmeans_iters, seed=seed)
        ways["kmeans"] = (assign(train, centroids), assign(test, centroids))
    return {name: {"usage": float(torch.bincount(test_ids, minlength=entries).gt(0).double().mean()),
                   "r2_log_mel": r2_by_entry(train_ids, test_ids, train_mel, test_mel, entries),
                   "r2_latent": r2_by_entry(train_ids, test_ids, train, test, entries)}
            for name, (train_ids, test_ids) in ways.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="xy_single checkpoint with an LFQ quantizer (.safetensors)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--train-split", default="train")
    p.add_argument("--test-split", default="test")
    p.add_argument("--train-clips", type=int, default=1200, help="random training clips the assignments are fitted on")
    p.add_argument("--kmeans-iters", type=int, default=300)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    codec = load_codec(args.model).eval()
    if codec.quantizer.config.kind != "lfq":
        raise SystemExit(f"{args.model}: needs an LFQ quantizer, found {codec.quantizer.config.kind}")
    train_utts = read_manifest(args.manifest, split=args.train_split)
    random.Random(0).shuffle(train_utts)
    train, train_mel = latent_and_log_mel(codec, train_utts[:args.train_clips])
    test, test_mel = latent_and_log_mel(codec, read_manifest(args.manifest, split=args.test_split))
    rows = compare_assignments(train, test, train_mel, test_mel, codec.quantizer.impl.project_in,
                               kmeans_iters=args.kmeans_iters)
    result = {"model": args.model, "train_frames": len(train), "test_frames": len(test), "assignments": rows}
    print(f"{'assignment':32s} {'usage':>7s} {'R2 log-mel':>11s} {'R2 latent':>10s}   "
          f"({len(test):,} test frames, fitted on {len(train):,} training frames)")
    for name, row in rows.items():
        print(f"{name:32s} {row['usage']:7.1%} {row['r2_log_mel']:11.3f} {row['r2_latent']:10.3f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
