"""Token export throughput: `neurocodec export` of real speech with the default-size grvq_4cb on 2 CPU threads.

The figure is x real time of the whole export (audio loading, batching, encoding, Parquet writing) through
the same Lightning predict loop the CLI runs; the model is loaded once beforehand (its load time is
printed, not counted). Measured in the same run for comparison:
  * the bare `codec.encode` of the same audio, in batches (the ceiling for the export pipeline);
  * the reference Encodec 24 kHz model (random weights, `encodec` package) encoding the same audio;
  * cheap knobs: export batch size, and the cost of exact (float64) encoding vs float32 on bare encode.

    python bench/export_speed.py [--quick] [--threads 2]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, arg_parser, figure, write_result  # noqa: E402

import torch  # noqa: E402

from neurocodec.audio import load_audio  # noqa: E402
from neurocodec.codecs.checkpoint import load_codec  # noqa: E402
from neurocodec.data.manifest import read_manifest, write_manifest  # noqa: E402
from neurocodec.tokens.export import ExportOptions, run_export  # noqa: E402

DEMO = ROOT / "data" / "demo" / "manifest.jsonl"


def timed_export(codec, manifest: Path, out: Path, batch_size: int, workers: int,
                 encoding: str = "exact") -> tuple[float, dict]:
    start = time.perf_counter()
    info = run_export(ExportOptions(model="grvq_4cb", manifest=str(manifest), out=str(out), shard_size=1000,
                                    batch_size=batch_size, workers=workers, accelerator="cpu", devices=1,
                                    encoding=encoding), codec=codec)
    return time.perf_counter() - start, info


def bare_encode_speed(encode, wavs: list[torch.Tensor], batch_size: int, seconds: float) -> float:
    """x real time of `encode` over the clips, batched like the export (sorted by length, zero-padded)."""
    wavs = sorted(wavs, key=lambda w: w.shape[-1])
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(wavs), batch_size):
            group = wavs[i:i + batch_size]
            batch = torch.zeros(len(group), 1, max(w.shape[-1] for w in group))
            for j, w in enumerate(group):
                batch[j, 0, : w.shape[-1]] = w
            encode(batch)
    return seconds / (time.perf_counter() - start)


def main() -> None:
    parser = arg_parser(__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2: the target's 2 cores)")
    parser.add_argument("--model", default="grvq_4cb", help="model (default: the default-size grvq_4cb)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    utts = read_manifest(DEMO)
    if args.quick:
        utts = utts[:12]
    seconds = sum(u.duration for u in utts)
    t0 = time.perf_counter()
    codec = load_codec(args.model)
    load_s = time.perf_counter() - t0
    print(f"model {codec.name}: loaded in {load_s:.1f} s; corpus {len(utts)} utterances, {seconds:.1f} s of speech; "
          f"{args.threads} threads")
    wavs = [load_audio(u.path, codec.sample_rate).unsqueeze(0) for u in utts]

    batch_sizes = [16] if args.quick else [4, 16, 64]
    exports = {}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_manifest(Path(tmp) / "corpus.jsonl", utts)
        for bs in batch_sizes:
            elapsed, info = timed_export(codec, manifest, Path(tmp) / f"out-bs{bs}", bs, workers=1)
            assert info["rows"] == len(utts)
            exports[bs] = seconds / elapsed
            print(f"export batch {bs:3d}: {exports[bs]:7.1f}x real time ({elapsed:.1f} s)")
        best_bs = max(exports, key=exports.get)
        export_x = exports[best_bs]
        elapsed, info = timed_export(codec, manifest, Path(tmp) / "out-f32", best_bs, workers=1, encoding="float32")
        export_f32 = seconds / elapsed
        print(f"export --float32, batch {best_bs}: {export_f32:7.1f}x real time ({elapsed:.1f} s)")
    codec.set_exact_encoding(True)

    bare = bare_encode_speed(codec.encode, wavs, best_bs, seconds)
    print(f"bare codec.encode (batch {best_bs}, exact float64 encoding as load_codec sets it): {bare:.1f}x real time")
    codec.set_exact_encoding(False)
    bare_f32 = bare_encode_speed(codec.encode, wavs, best_bs, seconds)
    codec.set_exact_encoding(True)
    print(f"bare codec.encode in float32 (codes then depend on batch shape): {bare_f32:.1f}x real time")

    from encodec import EncodecModel

    ref = EncodecModel.encodec_model_24khz(pretrained=False).eval()
    ref_wavs = [torch.nn.functional.interpolate(w, scale_factor=1.5, mode="linear") for w in wavs]  # 24 kHz input
    ref_x = bare_encode_speed(ref.encode, ref_wavs, best_bs, seconds)
    print(f"reference Encodec 24 kHz encode (random weights, batch {best_bs}): {ref_x:.1f}x real time")
    print(f"export / Encodec encode: {export_x / ref_x:.2f}; export / bare encode: {export_x / bare:.2f}; "
          f"float32 export / exact export: {export_f32 / export_x:.2f}; "
          f"target >= 500x: {'met' if max(export_x, export_f32) >= 500 else 'NOT met'}")

    figures = [
        figure("export throughput (default grvq_4cb, whole pipeline)", export_x, "x real time",
               reference="Encodec 24 kHz encode only, random weights", reference_value=ref_x,
               target="export_throughput", batch_size=best_bs),
        figure("export vs bare codec.encode (pipeline efficiency)", export_x, "x real time",
               reference="bare codec.encode, same batches", reference_value=bare),
    ]
    figures.append(figure("export --float32 (opt-in; near-tie codes may differ from encode)", export_f32,
                          "x real time", reference="exact (float64) export, same batch size", reference_value=export_x,
                          target="export_throughput"))
    for bs, x in exports.items():
        figure_row = figure(f"export, batch size {bs}", x, "x real time", reference=f"batch size {best_bs}",
                            reference_value=export_x)
        figures.append(figure_row)
    figures.append(figure("bare encode, exact float64 (as exported)", bare, "x real time",
                          reference="bare encode in float32", reference_value=bare_f32))
    write_result("export_speed", {
        "title": "Token export throughput (2 CPU cores)",
        "figures": figures,
        "params": {"model": codec.name, "threads": args.threads, "utterances": len(utts), "audio_seconds": seconds,
                   "batch_sizes": batch_sizes, "workers": 1, "model_load_seconds": load_s},
        "notes": "Whole `neurocodec export` pipeline (Lightning predict loop, 1 audio-loading worker, Parquet "
                 "writer) on the demo corpus; model loaded once beforehand. Exact (float64) encoding is what "
                 "makes codes independent of batching and chunking.",
    }, quick=args.quick)


if __name__ == "__main__":
    main()
