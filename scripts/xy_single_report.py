"""Codebook usage and distillation cosine of a trained xy_single codec on a (held-out) manifest.

    python scripts/xy_single_report.py --model runs/NAME/codec.safetensors --manifest M.jsonl [--split test]
        [--config runs/NAME/config.yaml] [--max-clips N] [--json out.json] [--plot usage.png]
        [--plot-frames usage_by_frames.png]

* usage: fraction of the single codebook's entries used at least once over every frame of the set, with the
  perplexity (exp of the code entropy) — measure on a set with many more frames than entries;
* distillation cosine: mean over frames of cos(projection of the semantic branch, teacher features), the
  training objective, with the teacher of the run's config (`--config`, default: the `config.yaml` of the
  run folder that exported the checkpoint). The projection is part of the checkpoint (training only).
* LFQ codes only: the share of frames with each bit set, and the usage that independent bits with those
  same shares would reach on as many frames. The gap between that and uniform codes is the bits' imbalance;
  the gap between that and the measured usage is the dependence between bits.
* LFQ codes only, the dependence split further, from the axes LFQ takes the signs of: the usage of those same
  axes after whitening them (their means and linear correlations removed, so what still separates it from
  uniform codes is non-linear structure: frames clustered in a few directions), and the usage of a Gaussian
  with the axes' mean and covariance (all that their linear statistics would allow). These are of the signs:
  where stage 2 fitted per-prefix thresholds (`code: per-prefix thresholds`), `usage_of_plain_signs` gives the
  usage the signs of the same axes would have had.
* usage against the number of frames (frames drawn in a seeded random order, at 1/4, 1/2, 1, 2, 4, ... frames per
  entry and at all of them), next to what uniform codes would reach on as many: usage depends on the size of
  the set as much as on the codec, so compare sets and runs at equal frames (`--plot-frames` draws it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm import tqdm

from neurocodec.audio import load_audio
from neurocodec.codecs.checkpoint import load_codec, read_metadata
from neurocodec.codecs.lfq_balance import lfq_bit_weights, lfq_entries
from neurocodec.codecs.quantizers import CodebookUsage, uniform_usage
from neurocodec.codecs.teacher import build_teacher
from neurocodec.config import load_config, split_model_spec
from neurocodec.data.manifest import read_manifest
from neurocodec.eval.plots import plot_codebook_usage, plot_usage_by_frames
from neurocodec.train.config import parse_train_config, drop_run_record


@torch.no_grad()
def report(model: str, manifest: str, split: str | None, config: str | None, max_clips: int | None) -> dict:
    codec = load_codec(model)
    if config is None:
        config = str(Path(read_metadata(model)["run_dir"]) / "config.yaml")
    raw = load_config(*split_model_spec(config))
    drop_run_record(raw)
    teacher = build_teacher(parse_train_config(raw).teacher)
    utts = read_manifest(manifest, split=split)[:max_clips]
    usage = CodebookUsage(codec.quantizer.cardinalities)
    all_codes, all_axes = [], []
    cos_sum, frames, seconds = 0.0, 0, 0.0
    for utt in tqdm(utts, desc="clips", unit="clip"):
        wav = codec.pad_to_frames(load_audio(utt.path, codec.sample_rate).unsqueeze(0))
        latent, semantic = codec.encoder_offline(codec.encoder.branches, wav.to(codec.encoder_dtype))
        codes = codec.quantizer.encode(latent, 1)
        usage.update(codes)
        all_codes.append(codes.flatten())
        if codec.quantizer.config.kind == "lfq":
            all_axes.append(codec.quantizer.impl.project_in(latent.transpose(1, 2))[0].double())
        feats = teacher.features(wav, codec.frame_rate, sample_rate=codec.sample_rate, num_frames=latent.shape[-1])
        cosine = codec.distill_cosine(semantic, feats)
        cos_sum += float(cosine.sum())
        frames += cosine.numel()
        seconds += wav.shape[-1] / codec.sample_rate
    metrics = usage.compute()
    counts = usage.counts[0]
    p = counts[counts > 0] / counts.sum()
    result = {"histogram": counts.tolist(), "entropy_bits": float(-(p * p.log2()).sum()), "model": model,
              "manifest": manifest, "split": split, "clips": len(utts), "seconds": round(seconds, 1),
              "frames": frames, "entries": codec.cardinality[0],
              "usage": float(metrics["codebook0/usage"]), "perplexity": float(metrics["codebook0/perplexity"]),
              "distill_cosine": cos_sum / max(frames, 1), "teacher": teacher.kind, "teacher_dim": teacher.dim}
    result["usage_by_frames"] = usage_by_frames(torch.cat(all_codes), codec.cardinality[0])
    if codec.quantizer.config.kind == "lfq":
        result.update(bit_report(torch.cat(all_codes), codec.cardinality[0]))
        # The whitening / Gaussian figures are of the axes' signs. With fitted thresholds the code is not the signs;
        # then the signs' own usage is given too (what the same encoder used before stage 2 fitted them).
        fitted = codec.quantizer.has_fitted_thresholds
        result["code"] = "per-prefix thresholds" if fitted else "signs"
        if fitted:
            result["usage_of_plain_signs"] = sign_usage(torch.cat(all_axes))
        result.update(linear_report(torch.cat(all_axes)))
    return result


def bit_report(codes: torch.Tensor, entries: int) -> dict:
    """Share of frames with each LFQ bit set (the library's order: most significant first), and the usage
    that independent bits with those shares would reach on the same number of frames (exact expectation)."""
    n_bits = entries.bit_length() - 1
    weights = lfq_bit_weights(n_bits)
    share = ((codes[:, None] & weights) != 0).double().mean(dim=0)
    entry_bits = (torch.arange(entries)[:, None] & weights) != 0
    entry_p = torch.where(entry_bits, share, 1 - share).prod(dim=1)
    expected_usage = float((1 - (1 - entry_p).pow(codes.numel())).mean())
    return {"bit_share": [round(float(x), 3) for x in share], "usage_if_bits_independent": expected_usage,
            "usage_if_uniform": uniform_usage(codes.numel(), entries)}


def usage_by_frames(codes: torch.Tensor, entries: int, seed: int = 0) -> list[dict]:
    """Usage of the first n frames of a seeded random order of `codes`, for n = entries x 1/4, 1/2, 1, 2, 4, ...
    below len(codes), and n = len(codes); each next to the usage uniform codes would reach on n frames."""
    order = codes[torch.randperm(codes.numel(), generator=torch.Generator().manual_seed(seed))]
    sizes = [int(entries * 2.0 ** k) for k in range(-2, 40) if entries * 2.0 ** k < codes.numel()] + [codes.numel()]
    return [{"frames": n, "frames_per_entry": round(n / entries, 3),
             "usage": float(torch.bincount(order[:n], minlength=entries).gt(0).double().mean()),
             "usage_if_uniform": uniform_usage(n, entries)} for n in sizes]


def sign_usage(axes: torch.Tensor) -> float:
    """Share of the 2^d sign patterns that the rows of `axes` [N, d] fall in."""
    return float(torch.bincount(lfq_entries(axes), minlength=2 ** axes.shape[1]).gt(0).double().mean())


def linear_report(axes: torch.Tensor) -> dict:
    """How much of the bits' dependence is linear: usage of the LFQ axes [N, d] after ZCA whitening, and of
    a Gaussian sample (seeded) with the same mean and covariance, on as many frames."""
    mean, cov = axes.mean(dim=0), torch.cov(axes.t())
    eigenvalues, eigenvectors = torch.linalg.eigh(cov)
    whitened = (axes - mean) @ eigenvectors @ torch.diag(eigenvalues.clamp_min(1e-12).rsqrt()) @ eigenvectors.t()
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(axes.shape, generator=generator, dtype=torch.float64)
    gaussian = mean + noise @ torch.linalg.cholesky(cov + 1e-9 * torch.eye(len(cov), dtype=cov.dtype)).t()
    std = cov.diag().sqrt()
    correlation_eigenvalues = torch.linalg.eigvalsh(cov / std[:, None] / std[None, :])
    return {"usage_if_axes_whitened": sign_usage(whitened), "usage_if_gaussian_same_covariance": sign_usage(gaussian),
            "axes_correlation_eigenvalues": [round(float(x), 3) for x in correlation_eigenvalues]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="xy_single checkpoint (.safetensors)")
    p.add_argument("--manifest", required=True)
    p.add_argument("--split", default=None)
    p.add_argument("--config", default=None, help="training config (path or name[:preset]) with the teacher (default: the run's config.yaml)")
    p.add_argument("--max-clips", type=int, default=None)
    p.add_argument("--json", default=None, help="also write the result here")
    p.add_argument("--plot", default=None, help="also draw the codebook usage (share used, sorted frequencies) here")
    p.add_argument("--plot-frames", default=None, help="also draw usage against the number of frames (and uniform codes') here")
    p.add_argument("--overlay", nargs="*", default=[], metavar="JSON",
                   help="--json outputs of earlier reports (other runs or splits) to draw in the same --plot-frames")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = report(args.model, args.manifest, args.split, args.config, args.max_clips)
    histogram = result.pop("histogram")
    print(json.dumps(result, indent=2))
    if args.plot:
        key = f"K=1, {result['split'] or 'all'} split"
        payload = {"model": {"trained": True}, "codebooks": {key: [
            {"codebook": 0, "usage": result["usage"], "entropy_bits": result["entropy_bits"]}]}}
        plot_codebook_usage(payload, {key: [histogram]}, args.plot)
    if args.plot_frames:
        curves = {}
        for earlier in [json.loads(Path(path).read_text()) for path in args.overlay] + [result]:
            label = f"{Path(earlier['model']).parent.name or earlier['model']}, {earlier['split'] or 'all'} split"
            curves[label] = earlier["usage_by_frames"]
        plot_usage_by_frames(curves, result["entries"], args.plot_frames)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
