"""Token dataset export (issue 5): the demo corpus through `neurocodec export`, resume after a kill,
readers (pyarrow, datasets, LM sequences), `decode-tokens`, and the delay pattern."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import torch

from conftest import synthetic_speechlike
from neurocodec.cli import main as cli
from neurocodec.data.manifest import Utterance, read_manifest, write_manifest
from neurocodec.tokens import TokenDataset, delay, delay_mask, flatten, undelay, unflatten
from neurocodec.tokens.export import KILL_AFTER_ENV

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "data" / "demo" / "manifest.jsonl"
MODEL = "grvq_4cb:tiny"


# -- fixtures: one tiny codec, the demo corpus (plus a corrupt and a missing file) -----------------------------
@pytest.fixture(scope="module")
def tiny_codec():
    from neurocodec.codecs.checkpoint import load_codec

    return load_codec(MODEL)


@pytest.fixture(scope="module")
def tiny_ckpt(tiny_codec, tmp_path_factory):
    """The tiny config-only codec saved as a checkpoint: loads without the k-means warm start (fast)."""
    from neurocodec.codecs.checkpoint import save_codec

    return str(save_codec(tiny_codec, tmp_path_factory.mktemp("model") / "tiny.safetensors"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> list[Utterance]:
    """The demo corpus (real speech, with text and speakers); synthetic clips if it is not there."""
    if DEMO.is_file():
        return read_manifest(DEMO)
    folder = tmp_path_factory.mktemp("synthetic")
    utts = []
    for i in range(24):
        path = folder / f"clip{i:02d}.wav"
        seconds = 0.5 + 0.37 * (i % 7)
        sf.write(path, synthetic_speechlike(seconds, seed=i), 16000)
        utts.append(Utterance(id=f"clip{i:02d}", path=str(path), duration=seconds, text=f"clip {i}", speaker=f"s{i % 3}"))
    return utts


@pytest.fixture(scope="module")
def demo_manifest(corpus, tmp_path_factory) -> tuple[Path, list[Utterance], set[str]]:
    """A copy of the corpus manifest with a corrupt file and a missing file inserted."""
    folder = tmp_path_factory.mktemp("manifest")
    corrupt = folder / "corrupt.flac"
    corrupt.write_bytes(b"fLaC this is not really a flac file" * 10)
    utts = list(corpus)
    utts.insert(5, Utterance(id="corrupt", path=str(corrupt), text="broken"))
    utts.insert(30, Utterance(id="missing", path=str(folder / "gone.wav"), speaker="nobody"))
    path = write_manifest(folder / "manifest.jsonl", utts)
    return path, utts, {"corrupt", "missing"}


def export(model: str, manifest: Path, out: Path, *extra: str) -> int:
    return cli(["export", "--model", model, "--manifest", str(manifest), "--out", str(out), *extra])


@pytest.fixture(scope="module")
def demo_export(tiny_ckpt, demo_manifest, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokens") / "demo"
    assert export(tiny_ckpt, demo_manifest[0], out, "--shard-size", "25", "--batch-size", "8", "--workers", "1") == 0
    return out


def read_rows(folder: Path) -> list[dict]:
    info = json.loads((folder / "dataset.json").read_text())
    rows = []
    for name in info["files"]:
        rows += pq.read_table(folder / name).to_pylist()
    return rows


# -- export of the demo corpus -----------------------------------------------------------------------------------
def test_export_demo_corpus_rows_and_bad_files(demo_export, demo_manifest):
    _, utts, bad_ids = demo_manifest
    info = json.loads((demo_export / "dataset.json").read_text())
    assert info["complete"] is True
    assert info["rows"] == len(utts) - info["num_bad"]
    assert {b["id"] for b in info["bad_files"]} == bad_ids
    card = (demo_export / "README.md").read_text()
    assert "skipped (unreadable) files**: 2" in card and "`corrupt`" in card and "`missing`" in card

    rows = read_rows(demo_export)
    good = [u for u in utts if u.id not in bad_ids]
    assert [r["id"] for r in rows] == [u.id for u in good]  # manifest order, nothing lost or duplicated
    assert len(info["files"]) == math.ceil(len(utts) / 25)
    for row, utt in zip(rows, good):
        codes = np.asarray(row["codes"])
        assert codes.shape == (4, row["n_frames"]) == (row["n_codebooks"], math.ceil(row["n_samples"] / 320))
        assert codes.max() < 1024
        assert row["text"] == utt.text and row["speaker"] == utt.speaker and row["source"] == os.path.abspath(utt.path)
        assert row["duration"] == pytest.approx(utt.duration, abs=1e-3)
    assert info["hours"] == pytest.approx(sum(u.duration for u in good) / 3600, rel=1e-3)
    # codebook order and checkpoint identity are recorded
    assert [(c["layer"], c["group"]) for c in info["code_layout"]["codebooks"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert info["codec"]["config_only"] is False and len(info["codec"]["checkpoint_sha256"]) == 64


def test_row_codes_equal_cli_encode(demo_export, tiny_ckpt, tmp_path):
    """Rows were encoded in zero-padded batches; each must equal `neurocodec encode` of its file alone."""
    rows = read_rows(demo_export)
    by_len = sorted(rows, key=lambda r: r["n_samples"])
    for row in (by_len[0], by_len[len(by_len) // 2]):  # short items sat next to longer ones in their batch
        npy = tmp_path / f"{row['id']}.npy"
        assert cli(["encode", row["source"], "-o", str(npy), "--model", tiny_ckpt]) == 0
        np.testing.assert_array_equal(np.load(npy), np.asarray(row["codes"]))


def test_batching_does_not_change_codes(tiny_codec):
    """Padding a batch to its longest item leaves the shorter items' codes unchanged (causal codec)."""
    lengths = [16000, 7001, 23457, 320]
    wavs = [torch.from_numpy(synthetic_speechlike(n / 16000, seed=i)) for i, n in enumerate(lengths)]
    batch = torch.zeros(len(wavs), 1, max(lengths))
    for i, w in enumerate(wavs):
        batch[i, 0, : len(w)] = w
    with torch.inference_mode():
        codes = tiny_codec.encode(batch)
        for i, w in enumerate(wavs):
            alone = tiny_codec.encode(w.view(1, 1, -1))[0]
            assert torch.equal(codes[i, :, : alone.shape[-1]], alone)


