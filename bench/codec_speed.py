"""Single-stream codec speed on one CPU thread: neurocodec's default model vs Encodec's reference code.

Ours: the default-size `grvq_4cb` (16 kHz, 50 frames/s, 2 kbps), encode + decode through the streaming
path with chunks of 1 frame (20 ms, the latency the model is built for) and of 5 frames (100 ms), and
offline on the whole clip. Reference, measured in the same run: Encodec's `encodec` package (24 kHz
model, random weights, 6 kbps), encode + decode of the same audio resampled to 24 kHz; it has no
stateful streaming, so it is timed offline (its fastest mode). Speeds are x real time (audio seconds
per wall-clock second), median of several repeats.

Also reported: what exact encoding costs (float64 encoder, which makes streaming codes bitwise equal
to offline codes; see neurocodec/codecs/model.py) against a float32 encoder.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import arg_parser, figure, timed, write_result  # noqa: E402

from neurocodec.audio import load_audio, resample  # noqa: E402
from neurocodec.codecs.checkpoint import load_codec  # noqa: E402
from neurocodec.data.manifest import read_manifest  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def demo_audio(seconds: float) -> torch.Tensor:
    """Real speech from the demo corpus, concatenated to `seconds` (16 kHz, [1, 1, N])."""
    pieces, total = [], 0
    for utt in read_manifest(ROOT / "data/demo/manifest.jsonl"):
        wav = load_audio(utt.path, 16000)
        pieces.append(wav)
        total += wav.shape[-1]
        if total >= seconds * 16000:
            break
    return torch.cat(pieces, dim=-1)[..., : int(seconds * 16000)].unsqueeze(0)


@torch.no_grad()
def streaming_round_trip(codec, wav: torch.Tensor, frames_per_chunk: int) -> None:
    step = codec.frame_size * frames_per_chunk
    with codec.streaming(1):
        for start in range(0, wav.shape[-1], step):
            codec.decode_step(codec.encode_step(wav[..., start:start + step]))


def onnx_streaming_speeds(codec, wav: torch.Tensor, repeats: int) -> dict[str, float]:
    """x real time of the same streaming round trip through `neurocodec export-onnx` graphs in ONNX Runtime
    (one thread): for one stream (a static batch-1 graph) with 1- and 5-frame steps."""
    import tempfile

    from neurocodec.codecs.onnx_streaming import OnnxStreamingCodec, export_streaming_onnx

    audio, speeds = wav.numpy(), {}
    for frames in (1, 5):
        with tempfile.TemporaryDirectory() as folder:
            export_streaming_onnx(codec, folder, frames_per_step=frames, batch_size=1)
            onnx = OnnxStreamingCodec(folder, threads=1)
            step = frames * onnx.frame_size
            usable = audio[..., : audio.shape[-1] // step * step]

            def round_trip() -> None:
                with onnx.streaming(1):
                    for start in range(0, usable.shape[-1], step):
                        onnx.decode_step(onnx.encode_step(usable[..., start:start + step]))

            round_trip()  # warm-up
            speeds[f"onnx{frames}"] = usable.shape[-1] / 16000 / timed(round_trip, repeats)
    return speeds


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--model", default="grvq_4cb",
                        help="model to time (default: the full-size grvq_4cb config; `default` = the shipped model, "
                             "written to docs/bench/codec_speed_default.json)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    seconds, repeats = (3.0, 1) if args.quick else (20.0, 3)
    wav = demo_audio(seconds)
    seconds = wav.shape[-1] / 16000

    codec = load_codec(args.model)
    info = codec.info()
    speed = {}
    for frames in (1, 5):
        streaming_round_trip(codec, wav[..., :3200], frames)  # warm-up
        speed[f"stream{frames}"] = seconds / timed(lambda: streaming_round_trip(codec, wav, frames), repeats)
    speed.update(onnx_streaming_speeds(codec, wav, repeats))
    with torch.no_grad():
        codec.decode(codec.encode(wav))
        speed["offline"] = seconds / timed(lambda: codec.decode(codec.encode(wav)), repeats)
        encode_exact = seconds / timed(lambda: codec.encode(wav), repeats)
        codec.set_exact_encoding(False)
        encode_f32 = seconds / timed(lambda: codec.encode(wav), repeats)
        codec.set_exact_encoding(True)

    from encodec import EncodecModel

    torch.manual_seed(0)
    reference = EncodecModel.encodec_model_24khz(pretrained=False)  # random weights: nothing is downloaded
    reference.set_target_bandwidth(6.0)
    reference.eval()
    wav24 = resample(wav[0], 16000, 24000).unsqueeze(0)
    with torch.no_grad():
        reference.decode(reference.encode(wav24[..., :24000]))
        ref_speed = seconds / timed(lambda: reference.decode(reference.encode(wav24)), repeats)
    ref_params = sum(p.numel() for p in reference.parameters())

    ref_name = "Encodec 24 kHz 6 kbps (reference code, random weights), offline"
    figures = [
        figure("encode+decode, streaming, 20 ms chunks (1 frame)", speed["stream1"], "x real time",
               reference=ref_name, reference_value=ref_speed, target="single_stream_speed"),
        figure("encode+decode, streaming, 100 ms chunks (5 frames)", speed["stream5"], "x real time",
               reference=ref_name, reference_value=ref_speed, target="single_stream_speed"),
        figure("encode+decode, streaming in ONNX Runtime, 20 ms chunks (1 frame)", speed["onnx1"], "x real time",
               reference=ref_name, reference_value=ref_speed, target="single_stream_speed"),
        figure("encode+decode, streaming in ONNX Runtime, 100 ms chunks (5 frames)", speed["onnx5"], "x real time",
               reference=ref_name, reference_value=ref_speed, target="single_stream_speed"),
        figure("encode+decode, offline (whole clip)", speed["offline"], "x real time",
               reference=ref_name, reference_value=ref_speed, target="single_stream_speed"),
        figure("encode only, exact (float64 encoder)", encode_exact, "x real time",
               reference="encode only, float32 encoder (codes may depend on chunking)", reference_value=encode_f32),
        figure("algorithmic latency", info["algorithmic_latency_ms"], "ms", target="algorithmic_latency",
               higher_is_better=False),
    ]
    for row in figures:
        ratio = f"  ({row['ratio']:.2f}x the reference)" if row.get("ratio") else ""
        print(f"{row['metric']:<68} {row['value']:8.1f} {row['unit']}{ratio}")
    print(f"reference {ref_name}: {ref_speed:.1f}x real time, {ref_params / 1e6:.1f} M parameters")
    shipped = args.model == "default"
    write_result("codec_speed_default" if shipped else "codec_speed", {
        "title": ("Codec speed of the shipped default model (issue 8)" if shipped
                  else "Codec speed, single stream, one CPU thread (issue 2)"),
        "figures": figures,
        "params": {"threads": 1, "audio_seconds": round(seconds, 2), "repeats": repeats,
                   "model": "shipped default model (grvq_4cb, tiny network size)" if shipped
                   else f"{args.model} (config-only weights)", "model_parameters": info["parameters"],
                   "model_bitrate_kbps": info["bitrate_bps"] / 1000, "reference_parameters": ref_params},
        "notes": "Audio: real speech from data/demo. Streaming = encode_step + decode_step per chunk in one "
                 "session (batch 1); the served case batches many sessions per step (see serve_latency). "
                 "ONNX Runtime rows: the same steps exported by `neurocodec export-onnx --batch-size 1` "
                 "(float32 encoder; see neurocodec/codecs/onnx_streaming.py).",
    }, quick=args.quick)


if __name__ == "__main__":
    main()
