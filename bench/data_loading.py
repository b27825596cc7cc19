"""Training-data loading speed: `AudioSegmentDataset` crops vs reading each whole file and cropping.

The dataset reads only the frames a crop needs (`soundfile.read(start=, frames=)`); the reference is the
naive loader (`neurocodec.audio.load_audio` of the whole file, then a random crop). Both run in one process
on one thread over the same long FLAC files (demo-corpus speech joined into minutes-long files, one at
44.1 kHz so resampling is in the path too). Figure: seconds of training audio produced per second.

    python bench/data_loading.py [--quick]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, arg_parser, figure, write_result  # noqa: E402

import numpy as np  # noqa: E402
import soundfile as sf  # noqa: E402
import torch  # noqa: E402

from neurocodec.audio import load_audio  # noqa: E402
from neurocodec.data.dataset import AudioSegmentDataset  # noqa: E402
from neurocodec.data.manifest import read_manifest  # noqa: E402


def make_corpus(folder: Path, n_files: int, seconds: float) -> Path:
    clips = [sf.read(u.path, dtype="float32")[0] for u in read_manifest(ROOT / "data/demo/manifest.jsonl")]
    speech = np.concatenate(clips)
    rows = []
    for k in range(n_files):
        sr = 44100 if k == 0 else 16000
        n = int(seconds * 16000)
        start = (k * 7919 * 16) % max(1, len(speech) - n)
        x = np.resize(speech[start:], n)  # wraps round when the demo is shorter than a file
        if sr != 16000:
            x = np.interp(np.arange(int(seconds * sr)) * 16000 / sr, np.arange(n), x).astype(np.float32)
        path = folder / f"long_{k}.flac"
        sf.write(path, x, sr, subtype="PCM_16")
        rows.append({"path": path.name})
    manifest = folder / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def naive_item(files: list[str], segment: int, rng: np.random.Generator) -> torch.Tensor:
    wav = load_audio(files[rng.integers(len(files))], 16000)
    start = int(rng.integers(0, max(1, wav.shape[-1] - segment + 1)))
    x = wav[:, start:start + segment]
    return x / x.abs().max().clamp_min(1e-5) * 0.5


def main() -> None:
    args = arg_parser(__doc__.splitlines()[0]).parse_args()
    torch.set_num_threads(1)
    n_files, file_seconds, items, segment_s = (3, 20.0, 40, 1.0) if args.quick else (8, 120.0, 400, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = make_corpus(Path(tmp), n_files, file_seconds)
        ds = AudioSegmentDataset(manifest, 16000, segment_s, frame_size=320, length=items)
        files = [f.path for f in ds.files]
        rng = np.random.default_rng(0)
        ds[0], naive_item(files, ds.segment_samples, rng)  # warm-up (resampler kernels, file cache)

        t0 = time.perf_counter()
        for i in range(items):
            ds[i]
        ours = items * segment_s / (time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(items):
            naive_item(files, ds.segment_samples, rng)
        naive = items * segment_s / (time.perf_counter() - t0)

    print(f"AudioSegmentDataset: {ours:9.1f} s of audio per s;  whole-file reads: {naive:9.1f} s/s;  "
          f"ratio {ours / naive:.1f}x  ({n_files} files of {file_seconds:g} s, {items} crops of {segment_s:g} s)")
    write_result("data_loading", {
        "title": "Training data loading (one CPU thread)",
        "figures": [figure("train crops produced", ours, "s audio / s", reference="whole-file read + crop",
                           reference_value=naive)],
        "params": {"files": n_files, "file_seconds": file_seconds, "crops": items, "segment_seconds": segment_s,
                   "threads": 1, "formats": "FLAC 16 kHz, one at 44.1 kHz"},
    })


if __name__ == "__main__":
    main()
