"""`neurocodec eval` for image codecs: PSNR, SSIM, MS-SSIM and bits per pixel, against JPEG and WebP (Pillow).

For every image and every number of codebooks K that is evaluated, our bpp is
`sum_k log2(cardinality_k) * ceil(H/f) * ceil(W/f) / (H * W)` (raw token indices, no entropy coding).
Each baseline is then run at a MATCHED rate: the highest quality setting whose file is not larger than
ours (whole file, headers included: that is what a user stores), found by bisection over Pillow's
quality 1..100; if even quality 1 is larger, quality 1 is used and its (higher) bpp is reported. Besides
the matched points, each baseline is swept over a range of qualities to draw its rate-distortion curve.

All scores are computed on 8-bit images (what the PNG/JPEG/WebP files hold) against the 8-bit original:
PSNR over the RGB pixels with data range 255, SSIM and MS-SSIM from torchmetrics (`metrics.py`).
"""

from __future__ import annotations

import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from .io import list_images, load_image_uint8, to_tensor
from .metrics import ms_ssim, ms_ssim_scales, psnr, ssim

BASELINES = ("jpeg", "webp")
SWEEP = (2, 5, 10, 15, 20, 30, 40, 50, 60, 70, 80, 90, 95)
BPP_NOTE = "ours: sum_k log2(cardinality_k) x ceil(H/f) x ceil(W/f) / (H x W), raw indices; JPEG/WebP: file bytes x 8 / pixels"


def parse_image_baselines(text: str | None) -> list[str]:
    if not text or text.strip().lower() == "none":
        return []
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    bad = [n for n in names if n not in BASELINES]
    if bad:
        raise UserError(f"--baselines: {', '.join(bad)} not available for images; choose from {', '.join(BASELINES)} or none")
    return names


def codec_file(arr: np.ndarray, kind: str, quality: int) -> tuple[np.ndarray, int]:
    """(decoded uint8 image, file size in bytes) of `arr` [H, W, 3] through Pillow's JPEG or WebP encoder."""
    from PIL import Image

    buf = io.BytesIO()
    im = Image.fromarray(arr)
    if kind == "jpeg":
        im.save(buf, format="JPEG", quality=int(quality))  # libjpeg defaults: 4:2:0 chroma, optimised Huffman off
    else:
        im.save(buf, format="WEBP", quality=int(quality), method=6)
    size = buf.tell()
    buf.seek(0)
    with Image.open(buf) as decoded:
        return np.asarray(decoded.convert("RGB")), size


def matched_quality(arr: np.ndarray, kind: str, target_bpp: float) -> tuple[int, np.ndarray, float]:
    """Highest quality in 1..100 whose bpp <= target (quality 1 if none): (quality, decoded, bpp)."""
    pixels = arr.shape[0] * arr.shape[1]
    cache: dict[int, tuple[np.ndarray, float]] = {}

    def at(q: int) -> tuple[np.ndarray, float]:
        if q not in cache:
            dec, size = codec_file(arr, kind, q)
            cache[q] = (dec, size * 8 / pixels)
        return cache[q]

    lo, hi = 1, 100
    if at(1)[1] > target_bpp:
        return 1, *at(1)
    while lo < hi:  # largest q with bpp(q) <= target; file size grows (almost) monotonically with quality
        mid = (lo + hi + 1) // 2
        if at(mid)[1] <= target_bpp:
            lo = mid
        else:
            hi = mid - 1
    return lo, *at(lo)


def scores(ref: torch.Tensor, deg: torch.Tensor) -> dict[str, float]:
    """ref, deg: [3, H, W] in [0, 1] (8-bit values)."""
    r, d = ref.unsqueeze(0), deg.unsqueeze(0)
    return {"psnr": float(psnr(d, r)[0]), "ssim": float(ssim(d, r)), "ms_ssim": float(ms_ssim(d, r))}


def summarize(values: list[float]) -> dict:
    v = np.asarray(values, dtype=np.float64)
    if len(v) == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0, "n": int(len(v))}


@dataclass
class ImageEvalResult:
    payload: dict
    examples: list[dict]  # first image: original and decoded versions (uint8 arrays) for the figure