# -- resumable and honest ------------------------------------------------------------------------------------
def test_killed_export_resumes_to_same_dataset(corpus, tiny_ckpt, tmp_path):
    manifest = write_manifest(tmp_path / "small.jsonl", corpus[:10])
    clean, resumed = tmp_path / "clean", tmp_path / "resumed"
    assert export(tiny_ckpt, manifest, clean, "--shard-size", "3", "--batch-size", "1", "--workers", "0") == 0

    # A separate process killed with SIGKILL while writing its third shard (after two whole shards).
    env = dict(os.environ, **{KILL_AFTER_ENV: "2"})
    proc = subprocess.run([sys.executable, "-m", "neurocodec.cli", "export", "--model", tiny_ckpt, "--manifest",
                           str(manifest), "--out", str(resumed), "--shard-size", "3", "--batch-size", "4",
                           "--workers", "0"], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    finished = sorted(resumed.glob("shard-*.parquet"))
    assert len(finished) == 2 and len(list(resumed.glob(".shard-*.tmp-*"))) == 1
    assert json.loads((resumed / "dataset.json").read_text())["complete"] is False
    stamps = {p.name: p.stat().st_mtime_ns for p in finished}

    assert export(tiny_ckpt, manifest, resumed, "--shard-size", "3", "--batch-size", "4", "--workers", "0") == 0
    assert {p.name: p.stat().st_mtime_ns for p in finished} == stamps  # finished shards kept, not redone
    assert not list(resumed.glob(".shard-*"))  # the half-written temp file is gone

    rows_a, rows_b = read_rows(clean), read_rows(resumed)
    assert [r["id"] for r in rows_b] == [r["id"] for r in rows_a]
    differ = [(a["id"], int((np.asarray(a["codes"]) != np.asarray(b["codes"])).sum())) for a, b in zip(rows_a, rows_b)
              if a != b]
    assert not differ, f"rows differ between the clean and the resumed export (id, differing codes): {differ}"
    info_a, info_b = (json.loads((d / "dataset.json").read_text()) for d in (clean, resumed))
    for info in (info_a, info_b):
        info.pop("created_with")
    assert info_a == info_b


def test_export_refuses_to_mix_with_another_export(demo_export, demo_manifest, tiny_ckpt, tmp_path, capsys):
    target = tmp_path / "other"
    shutil.copytree(demo_export, target)
    assert export(tiny_ckpt, demo_manifest[0], target, "--shard-size", "10") == 2
    assert "different model, manifest" in capsys.readouterr().err


# -- readers -------------------------------------------------------------------------------------------------
def test_datasets_load_dataset_reads_the_output(demo_export, tmp_path):
    import datasets

    ds = datasets.load_dataset("parquet", data_files=sorted(str(p) for p in demo_export.glob("shard-*.parquet")),
                               split="train", cache_dir=str(tmp_path / "hf"))
    rows = read_rows(demo_export)
    assert ds.num_rows == len(rows)
    assert str(ds.features["codes"].feature.feature.dtype) == "uint16"
    for i in (0, len(rows) - 1):
        assert ds[i]["id"] == rows[i]["id"] and ds[i]["codes"] == rows[i]["codes"]
    # the reader class wraps the same call
    assert TokenDataset(demo_export).hf(cache_dir=str(tmp_path / "hf2")).num_rows == len(rows)


def test_reader_sequences_invert_to_codes(demo_export):
    ds = TokenDataset(demo_export)
    assert ds.table().num_rows == len(ds)
    rows = {r["id"]: r for r in ds.rows()}
    for item in ds.sequences(layout="delay"):
        codes = rows[item["id"]]["codes"]
        assert item["tokens"].shape == (4, item["n_frames"] + 3)
        np.testing.assert_array_equal(undelay(item["tokens"]), codes)
        assert item["text"] == rows[item["id"]]["text"]
    for item in ds.sequences(layout="flat", offset=True):
        tokens = item["tokens"]
        assert tokens.shape == (4 * item["n_frames"],) and tokens.max() < 4096
        np.testing.assert_array_equal(unflatten(tokens, 4, ds.cardinality), rows[item["id"]]["codes"])
    first = next(iter(rows))
    np.testing.assert_array_equal(ds.codes(first), rows[first]["codes"])


def test_decode_tokens_resynthesises_a_row(demo_export, tiny_codec, tmp_path):
    row = read_rows(demo_export)[3]
    out = tmp_path / "row.wav"
    assert cli(["decode-tokens", str(demo_export), "--id", row["id"], "-o", str(out)]) == 0
    audio, sr = sf.read(out, dtype="float32")
    assert sr == 16000 and len(audio) == row["n_samples"]
    with torch.inference_mode():
        expected = tiny_codec.decode(torch.tensor(row["codes"]).unsqueeze(0))[0, 0, : row["n_samples"]].numpy()
    np.testing.assert_allclose(audio, np.clip(expected, -1, 1), atol=1.0 / 32767 + 1e-6)  # 16-bit WAV
    assert cli(["decode-tokens", str(demo_export), "--id", "no-such-id", "-o", str(out)]) == 2


def test_config_only_model_is_recorded_and_rebuilt(corpus, tiny_codec, tmp_path, monkeypatch, capsys):
    """A dataset made from a config (no checkpoint) records the seed and weight hash; decode-tokens rebuilds
    the model from dataset.json alone, and refuses a model with other weights."""
    import neurocodec.codecs.checkpoint as ckpt

    real_load = ckpt.load_codec
    # The export side reuses the module's codec (export does not modify it): saves one k-means warm start.
    monkeypatch.setattr(ckpt, "load_codec", lambda spec, device="cpu": tiny_codec if spec == MODEL
                        else real_load(spec, device))
    manifest = write_manifest(tmp_path / "two.jsonl", corpus[:2])
    out = tmp_path / "cfg"
    assert export(MODEL, manifest, out, "--workers", "0") == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["codec"]["config_only"] is True and info["codec"]["seed"] == 0
    assert info["codec"]["checkpoint_sha256"] is None and "seed 0" in (out / "README.md").read_text()

    monkeypatch.setattr(ckpt, "load_codec", real_load)
    wav = tmp_path / "x.wav"
    assert cli(["decode-tokens", str(out), "--id", corpus[1].id, "-o", str(wav)]) == 0  # rebuilt from the config
    other = ckpt.build_codec({**info["codec"]["config"], "seed": 7})
    ckpt.save_codec(other, tmp_path / "other.safetensors")
    capsys.readouterr()
    assert cli(["decode-tokens", str(out), "--id", corpus[1].id, "-o", str(wav), "--model",
                str(tmp_path / "other.safetensors")]) == 2
    assert "weights differ" in capsys.readouterr().err


# -- sequence layouts ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k,t", [(1, 5), (4, 1), (4, 37), (8, 3), (3, 0)])
def test_delay_pattern_round_trips(k, t):
    rng = np.random.default_rng(k * 100 + t)
    codes = rng.integers(0, 1024, size=(2, k, t))
    delayed = delay(codes, pad_id=1024)
    assert delayed.shape == (2, k, t + k - 1)
    mask = delay_mask(k, t)
    for i in range(k):
        np.testing.assert_array_equal(delayed[:, i, i:i + t], codes[:, i])  # codebook i shifted by i steps
    assert (delayed[:, ~mask] == 1024).all() and mask.sum() == k * t
    np.testing.assert_array_equal(undelay(delayed), codes)
    np.testing.assert_array_equal(undelay(delayed[0], num_frames=max(t - 1, 0)), codes[0, :, : max(t - 1, 0)])


def test_flatten_is_frame_major_and_round_trips():
    codes = np.array([[1, 2, 3], [10, 20, 30]])
    np.testing.assert_array_equal(flatten(codes), [1, 10, 2, 20, 3, 30])
    np.testing.assert_array_equal(flatten(codes, [100, 100]), [1, 110, 2, 120, 3, 130])
    np.testing.assert_array_equal(unflatten(flatten(codes, [100, 100]), 2, [100, 100]), codes)
    batch = np.random.default_rng(0).integers(0, 50, size=(3, 4, 9))
    np.testing.assert_array_equal(unflatten(flatten(batch), 4), batch)


def test_float32_export_is_recorded_and_close_to_exact(demo_export, demo_manifest, tiny_ckpt, tmp_path, capsys):
    """The opt-in fast mode says so in dataset.json, cannot be mixed into an exact export, and its codes
    differ from the exact ones at most in rare near-tie frames."""
    utts = [u for u in demo_manifest[1] if u.id not in demo_manifest[2]][:6]
    manifest = write_manifest(tmp_path / "six.jsonl", utts)
    out = tmp_path / "f32"
    assert export(tiny_ckpt, manifest, out, "--float32", "--workers", "0", "--batch-size", "6") == 0
    assert json.loads((out / "dataset.json").read_text())["encoding"]["precision"] == "float32"
    assert "float32" in (out / "README.md").read_text()
    exact = {r["id"]: np.asarray(r["codes"]) for r in read_rows(demo_export)}
    same = total = 0
    for row in read_rows(out):
        codes = np.asarray(row["codes"])
        same, total = same + (codes == exact[row["id"]]).sum(), total + codes.size
    assert same / total > 0.9  # float32 shape-dependent rounding flips near-tie codes (a few % here)
    capsys.readouterr()
    assert export(tiny_ckpt, manifest, out, "--workers", "0") == 2  # an exact rerun into a float32 export
    assert "different model" in capsys.readouterr().err


def test_shard_of_only_unreadable_files(corpus, tiny_ckpt, tmp_path):
    """A shard whose files are all unreadable is still written (so a rerun skips it) and loads as 0 rows."""
    utts = [Utterance(id="gone1", path=str(tmp_path / "gone1.wav")), Utterance(id="gone2", path=str(tmp_path / "g2.wav"))]
    manifest = write_manifest(tmp_path / "m.jsonl", utts + corpus[:2])
    out = tmp_path / "out"
    assert export(tiny_ckpt, manifest, out, "--shard-size", "2", "--workers", "0") == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["rows"] == 2 and info["num_bad"] == 2 and [s["rows"] for s in info["shards"]] == [0, 2]
    ds = TokenDataset(out)
    assert ds.hf(cache_dir=str(tmp_path / "hf")).num_rows == 2 == ds.table().num_rows
    assert [r["id"] for r in ds.rows()] == [corpus[0].id, corpus[1].id]
