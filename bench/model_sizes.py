"""What a larger default network costs: speed of grvq_4cb at several SEANet widths against the shipped size.

Issue 23 asks to pick the default model's network size for quality and speed together. Quality needs each size
trained (a GPU's work); this benchmark gives the speed side, all sizes measured in the same run on one CPU thread:

* offline encode + decode of real speech (x real time);
* the served encode step (float64, as served): one traced step of B sessions x one frame
  (codecs/traced_steps.py), in ms per frame, at B = 8 (what a 2-core server meets at ~30 streams) and B = 32.

Each size is `grvq_4cb:tiny` with `model.seanet.channels` / `model.seanet.dimension` changed (random weights: speed
does not depend on them). The reference of every ratio is the shipped size (channels 8, dimension 64).

    python bench/model_sizes.py            # channels 8/12/16/24/32 with dimension 64/128, and the full config
    python bench/model_sizes.py --quick
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_speed import demo_audio  # noqa: E402
from common import arg_parser, figure, timed, write_result  # noqa: E402

from neurocodec.codecs.checkpoint import build_codec  # noqa: E402
from neurocodec.codecs.traced_steps import SelectedStep  # noqa: E402
from neurocodec.config import load_config  # noqa: E402

SHIPPED = (8, 64)  # the default model's channels and latent dimension (grvq_4cb:tiny)


def make(channels: int, dimension: int, preset: str | None = "tiny"):
    config = load_config("grvq_4cb", preset=preset,
                         overrides=[f"model.seanet.channels={channels}", f"model.seanet.dimension={dimension}"])
    codec = build_codec(config["model"]).eval()
    codec.set_exact_encoding(True)
    return codec


@torch.no_grad()
def measure(codec, audio: torch.Tensor, repeats: int, steps: int) -> dict:
    seconds = audio.shape[-1] / codec.sample_rate
    codec.decode(codec.encode(audio))  # warm-up
    offline = seconds / timed(lambda: codec.decode(codec.encode(audio)), repeats)
    per_frame = {}
    step = SelectedStep(codec, "encode")
    with codec.encoder.streaming(64):
        for batch in (8, 32):
            x, slots = 0.1 * torch.randn(batch, 1, codec.frame_size), torch.arange(batch)
            for _ in range(3):
                step(x, slots)
            per_frame[batch] = 1000 * timed(lambda: [step(x, slots) for _ in range(steps)], repeats) / (steps * batch)
    return {"parameters": sum(p.numel() for p in codec.parameters()), "offline_x_real_time": offline,
            "served_ms_per_frame_b8": per_frame[8], "served_ms_per_frame_b32": per_frame[32]}


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    torch.set_grad_enabled(False)
    sizes = [(8, 64), (16, 64)] if args.quick else [(8, 64), (12, 64), (16, 64), (16, 128), (24, 128), (32, 128)]
    repeats, steps = (2, 5) if args.quick else (5, 30)
    audio = demo_audio(2.0 if args.quick else 10.0)
    results = {}
    for channels, dimension in sizes:
        results[f"channels {channels}, dimension {dimension}"] = measure(make(channels, dimension), audio, repeats, steps)
    if not args.quick:
        results["full config (channels 16, dimension 512)"] = measure(make(16, 512, preset=None), audio, repeats, steps)
    shipped = results[f"channels {SHIPPED[0]}, dimension {SHIPPED[1]}"]
    figures = []
    for name, r in results.items():
        print(f"{name:42s} {r['parameters']:>10,} params  offline {r['offline_x_real_time']:6.1f}x  "
              f"served step {r['served_ms_per_frame_b8']:.3f} ms/frame at B=8, {r['served_ms_per_frame_b32']:.3f} at B=32",
              flush=True)
        figures.append(figure(f"{name}: offline encode+decode", r["offline_x_real_time"], "x real time",
                              reference="shipped size (channels 8, dimension 64)",
                              reference_value=shipped["offline_x_real_time"]))
        figures.append(figure(f"{name}: served encode step at B=8", r["served_ms_per_frame_b8"], "ms per frame",
                              reference="shipped size (channels 8, dimension 64)",
                              reference_value=shipped["served_ms_per_frame_b8"], higher_is_better=False))
    write_result("model_sizes", {
        "title": "Network size of the default model: speed on one CPU thread (issue 23)",
        "figures": figures,
        "params": {"threads": 1, "audio_seconds": audio.shape[-1] / 16000, "repeats": repeats,
                   "sizes": {name: r["parameters"] for name, r in results.items()}},
        "rows": results,
        "notes": "grvq_4cb:tiny with other SEANet widths, random weights, float64 encoder as served. Served step = one "
                 "traced encode step of B sessions x 1 frame. Quality of each size needs training; see the notes of "
                 "issue 23.",
    }, quick=args.quick)


if __name__ == "__main__":
    main()