def evaluate_images(codec, paths: list[Path], ks: list[int] | None, baselines: list[str], model_spec: str,
                    progress: bool = True, sweep: tuple[int, ...] = SWEEP) -> ImageEvalResult:
    from tqdm import tqdm

    ks = ks or codec.allowed_num_codebooks()
    for k in ks:
        if k not in codec.allowed_num_codebooks():
            raise UserError(f"--num-codebooks {k}: model takes {codec.allowed_num_codebooks()}")
    per_system: dict[str, dict] = {}
    curves: dict[str, dict[int, dict[str, list[float]]]] = {b: {q: {"bpp": [], "psnr": [], "ms_ssim": [], "ssim": []}
                                                                 for q in sweep} for b in baselines}
    errors, images_meta, examples = [], [], []
    t0 = time.time()

    def add(system: str, kind: str, k: int | None, row: dict) -> None:
        entry = per_system.setdefault(system, {"system": system, "kind": kind, "num_codebooks": k, "rows": []})
        entry["rows"].append(row)

    for index, path in enumerate(tqdm(paths, desc="images", disable=not progress, file=sys.stderr)):
        try:
            arr = load_image_uint8(path)
        except UserError as err:
            errors.append({"image": str(path), "error": str(err)})
            continue
        h, w = arr.shape[:2]
        ref = to_tensor(arr)
        images_meta.append({"image": str(path), "width": w, "height": h, "ms_ssim_scales": ms_ssim_scales(h, w)})
        example = {"image": str(path), "original": arr, "decoded": {}} if index == 0 else None
        for k in ks:
            codec.set_num_codebooks(k)
            with torch.no_grad():
                out = codec.decode(codec.encode(ref.unsqueeze(0)))[0, :, :h, :w]
            dec = to_tensor((out.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())
            bpp = codec.bpp(h, w)
            add(f"ours K={k}", "model", k, {"image": path.name, "bpp": bpp, **scores(ref, dec)})
            if example is not None:
                example["decoded"][f"ours K={k}"] = ((dec.permute(1, 2, 0) * 255).round().byte().numpy(), bpp)
            for b in baselines:
                q, decoded, b_bpp = matched_quality(arr, b, bpp)
                add(f"{b} @ours K={k}", b, k, {"image": path.name, "bpp": b_bpp, "quality": q,
                                                 **scores(ref, to_tensor(decoded))})
                if example is not None:
                    example["decoded"][f"{b.upper()} q={q} @K={k}"] = (decoded, b_bpp)
        for b in baselines:
            for q in sweep:
                decoded, size = codec_file(arr, b, q)
                s = scores(ref, to_tensor(decoded))
                c = curves[b][q]
                c["bpp"].append(size * 8 / (h * w))
                for name in ("psnr", "ssim", "ms_ssim"):
                    c[name].append(s[name])
        if example is not None:
            examples.append(example)
    codec.set_num_codebooks(max(ks))

    systems = []
    for entry in per_system.values():
        rows = entry.pop("rows")
        entry.update({name: summarize([r[name] for r in rows]) for name in ("bpp", "psnr", "ssim", "ms_ssim")})
        if entry["kind"] != "model":
            entry["quality"] = [r["quality"] for r in rows]
        entry["per_image"] = rows
        systems.append(entry)
    curve_rows = {b: [{"quality": q, **{m: float(np.mean(v)) for m, v in c.items() if v}} for q, c in qs.items()
                      if c["bpp"]] for b, qs in curves.items()}
    from ..codecs.checkpoint import read_metadata

    trained = str(model_spec).endswith(".safetensors")
    meta = {}
    if trained:
        try:
            meta = read_metadata(model_spec)
        except Exception:  # noqa: BLE001 (metadata is informative only)
            meta = {}
    payload = {
        "model": {"spec": str(model_spec), "name": codec.name, "trained": trained, "gen_step": meta.get("gen_step"),
                  "info": codec.info()},
        "data": {"images": images_meta, "n_scored": len(images_meta)},
        "scoring": {"bpp_note": BPP_NOTE, "scores": "8-bit RGB; PSNR data range 255; SSIM/MS-SSIM from torchmetrics "
                                                    "(11-px Gaussian window; MS-SSIM with as many of the 5 standard scales as fit)",
                    "matching": "baseline quality = highest Pillow quality (1..100) whose file is not larger than our bits",
                    "seconds": round(time.time() - t0, 1)},
        "systems": systems,
        "curves": curve_rows,
        "errors": errors,
    }
    return ImageEvalResult(payload, examples)


def results_table(payload: dict) -> str:
    header = f"{'system':<22} {'bpp':>8} {'PSNR dB':>8} {'SSIM':>7} {'MS-SSIM':>8}  quality"
    lines = [header, "-" * len(header)]
    order = sorted(payload["systems"], key=lambda s: (s["num_codebooks"] or 0, s["kind"] != "model", s["kind"]))
    for s in order:
        q = ""
        if s.get("quality"):
            q = ",".join(map(str, s["quality"]))
        lines.append(f"{s['system']:<22} {s['bpp']['mean']:>8.4f} {s['psnr']['mean']:>8.2f} {s['ssim']['mean']:>7.4f} "
                     f"{s['ms_ssim']['mean']:>8.4f}  {q}")
    return "\n".join(lines)


STYLE = {"model": ("tab:blue", "o", "ours"), "jpeg": ("tab:orange", "s", "JPEG (Pillow)"),
         "webp": ("tab:green", "^", "WebP (Pillow)")}


def plot_rd(payload: dict, path: str | Path) -> Path:
    """PSNR and MS-SSIM against bpp: baseline sweeps as lines, matched baseline points hollow, ours filled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.3), dpi=120)
    ours = sorted((s for s in payload["systems"] if s["kind"] == "model"), key=lambda s: s["bpp"]["mean"])
    xmax = max([s["bpp"]["mean"] for s in payload["systems"]] + [0.1]) * 1.6
    for ax, metric, label in ((axes[0], "psnr", "PSNR (dB)"), (axes[1], "ms_ssim", "MS-SSIM")):
        for kind, rows in payload["curves"].items():
            color, marker, name = STYLE[kind]
            pts = [r for r in rows if r["bpp"] <= xmax]
            ax.plot([r["bpp"] for r in pts], [r[metric] for r in pts], color=color, linewidth=1.2, alpha=0.8,
                    label=f"{name}, quality sweep")
            matched = sorted((s for s in payload["systems"] if s["kind"] == kind), key=lambda s: s["bpp"]["mean"])
            ax.plot([s["bpp"]["mean"] for s in matched], [s[metric]["mean"] for s in matched], linestyle="none",
                    marker=marker, markerfacecolor="none", markeredgecolor=color, markersize=8,
                    label=f"{name} at our rate")
        color, marker, name = STYLE["model"]
        ax.plot([s["bpp"]["mean"] for s in ours], [s[metric]["mean"] for s in ours], color=color, marker=marker,
                markersize=8, linewidth=2, label=f"ours ({payload['model']['name']})")
        for s in ours:
            ax.annotate(f"K={s['num_codebooks']}", (s["bpp"]["mean"], s[metric]["mean"]), textcoords="offset points",
                        xytext=(5, -12), fontsize=8, color=color)
        ax.set_xlim(0, xmax)
        ax.set_xlabel("bits per pixel")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")
    n = payload["data"]["n_scored"]
    title = f"Rate-distortion on {n} image{'s' if n != 1 else ''}; ours = raw token bits (no entropy coding)"
    if not payload["model"]["trained"]:
        title += " — UNTRAINED model"
    elif payload["model"].get("gen_step"):
        title += f"; {payload['model']['gen_step']} training steps"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_examples(example: dict, path: str | Path, crop: int = 192) -> Path:
    """Centre crops of the first image: original, ours at each K, and the matched JPEG/WebP versions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arr = example["original"]
    h, w = arr.shape[:2]
    c = min(crop, h, w)
    y, x = (h - c) // 2, (w - c) // 2
    decoded = [(name, img, bpp) for name, (img, bpp) in example["decoded"].items()]
    per_k = 1 + sum(1 for name, _, _ in decoded if name.endswith("@K=1"))  # ours + its matched baselines
    rows = -(-len(decoded) // per_k)
    panels = []
    for r in range(rows):  # one row per K: original, ours, JPEG, WebP at our rate
        panels += [("original", arr, None)] + decoded[r * per_k:(r + 1) * per_k]
    cols = per_k + 1
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.8 * rows), dpi=110, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, img, bpp) in zip(axes.flat, panels):
        ax.imshow(img[y:y + c, x:x + c], interpolation="nearest")
        ax.set_title(name + (f"\n{bpp:.3f} bpp" if bpp is not None else "\n(8-bit original)"), fontsize=8)
    fig.suptitle(f"{Path(example['image']).name}: centre {c}x{c} crop", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_report(result: ImageEvalResult, folder: str | Path, title: str | None, command: str,
                 plots: bool = True) -> dict[str, Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    payload = result.payload
    paths = {"json": folder / "results.json"}
    paths["json"].write_text(json.dumps(payload, indent=2))
    if plots:
        paths["rd"] = plot_rd(payload, folder / "rd.png")
        if result.examples:
            paths["examples"] = plot_examples(result.examples[0], folder / "examples.png")
    m = payload["model"]
    lines = [f"# {title or 'Image codec evaluation'}", "",
             f"Model `{m['spec']}` ({m['name']}; {'trained, ' + str(m.get('gen_step')) + ' steps' if m['trained'] else 'UNTRAINED: random weights'}), "
             f"{payload['data']['n_scored']} images: " + ", ".join(
                 f"{Path(i['image']).name} {i['width']}x{i['height']}" for i in payload["data"]["images"]) + ".", "",
             f"Command: `{command}`", "",
             "```", results_table(payload), "```", "",
             f"Means over images. bpp: {BPP_NOTE}. {payload['scoring']['matching']}; the quality column lists it per image. "
             f"{payload['scoring']['scores']}.", ""]
    if "rd" in paths:
        lines += ["![rate-distortion](rd.png)", ""]
    if "examples" in paths:
        lines += ["![examples](examples.png)", ""]
    paths["markdown"] = folder / "report.md"
    paths["markdown"].write_text("\n".join(lines))
    return paths


def find_images(data: str, split: str | None, max_images: int | None) -> list[Path]:
    folder = Path(data) / split if split else Path(data)
    if split and not folder.is_dir():
        raise UserError(f"--split {split}: {folder} is not a folder")
    paths = list_images(folder)
    if not paths:
        raise UserError(f"{folder}: no image files (.png, .jpg, .webp, ...)")
    return paths[:max_images] if max_images else paths


def cmd_eval_image(args, ks: list[int] | None, default_baselines: str) -> int:
    """`neurocodec eval` with an image model (called from `neurocodec.eval.commands`)."""
    from ..codecs.checkpoint import load_codec

    text = "jpeg,webp" if args.baselines == default_baselines else args.baselines
    baselines = parse_image_baselines(text)
    if args.max_clips is not None and args.max_clips < 1:
        raise UserError("--max-clips must be at least 1")
    paths = find_images(args.data, args.split, args.max_clips)
    torch.set_grad_enabled(False)
    codec = load_codec(args.model)
    print(f"evaluating {codec.name} on {len(paths)} images from {args.data}"
          + (f" with {', '.join(baselines)} at matched bpp" if baselines else ""), file=sys.stderr)
    result = evaluate_images(codec, paths, ks, baselines, args.model)
    payload = result.payload
    if not payload["model"]["trained"]:
        print("note: UNTRAINED model (random weights from the config): these scores prove the pipeline only")
    print(results_table(payload))
    print(f"(means over images; {BPP_NOTE})")
    for e in payload["errors"]:
        print(f"error: {e['image']}: {e['error']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(payload, indent=2))
        print(f"wrote {args.json}")
    if args.report:
        parts = ["neurocodec eval", "--model", str(args.model), "--data", str(args.data)]
        if args.split:
            parts += ["--split", args.split]
        if ks:
            parts += ["--num-codebooks", *map(str, ks)]
        parts += ["--baselines", text or "none"]
        if args.report:
            parts += ["--report", str(args.report)]
        paths_out = write_report(result, args.report, args.title, " ".join(parts), plots=not args.no_plots)
        print(f"wrote {paths_out['markdown']} ({', '.join(p.name for k, p in paths_out.items() if k != 'markdown')})")
    if payload["data"]["n_scored"] == 0:
        raise UserError("no image could be scored (see the errors above)")
    return 0
