"""The GPU kit (scripts/gpukit.py): the corpus that travels, the wheel checks, checkpoint choice, metrics merge."""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from neurocodec.cli import main as neurocodec
from neurocodec.data import debian
from neurocodec.data.manifest import read_manifest, train_or_valid

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def gpukit():
    spec = importlib.util.spec_from_file_location("gpukit", ROOT / "scripts" / "gpukit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _g722(path: Path, seconds: float, seed: int) -> None:
    from G722 import G722

    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    pcm = (3000 * np.sin(2 * np.pi * (200 + 50 * seed) * t) + 300 * rng.standard_normal(t.size)).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(G722(16000, 64000).encode(pcm))


def _keys(split: str, count: int) -> list[str]:
    """Prompt names that debian's hash rule puts in `split` for a training voice."""
    out = [f"p{i}" for i in range(2000) if train_or_valid(f"p{i}") == split]
    return out[:count]


def _sounds(root: Path) -> Path:
    sounds = root / "sounds"
    seed = 0
    for lang in ("en", "es", "fr", "it", "ru"):
        folder = sounds / debian.VOICE_BY_LANG[lang].folder
        for key in _keys("train", 2) + _keys("valid", 1):
            seed += 1
            _g722(folder / f"{key}.g722", 0.3 + 0.05 * seed, seed)
        _g722(folder / "silence" / "1.g722", 0.2, 99)  # not speech: never travels
    return sounds


def test_kit_corpus_trains_on_training_voices_and_validates_exactly_like_the_full_corpus(gpukit, tmp_path):
    sounds = _sounds(tmp_path)
    members = gpukit.corpus_members(sounds)
    names = sorted(name for _, name in members)
    assert not any("fr_CA" in n or "/silence/" in n for n in names)  # the held-out voice stays here
    es = [n for n in names if "es_MX" in n]
    assert es == [f"sounds/es_MX_f_Allison/{_keys('valid', 1)[0]}.g722"]  # Spanish: valid prompts only

    kit = tmp_path / "kit"
    kit.mkdir()
    gpukit.write_corpus(kit / "corpus.tar.xz", members)
    languages = [v.language for v in debian.VOICES if v.language != "fr"]
    (kit / "kit.json").write_text(json.dumps({"corpus": {"languages": languages, "sha256": "x"}}))
    args = argparse.Namespace(kit=str(kit), unpack=str(tmp_path / "unpacked"), out=str(tmp_path / "device"))
    assert gpukit.cmd_corpus(args) == 0

    # The full corpus, built the usual way from all five voices (fr held out).
    assert neurocodec(["data", "debian", "-o", str(tmp_path / "full"), "--sounds-dir", str(sounds),
                       "--no-install", "--no-music"]) == 0
    device = read_manifest(tmp_path / "device" / "manifest.jsonl")
    full = read_manifest(tmp_path / "full" / "manifest.jsonl")
    rows = lambda utts, split: [(u.id, u.duration, u.speaker) for u in utts if u.split == split]  # noqa: E731
    assert rows(device, "valid") == rows(full, "valid")  # same files, same order: same validation crops
    assert rows(device, "test") == []
    assert {u.id for u in device if u.split == "train"} == {u.id for u in full if u.split == "train"
                                                             and u.language != "es"}


def test_data_debian_without_a_test_voice(tmp_path):
    sounds = _sounds(tmp_path)
    assert neurocodec(["data", "debian", "-o", str(tmp_path / "c"), "--sounds-dir", str(sounds), "--no-install",
                       "--no-music", "--languages", "en,it", "--test-language", "none"]) == 0
    splits = {u.split for u in read_manifest(tmp_path / "c" / "manifest.jsonl")}
    assert splits == {"train", "valid"}
    # Naming a test voice that is not among the languages is still an error.
    assert neurocodec(["data", "debian", "-o", str(tmp_path / "d"), "--sounds-dir", str(sounds), "--no-install",
                       "--no-music", "--languages", "en,it"]) == 2


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


def test_resume_takes_the_kit_checkpoint_unless_the_device_run_is_further(gpukit, tmp_path, capsys):
    kit, run = tmp_path / "kit", tmp_path / "runs" / "default-model"
    _ckpt(tmp_path / "k.ckpt", 2000)
    kit.mkdir()
    (kit / "last.ckpt.xz").write_bytes(lzma.compress((tmp_path / "k.ckpt").read_bytes()))
    (kit / "kit.json").write_text(json.dumps({"checkpoint": {"gen_step": 2000}}))
    args = argparse.Namespace(kit=str(kit), run=str(run))
    assert gpukit.cmd_resume(args) == 0
    assert capsys.readouterr().out.strip() == "2000"
    assert gpukit.checkpoint_step(run / "checkpoints" / "last.ckpt") == 2000
    assert _callbacks(run / "checkpoints" / "last.ckpt") == ["ModelCheckpoint"]  # max_time counts from this call

    _ckpt(run / "checkpoints" / "last.ckpt", 5400)  # a warm machine: the previous call's checkpoint stays
    assert gpukit.cmd_resume(args) == 0
    assert capsys.readouterr().out.strip() == "5400"
    assert gpukit.checkpoint_step(run / "checkpoints" / "last.ckpt") == 5400
    assert _callbacks(run / "checkpoints" / "last.ckpt") == ["ModelCheckpoint"]


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
    assert (run / "codec.safetensors").read_bytes() == b"codec"
    assert (run / "csv" / "metrics.csv").read_text().split() == ["gen_step,step", "1950,1949", "2050,2049", "3000,2999"]
    assert json.loads((run / "gpu_runs.jsonl").read_text())["device"] == "test GPU"

    _ckpt(back / "last.ckpt", 2500)  # behind what the run holds now: nothing is replaced
    with pytest.raises(SystemExit, match="not behind"):
        gpukit.cmd_collect(args)
    assert gpukit.checkpoint_step(run / "checkpoints" / "last.ckpt") == 3000
