"""Semanticodec speed on one CPU thread: the three token rates vs the default grvq_4cb, plus the teacher's cost.

Ours: `semanticodec` (100 tokens/s, 50 Hz), `semanticodec_50tps` (25 Hz) and `semanticodec_25tps` (12.5 Hz)
at their real size, encode + decode offline on the whole clip and through the streaming path one frame at a
time. Reference, measured in the same run and the same way: the default model `grvq_4cb`. Semanticodec runs
two encoders (the causal student that predicts the semantic token, with a transformer, and the acoustic
encoder), so it costs more than grvq_4cb per second of audio; the slower frame rates have fewer frames but
deeper encoders (one more downsampling stage).

Also: the semantic teacher used in training only (HuBERT-base size, random weights; nothing is downloaded),
features of the same audio, x real time — what each training step pays on top of the codec.
Speeds are x real time (audio seconds per wall-clock second), median of repeats. Weights are the seeded
initialisation (no k-means warm start): speed does not depend on the values.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from codec_speed import demo_audio, streaming_round_trip  # noqa: E402
from common import arg_parser, figure, timed, write_result  # noqa: E402

from neurocodec.codecs.checkpoint import build_codec, prepare_for_inference  # noqa: E402
from neurocodec.config import load_config  # noqa: E402

CONFIGS = ["semanticodec", "semanticodec_50tps", "semanticodec_25tps"]


def codec_of(name: str):
    return prepare_for_inference(build_codec(load_config(name)["model"], name=name))


@torch.no_grad()
def speeds(codec, wav: torch.Tensor, repeats: int) -> dict:
    seconds = wav.shape[-1] / codec.sample_rate
    codec.decode(codec.encode(wav[..., : 4 * codec.frame_size]))  # warm-up
    out = {"offline": seconds / timed(lambda: codec.decode(codec.encode(wav)), repeats)}
    streaming_round_trip(codec, wav[..., : 4 * codec.frame_size], 1)
    out["stream"] = seconds / timed(lambda: streaming_round_trip(codec, wav, 1), repeats)
    return out


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--no-teacher", action="store_true", help="skip the teacher timing")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seconds, repeats = (2.0, 1) if args.quick else (10.0, 3)
    wav = demo_audio(seconds)
    seconds = wav.shape[-1] / 16000

    reference = speeds(codec_of("grvq_4cb"), wav, repeats)
    figures, params = [], {}
    for name in CONFIGS:
        codec = codec_of(name)
        info = codec.info()
        s = speeds(codec, wav, repeats)
        label = f"{name} ({info['tokens_per_second']:g} tokens/s, {info['bitrate_bps'] / 1000:.2f} kbps)"
        figures.append(figure(f"{label}: encode+decode, offline", s["offline"], "x real time",
                              reference="grvq_4cb, offline", reference_value=reference["offline"]))
        figures.append(figure(f"{label}: encode+decode, streaming 1 frame ({1000 * codec.frame_size / 16000:g} ms)",
                              s["stream"], "x real time", reference="grvq_4cb, streaming 1 frame (20 ms)",
                              reference_value=reference["stream"]))
        params[name] = {"parameters": info["parameters"], "frame_rate": info["frame_rate"],
                        "latency_ms": info["algorithmic_latency_ms"]}
    if not args.no_teacher:
        from neurocodec.codecs.teacher import build_teacher

        # HuBERT-base shape (transformers' defaults), random weights
        teacher = build_teacher({"kind": "hubert", "tiny": {}, "layer": 9})
        teacher.features(wav[..., :16000], 50.0)
        t = seconds / timed(lambda: teacher.features(wav, 50.0), repeats)
        figures.append(figure("teacher features (HuBERT-base size, layer 9), training only", t, "x real time",
                              reference="semanticodec encode+decode, offline",
                              reference_value=next(f["value"] for f in figures if f["metric"].startswith("semanticodec (")
                                                   and f["metric"].endswith("offline"))))
    for row in figures:
        ratio = f"  ({row['ratio']:.2f}x the reference)" if row.get("ratio") else ""
        print(f"{row['metric']:<95} {row['value']:8.1f} {row['unit']}{ratio}")
    write_result("semantic_speed", {
        "title": "Semanticodec speed, single stream, one CPU thread (issue 7)",
        "figures": figures,
        "params": {"threads": 1, "audio_seconds": round(seconds, 2), "repeats": repeats, "models": params},
        "notes": "Exact (float64) encoding as served. Streaming = encode_step + decode_step per frame, batch 1.",
    }, quick=args.quick)


if __name__ == "__main__":
    main()
