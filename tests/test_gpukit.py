"""The GPU kit (scripts/gpukit.py): the corpus that travels, the wheel checks, checkpoint choice, metrics merge."""

from __future__ import annotations

import argparse
import importlib.util
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from neurocodec.cli import main as neurocodec
from neurocodec.config import load_config
from neurocodec.data.dataset import AudioSegmentDataset
from neurocodec.data.manifest import read_manifest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpukit():
    spec = importlib.util.spec_from_file_location("gpukit", ROOT / "scripts" / "gpukit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kit_corpus_carries_training_files_as_opus_and_the_exact_validation_crops(gpukit, tmp_path):
    demo = ROOT / "data" / "demo" / "manifest.jsonl"
    run = tmp_path / "run"
    run.mkdir()
    config = load_config("grvq_4cb", "tiny", [f"data.manifest={demo}", "data.valid_items=6"])
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "kit").mkdir()
    info = gpukit.write_corpus(tmp_path / "kit" / "corpus.tar", run / "config.yaml", demo)
    train = read_manifest(demo, split="train")
    assert info["train_files"] == len(train) and info["valid_crops"] == 6
    (tmp_path / "kit" / "kit.json").write_text(json.dumps({"corpus": {**info, "sha256": "x"}}))
    args = argparse.Namespace(kit=str(tmp_path / "kit"), out=str(tmp_path / "device"))
    assert gpukit.cmd_corpus(args) == 0
    device = read_manifest(tmp_path / "device" / "manifest.jsonl")
    assert [u.id for u in device if u.split == "train"] == [u.id for u in train]
    assert {u.split for u in device} == {"train", "valid"}  # the held-out speaker's test clips stay here

    # Validation: the device builds the very crops the CPU run scores (24-bit FLAC: within 1e-6).
    data, sr, frame_size, seed = gpukit.run_data(run / "config.yaml")
    here = gpukit.validation_set(data, sr, frame_size, seed)
    data.manifest = str(tmp_path / "device" / "manifest.jsonl")
    there = gpukit.validation_set(data, sr, frame_size, seed)
    assert len(there) == len(here) == 6
    for k in range(6):
        assert torch.allclose(there[k], here[k], atol=1e-6)

    # Training files: Opus of the same speech (same length, high correlation once Opus's delay is removed),
    # and random training crops read from them.
    for utt, copy in zip(train[:3], [u for u in device if u.split == "train"][:3]):
        original, _ = sf.read(utt.path, dtype="float32")
        coded, rate = sf.read(copy.path, dtype="float32")
        assert rate == sr and abs(len(coded) - len(original)) <= 0.01 * sr
        n = min(len(coded), len(original))
        assert np.corrcoef(original[:n], coded[:n])[0, 1] > 0.95
    crops = AudioSegmentDataset(tmp_path / "device" / "manifest.jsonl", sr, 0.5, split="train", frame_size=frame_size,
                                length=8)
    assert not crops.skipped and all(crops[i].shape == (1, 8000) and crops[i].abs().max() > 0 for i in range(8))


def _wheel(folder: Path, name: str, version: str, tag: str, requires: list[str]) -> Path:
    path = folder / f"{name}-{version}-{tag}.whl"
    meta = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    meta += [f"Requires-Dist: {r}" for r in requires]
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", "\n".join(meta) + "\n")
    return path


def test_wheel_check_finds_missing_needs_wrong_tags_and_duplicates(gpukit, tmp_path, monkeypatch):
    monkeypatch.setattr(gpukit, "KIT_PACKAGES", {"alpha": "", "beta": ""})
    _wheel(tmp_path, "alpha", "1.0", "py3-none-any", ["beta>=2", "numpy", 'pywin32; sys_platform == "win32"',
                                                       'tomli; python_version < "3.11"', "docs-thing; extra == 'docs'"])
    _wheel(tmp_path, "beta", "2.1", "cp312-cp312-manylinux_2_17_x86_64", ["torch>=2.4"])
    assert gpukit.check_wheels(tmp_path) == []

    _wheel(tmp_path, "beta", "2.2", "cp311-cp311-manylinux_2_17_x86_64", ["torch>=2.12", "gamma"])
    problems = "\n".join(gpukit.check_wheels(tmp_path))
    assert "beta: 2 wheels" in problems
    assert "beta-2.2-cp311" in problems and "no tag installable" in problems
    assert "needs gamma" in problems  # neither in the kit nor on the device
    assert "torch>=2.12" in problems and "2.11.0" in problems  # the device's torch is older


def _ckpt(path: Path, step: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # As a run stopped by --trainer.max_time saves it: with the time it used in Lightning's Timer state.
    torch.save({"neurocodec": {"gen_step": step}, "state_dict": {"gen_step": torch.tensor(step)},
                "callbacks": {"Timer": {"time_elapsed": {"train": 400.0}}, "ModelCheckpoint": {}}}, path)


def _callbacks(path: Path) -> list[str]:
    return list(torch.load(path, map_location="cpu", weights_only=False)["callbacks"])


def test_resume_starts_from_the_shipped_weights_unless_the_device_has_its_own_checkpoint(gpukit, tmp_path, capsys):
    run = tmp_path / "runs" / "default-model-gpu"
    args = argparse.Namespace(run=str(run))
    assert gpukit.cmd_resume(args) == 0
    assert capsys.readouterr().out.strip() == "0"  # the device script then passes --init_from default

    _ckpt(run / "checkpoints" / "last.ckpt", 5400)  # a warm machine: the previous call's checkpoint stays
    assert gpukit.cmd_resume(args) == 0
    assert capsys.readouterr().out.strip() == "5400"
    assert gpukit.checkpoint_step(run / "checkpoints" / "last.ckpt") == 5400
    assert _callbacks(run / "checkpoints" / "last.ckpt") == ["ModelCheckpoint"]  # max_time counts from this call


def test_metrics_merge_drops_the_replaced_local_rows_and_unions_columns(gpukit, tmp_path):
    local, device = tmp_path / "local.csv", tmp_path / "device.csv"
    local.write_text("epoch,gen_step,step,train/mel\n" + "".join(f"0,{s + 1},{s},0.5\n" for s in (49, 99, 149, 199)))
    device.write_text("epoch,gen_step,step,train/mel,valid/pesq\n1,101,100,0.4,\n1,,150,,1.3\n")
    assert gpukit.merge_metrics(local, device) == (2, 2)  # local 149, 199: replaced
    import csv

    rows = list(csv.DictReader(open(local)))
    assert [r["step"] for r in rows] == ["49", "99", "100", "150"]
    assert rows[-1]["valid/pesq"] == "1.3" and rows[0]["valid/pesq"] == ""


def test_collect_installs_a_newer_checkpoint_and_refuses_an_older_one(gpukit, tmp_path):
    run, back = tmp_path / "runs" / "default-model", tmp_path / "files"
    _ckpt(run / "checkpoints" / "last.ckpt", 2000)
    (run / "csv").mkdir()
    (run / "csv" / "metrics.csv").write_text("gen_step,step\n1950,1949\n2050,2049\n")
    _ckpt(back / "last.ckpt", 3000)
    (back / "metrics.csv").write_text("gen_step,step\n2050,2049\n3000,2999\n")
    (back / "codec.safetensors").write_bytes(b"codec")
    record = {"start_step": 2000, "device": "test GPU", "steps_per_s_sustained": 9}
    (back / "gpu_run.json").write_text(json.dumps(record))
    args = argparse.Namespace(dir=str(back), run=str(run), force=False)
    assert gpukit.cmd_collect(args) == 0
    assert gpukit.checkpoint_step(run / "checkpoints" / "last.ckpt") == 3000
    assert _callbacks(run / "checkpoints" / "last.ckpt") == ["ModelCheckpoint"]
    assert gpukit.checkpoint_step(run / "checkpoints" / "pre-gpu-step0002000.ckpt.bak") == 2000
    assert not (run / "config.yaml").exists()  # the device's config is only installed into a new run folder
    assert (run / "codec.safetensors").read_bytes() == b"codec"
    assert (run / "csv" / "metrics.csv").read_text().split() == ["gen_step,step", "1950,1949", "2050,2049", "3000,2999"]
    assert json.loads((run / "gpu_runs.jsonl").read_text())["device"] == "test GPU"

    _ckpt(back / "last.ckpt", 2500)  # behind what the run holds now: nothing is replaced
    with pytest.raises(SystemExit, match="not behind"):
        gpukit.cmd_collect(args)
    assert gpukit.checkpoint_step(run / "checkpoints" / "last.ckpt") == 3000

    (back / "config.yaml").write_text("model: {}\n")  # a new local folder: the run is installed whole
    fresh = tmp_path / "runs" / "default-model-gpu"
    assert gpukit.cmd_collect(argparse.Namespace(dir=str(back), run=str(fresh), force=False)) == 0
    assert gpukit.checkpoint_step(fresh / "checkpoints" / "last.ckpt") == 2500
    assert (fresh / "config.yaml").read_text() == "model: {}\n" and (fresh / "csv" / "metrics.csv").is_file()
