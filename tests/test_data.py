"""Data: folder scans, the Debian G.722 corpus builder, the committed demo corpus, training crops."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from neurocodec.cli import main
from neurocodec.data import debian
from neurocodec.data.dataset import AudioSegmentDataset
from neurocodec.data.manifest import read_manifest, train_or_valid
from neurocodec.data.scan import scan_dir
from neurocodec.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "manifest.jsonl"


def _tone(seconds: float, sr: int, channels: int = 1, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * sr)) / sr
    x = 0.3 * np.sin(2 * np.pi * 220 * t) + 0.02 * rng.standard_normal(len(t))
    return np.stack([x] * channels, axis=1).astype(np.float32) if channels > 1 else x.astype(np.float32)


def _write_manifest(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- scan ------------------------------------------------------------------------------------------------
def test_scan_finds_audio_transcripts_speakers_and_counts_corrupt(tmp_path):
    root = tmp_path / "corpus"
    # LibriTTS layout: speaker/chapter/file with a .normalized.txt sidecar
    (root / "103" / "1240").mkdir(parents=True)
    sf.write(root / "103" / "1240" / "103_1240_000001_000000.wav", _tone(0.5, 24000), 24000)
    (root / "103" / "1240" / "103_1240_000001_000000.normalized.txt").write_text("Hello there.\n")
    (root / "103" / "1240" / "103_1240_000001_000000.original.txt").write_text("HELLO THERE")
    # LibriSpeech layout: chapter transcript file
    (root / "19" / "198").mkdir(parents=True)
    sf.write(root / "19" / "198" / "19-198-0001.flac", _tone(0.7, 16000), 16000)
    (root / "19" / "198" / "19-198.trans.txt").write_text("19-198-0001 NORTHANGER ABBEY\n")
    # plain speaker folder, stereo, .lab sidecar
    (root / "alice").mkdir()
    sf.write(root / "alice" / "hi.wav", _tone(0.25, 8000, channels=2), 8000)
    (root / "alice" / "hi.lab").write_text("hi  there\n")
    # a file at the top (no speaker, no transcript), a corrupt one, and a non-audio file
    sf.write(root / "loose.wav", _tone(0.1, 16000), 16000)
    (root / "vctk" / "p225").mkdir(parents=True)
    sf.write(root / "vctk" / "p225" / "p225_001.wav", _tone(0.2, 48000), 48000)
    (root / "alice" / "broken.wav").write_bytes(b"RIFF....not really a wave file")
    (root / "notes.md").write_text("not audio")

    out = tmp_path / "m.jsonl"
    assert main(["data", "scan", str(root), "-o", str(out)]) == 0
    rows = {u.id: u for u in read_manifest(out)}
    assert set(rows) == {"103/1240/103_1240_000001_000000", "19/198/19-198-0001", "alice/hi", "loose", "vctk/p225/p225_001"}
    tts = rows["103/1240/103_1240_000001_000000"]
    assert (tts.speaker, tts.text, tts.sample_rate, tts.channels) == ("103", "Hello there.", 24000, 1)
    assert tts.duration == pytest.approx(0.5)
    assert (rows["19/198/19-198-0001"].speaker, rows["19/198/19-198-0001"].text) == ("19", "NORTHANGER ABBEY")
    assert (rows["alice/hi"].speaker, rows["alice/hi"].text, rows["alice/hi"].channels) == ("alice", "hi there", 2)
    assert rows["loose"].speaker is None and rows["loose"].text is None
    assert rows["vctk/p225/p225_001"].speaker == "p225" and rows["vctk/p225/p225_001"].sample_rate == 48000
    assert all(Path(u.path).is_file() for u in rows.values())

    result = scan_dir(root, progress=False)
    assert [Path(p).name for p, _ in result.unreadable] == ["broken.wav"]


def test_scan_missing_folder_is_a_one_line_error(tmp_path, capsys):
    assert main(["data", "scan", str(tmp_path / "nope"), "-o", str(tmp_path / "m.jsonl")]) == 2
    err = capsys.readouterr().err.strip()
    assert "is not a folder" in err and "\n" not in err


# -- dataset ---------------------------------------------------------------------------------------------
@pytest.fixture
def small_corpus(tmp_path):
    sf.write(tmp_path / "long.wav", _tone(2.0, 44100, channels=2, seed=1), 44100)  # resampled + mixed down
    sf.write(tmp_path / "mid.flac", _tone(1.1, 16000, seed=2), 16000)
    sf.write(tmp_path / "short.wav", _tone(0.1, 16000, seed=3), 16000)
    (tmp_path / "corrupt.wav").write_bytes(b"\x00\x01garbage" * 50)
    rows = [{"path": p, "split": "train"} for p in ("long.wav", "mid.flac", "short.wav", "corrupt.wav")]
    return _write_manifest(tmp_path / "m.jsonl", rows)


def test_train_crops_have_segment_shape_and_skip_bad_files(small_corpus, caplog):
    with caplog.at_level(logging.WARNING, logger="neurocodec.data.dataset"):
        ds = AudioSegmentDataset(small_corpus, 16000, 0.29, split="train", frame_size=320, min_seconds=0.2)
    assert ds.segment_samples == 4480  # floor(0.29 * 16000 / 320) * 320
    reasons = {Path(p).name: r for p, r in ds.skipped}
    assert set(reasons) == {"short.wav", "corrupt.wav"}
    assert reasons["short.wav"].startswith("too short") and reasons["corrupt.wav"].startswith("unreadable")
    assert "corrupt.wav" in caplog.text and "short.wav" in caplog.text
    assert len(ds) == 2
    for i in range(len(ds)):
        x = ds[i]
        assert x.shape == (1, 4480) and x.dtype == torch.float32
        assert x.shape[-1] % 320 == 0
        assert torch.isfinite(x).all() and 0 < x.abs().max() <= 0.99 + 1e-6
    # random crops and gains: two draws from the 2 s file differ
    assert not torch.equal(ds[0], ds[0])
    virtual = AudioSegmentDataset(small_corpus, 16000, 0.29, frame_size=320, min_seconds=0.2, length=7)
    assert len(virtual) == 7 and all(virtual[i].shape == (1, 4480) for i in range(7))


def test_speaker_balance_moves_crops_from_the_big_speaker_to_the_small_one(tmp_path):
    # Speaker "big" has 4 s of a 220 Hz tone in two files, "small" 1 s of 880 Hz: a crop's pitch says whose it is.
    rows = []
    for name, seconds, freq, speaker in (("b1.wav", 3.0, 220, "big"), ("b2.wav", 1.0, 220, "big"),
                                         ("s1.wav", 1.0, 880, "small")):
        t = np.arange(int(seconds * 16000)) / 16000
        sf.write(tmp_path / name, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)
        rows.append({"path": name, "speaker": speaker})
    manifest = _write_manifest(tmp_path / "m.jsonl", rows)

    def share_of_small(balance: float) -> tuple[float, float]:
        ds = AudioSegmentDataset(manifest, 16000, 0.1, frame_size=320, length=600, speaker_balance=balance)
        torch.manual_seed(0)
        crossings = [int((np.diff(np.sign(ds[i][0].numpy())) != 0).sum()) for i in range(len(ds))]
        drawn = float(np.mean([c > 100 for c in crossings]))  # 880 Hz: ~176 per 0.1 s, 220 Hz: ~44
        return ds.speaker_shares()["small"], drawn

    for balance, expected in ((0.0, 0.2), (0.5, 1 / 3), (1.0, 0.5)):  # 1/(1+4), 1/(1+2), 1/(1+1)
        share, drawn = share_of_small(balance)
        assert share == pytest.approx(expected)
        assert abs(drawn - expected) < 0.07, (balance, drawn)  # binomial sd at n=600: <= 0.021
    # within a speaker, still by duration: b1 (3 s) gets 3x the crops of b2 (1 s)
    ds = AudioSegmentDataset(manifest, 16000, 0.1, frame_size=320, length=10, speaker_balance=1.0)
    assert ds._weights.tolist() == pytest.approx([0.375, 0.125, 0.5])
    with pytest.raises(UserError, match="epoch length"):
        AudioSegmentDataset(manifest, 16000, 0.1, frame_size=320, speaker_balance=1.0)
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        AudioSegmentDataset(manifest, 16000, 0.1, frame_size=320, length=10, speaker_balance=1.5)


def _peak_hz(crop: torch.Tensor, sr: int) -> float:
    x = crop[0].numpy() * np.hanning(crop.shape[-1])
    spectrum = np.abs(np.fft.rfft(x, n=8 * sr))  # 0.125 Hz bins
    return float(np.argmax(spectrum)) * sr / (8 * sr)


def test_speed_perturbation_moves_the_pitch_of_training_crops_by_the_drawn_factor(tmp_path):
    # A 200 Hz tone at 16 kHz and at 8 kHz (the resampling path): a crop played 1.1x faster peaks at 220 Hz.
    rows = []
    for name, sr in (("a16.wav", 16000), ("a8.wav", 8000)):
        t = np.arange(4 * sr) / sr
        sf.write(tmp_path / name, (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32), sr)
        rows.append({"path": name, "speaker": name})
    manifest = _write_manifest(tmp_path / "m.jsonl", rows)

    plain = AudioSegmentDataset(manifest, 16000, 0.5, frame_size=320, length=20)
    assert {round(_peak_hz(plain[i], 16000)) for i in range(20)} == {200}
    perturbed = AudioSegmentDataset(manifest, 16000, 0.5, frame_size=320, length=60, speed_factors=(0.9, 1.1))
    torch.manual_seed(0)
    crops = [perturbed[i] for i in range(60)]
    peaks = [_peak_hz(c, 16000) for c in crops]
    assert all(min(abs(p - 180), abs(p - 220)) < 0.5 for p in peaks), peaks
    assert 15 < sum(p > 200 for p in peaks) < 45  # both factors drawn (binomial, n=60)
    # a sped-up crop reads more of the file, so the segment is full to its end (no zero padding)
    assert all(c.shape == (1, 8000) and float(c[0, -160:].abs().max()) > 0.5 * float(c.abs().max()) for c in crops)
    # validation crops are never perturbed
    valid = AudioSegmentDataset(manifest, 16000, 0.5, frame_size=320, train=False)
    assert {round(_peak_hz(valid[i], 16000)) for i in range(len(valid))} == {200}
    with pytest.raises(UserError, match="speed factors"):
        AudioSegmentDataset(manifest, 16000, 0.5, frame_size=320, length=10, speed_factors=(0.9, 3.0))


def test_short_files_are_zero_padded_without_min_seconds(small_corpus):
    ds = AudioSegmentDataset(small_corpus, 16000, 0.5, frame_size=320, train=False)
    assert [Path(p).name for p, _ in ds.skipped] == ["corrupt.wav"]
    short = next(k for k, (idx, _) in enumerate(ds.crops) if Path(ds.files[idx].path).name == "short.wav")
    x = ds[short]
    assert x.shape == (1, 8000)
    assert x[0, :1600].abs().max() > 0 and x[0, 1700:].abs().max() == 0  # 0.1 s of audio then zeros


def test_eval_crops_are_deterministic_and_cover_the_files(small_corpus):
    a = AudioSegmentDataset(small_corpus, 16000, 0.25, train=False, frame_size=320, min_seconds=0.2, seed=3)
    b = AudioSegmentDataset(small_corpus, 16000, 0.25, train=False, frame_size=320, min_seconds=0.2, seed=3)
    assert len(a) == len(b) == 8 + 4  # 2.0 s -> 8 crops, 1.1 s -> 4 crops of 0.24 s
    for i in range(len(a)):
        assert torch.equal(a[i], b[i]) and torch.equal(a[i], a[i])
        rms_db = 20 * torch.log10(a[i].pow(2).mean().sqrt())
        peak = a[i].abs().max()
        assert abs(rms_db + 20) < 0.1 or abs(peak - 0.99) < 1e-3  # level-normalised, no random gain
    sub = AudioSegmentDataset(small_corpus, 16000, 0.25, train=False, frame_size=320, min_seconds=0.2, seed=3, length=5)
    assert len(sub) == 5 and set(sub.crops) <= set(a.crops)


def test_file_failing_at_read_time_is_recorded_and_replaced(tmp_path, caplog):
    for name, seed in (("a.wav", 1), ("b.wav", 2)):
        sf.write(tmp_path / name, _tone(1.0, 16000, seed=seed), 16000)
    manifest = _write_manifest(tmp_path / "m.jsonl", [{"path": "a.wav"}, {"path": "b.wav"}])
    train = AudioSegmentDataset(manifest, 16000, 0.2, frame_size=320)
    valid = AudioSegmentDataset(manifest, 16000, 0.2, frame_size=320, train=False)
    assert train.skipped == [] and valid.skipped == []
    # The header still parses, the data behind it is gone: soundfile.info passed, reading now fails.
    with open(tmp_path / "a.wav", "r+b") as f:
        f.truncate(44)
    with caplog.at_level(logging.WARNING, logger="neurocodec.data.dataset"):
        x = train[0]  # item 0 is a.wav: b.wav is used instead
        y = valid[0]
    assert x.shape == y.shape == (1, 3200) and x.abs().max() > 0 and y.abs().max() > 0
    assert [Path(p).name for p, _ in train.skipped] == ["a.wav"] and "read failed" in train.skipped[0][1]
    assert [Path(p).name for p, _ in valid.skipped] == ["a.wav"]
    assert "a.wav" in caplog.text
    assert torch.equal(valid[0], valid[0])
    train[0], train[1]
    assert len(train.skipped) == 1  # warned and recorded once


def test_dataset_rejects_manifest_without_usable_audio(tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"nope")
    manifest = _write_manifest(tmp_path / "m.jsonl", [{"path": "bad.wav"}])
    with pytest.raises(UserError, match="no usable audio"):
        AudioSegmentDataset(manifest, 16000, 1.0)
    with pytest.raises(UserError, match="shorter than one frame"):
        AudioSegmentDataset(manifest, 16000, 0.01, frame_size=320)


# -- the committed demo corpus -----------------------------------------------------------------------------
def test_demo_corpus_is_valid_real_speech():
    rows = read_manifest(DEMO)
    total_bytes = 0
    for u in rows:
        info = sf.info(u.path)
        total_bytes += Path(u.path).stat().st_size
        assert u.path.endswith(".flac") and info.samplerate == 16000 and info.channels == 1
        assert u.sample_rate == 16000 and u.channels == 1
        assert u.duration == pytest.approx(info.frames / 16000, abs=1e-3)
        assert u.text and u.speaker and u.language
    assert total_bytes <= 10 * 1024 * 1024
    splits = {s: [u for u in rows if u.split == s] for s in ("train", "valid", "test")}
    assert all(splits.values()) and sum(map(len, splits.values())) == len(rows)
    assert {u.speaker for u in splits["test"]} == {"june_wallack"}  # the held-out speaker
    assert "june_wallack" not in {u.speaker for u in splits["train"] + splits["valid"]}
    assert {u.language for u in rows} == {"en", "es", "fr", "it", "ru"}
    minutes = sum(u.duration for u in rows) / 60
    assert 3 <= minutes <= 6
    assert (DEMO.parent / "LICENSE").is_file() and "CC-BY" in (DEMO.parent / "LICENSE").read_text()
    # and the training dataset reads it
    ds = AudioSegmentDataset(DEMO, 16000, 1.0, split="valid", train=False, frame_size=320)
    assert ds.skipped == [] and ds[0].shape == (1, 16000)


# -- G.722 and the Debian corpus builder -------------------------------------------------------------------
def _demo_clip(language: str) -> tuple[np.ndarray, str]:
    u = next(u for u in read_manifest(DEMO) if u.language == language)
    data, sr = sf.read(u.path, dtype="int16")
    assert sr == 16000
    return data, u.id


def _g722_file(path: Path, pcm: np.ndarray) -> None:
    from G722 import G722

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(G722(16000, 64000).encode(pcm))


def test_g722_decodes_to_16k_audio_of_the_right_duration(tmp_path):
    pcm, _ = _demo_clip("fr")
    _g722_file(tmp_path / "clip.g722", pcm)
    assert (tmp_path / "clip.g722").stat().st_size == len(pcm) // 2  # 64 kbit/s: 4 bits per sample
    duration = debian.g722_to_flac(tmp_path / "clip.g722", tmp_path / "clip.flac")
    info = sf.info(tmp_path / "clip.flac")
    assert info.samplerate == 16000 and info.channels == 1 and info.format == "FLAC"
    assert duration == pytest.approx(len(pcm) / 16000, abs=2 / 16000)
    out, _ = sf.read(tmp_path / "clip.flac", dtype="float32")
    ref = pcm.astype(np.float32) / 32768
    # G.722's QMF filter bank delays the signal by a few samples: compare at the best lag
    corr = max(np.corrcoef(ref[: len(ref) - lag], out[lag: len(ref)])[0, 1] for lag in range(0, 40))
    assert corr > 0.95


def test_debian_builder_makes_split_manifests_from_g722_voices(tmp_path):
    sounds = tmp_path / "sounds"
    en, en_id = _demo_clip("en")
    fr, _ = _demo_clip("fr")
    _g722_file(sounds / "en_US_f_Allison" / "vm-next.g722", en)
    _g722_file(sounds / "en_US_f_Allison" / "digits" / "1.g722", en[:8000])
    _g722_file(sounds / "en_US_f_Allison" / "silence" / "1.g722", np.zeros(16000, np.int16))
    _g722_file(sounds / "en_US_f_Allison" / "beep.g722", en[:1600])
    (sounds / "en_US_f_Allison" / "empty.g722").write_bytes(b"")
    _g722_file(sounds / "fr" / "bonjour.g722", fr)  # a plain language folder works too
    (sounds / "core-sounds-en.txt").write_text("; prompts\n\nvm-next: Press 6.\ndigits/1: One\n")
    (sounds / "fr" / "core-sounds-fr.txt").write_text("\ufeff; Core Asterisk Sounds in French\nbonjour: Bonjour.\n")
    moh = tmp_path / "moh"
    _g722_file(moh / "song.g722", en[:4000])

    out = tmp_path / "corpus"
    code = main(["data", "debian", "-o", str(out), "--languages", "en,fr", "--no-install",
                 "--sounds-dir", str(sounds), "--moh-dir", str(moh), "--demo", str(tmp_path / "demo"),
                 "--demo-seconds", "1", "--demo-valid-seconds", "0.5"])
    assert code == 0
    rows = {u.id: u for u in read_manifest(out / "manifest.jsonl")}
    assert set(rows) == {"en_vm-next", "en_digits_1", "fr_bonjour"}  # silence, tones and empty files left out
    assert rows["en_vm-next"].text == "Press 6." and rows["en_digits_1"].text == "One"
    assert rows["en_vm-next"].duration == pytest.approx(len(en) / 16000, abs=1e-3)
    assert rows["fr_bonjour"].split == "test" and rows["fr_bonjour"].speaker == "june_wallack"
    assert {rows["en_vm-next"].split, rows["en_digits_1"].split} <= {"train", "valid"}
    assert rows["en_vm-next"].speaker == "allison_smith" and rows["en_vm-next"].language == "en"
    for split in ("train", "valid", "test"):
        assert {u.id for u in read_manifest(out / f"{split}.jsonl")} == {k for k, u in rows.items() if u.split == split}
    music = read_manifest(out / "music.jsonl")
    assert [u.id for u in music] == ["moh_song"] and music[0].duration == pytest.approx(0.25, abs=1e-3)
    demo = read_manifest(tmp_path / "demo" / "manifest.jsonl")
    assert {u.split for u in demo} == {"valid", "test"} and all(Path(u.path).is_file() for u in demo)
    assert (tmp_path / "demo" / "LICENSE").is_file() and (tmp_path / "demo" / "README.md").is_file()

    # a second run reuses the decoded files (resume) and gives the same manifest
    before = (out / "manifest.jsonl").read_text()
    assert main(["data", "debian", "-o", str(out), "--languages", "en,fr", "--no-install", "--no-music",
                 "--sounds-dir", str(sounds)]) == 0
    assert (out / "manifest.jsonl").read_text() == before


def test_debian_install_needs_root(monkeypatch):
    monkeypatch.setattr(debian, "_installed", lambda package: False)
    monkeypatch.setattr(debian.os, "geteuid", lambda: 1000)
    monkeypatch.setattr(debian.shutil, "which", lambda name: "/usr/bin/apt-get")
    with pytest.raises(UserError, match="not running as root"):
        debian.ensure_packages(["asterisk-core-sounds-en-g722"])
    monkeypatch.setattr(debian.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="no apt-get"):
        debian.ensure_packages(["asterisk-core-sounds-en-g722"])


# -- espeak-ng synthetic speech ----------------------------------------------------------------------------
def _median_f0(path: str) -> float:
    import torchaudio

    wave, sr = sf.read(path, dtype="float32")
    f0 = torchaudio.functional.detect_pitch_frequency(torch.from_numpy(wave)[None], sr, freq_low=60, freq_high=400)
    return float(f0.median())


def test_espeak_corpus_adds_training_voices_beside_the_source_lines(tmp_path, capsys):
    out = tmp_path / "with_espeak"
    assert main(["data", "espeak", str(DEMO), "-o", str(out), "--minutes", "0.3", "--variants", "m1,f4,m1",
                 "--no-install"]) == 0  # the repeated m1 is one voice
    assert "train with --data.manifest" in capsys.readouterr().out
    source = read_manifest(DEMO)
    synthetic = read_manifest(out / "espeak.jsonl")
    combined = read_manifest(out / "manifest.jsonl")
    # The source's lines come first, unchanged, pointing at the same files from the new folder.
    assert [(u.id, Path(u.path).resolve(), u.split, u.speaker) for u in combined[:len(source)]] == \
        [(u.id, Path(u.path).resolve(), u.split, u.speaker) for u in source]
    assert [u.id for u in combined[len(source):]] == [u.id for u in synthetic]
    # Every language with training transcripts, in both variants; training split only, 16 kHz FLAC with sound.
    languages = {u.language for u in source if u.split == "train" and u.text}
    assert {u.speaker for u in synthetic} == {f"espeak_{lang}_{v}" for lang in languages for v in ("m1", "f4")}
    assert {u.split for u in synthetic} == {"train"}
    train_texts = {u.text for u in source if u.split == "train"}
    for u in synthetic:
        assert u.text in train_texts
        wave, sr = sf.read(u.path, dtype="float32")
        assert sr == 16000 and len(wave) / sr == pytest.approx(u.duration, abs=1e-3)
        assert np.sqrt(np.mean(wave ** 2)) > 0.01
    # The variants are different voices: espeak-ng's m1 speaks well below f4.
    f0 = {v: np.median([_median_f0(u.path) for u in synthetic if u.speaker.endswith(v)]) for v in ("_m1", "_f4")}
    assert f0["_m1"] * 1.4 < f0["_f4"], f0
    # The dataset reads the combined manifest, synthetic speakers included.
    speakers = {u.speaker for u in read_manifest(out / "manifest.jsonl", split="train")}
    assert speakers >= {u.speaker for u in synthetic} | {u.speaker for u in source if u.split == "train"}

    # A rerun keeps what is there (resumes) and writes the same manifests.
    stamp = {u.path: Path(u.path).stat().st_mtime_ns for u in synthetic}
    before = (out / "manifest.jsonl").read_text()
    assert main(["data", "espeak", str(DEMO), "-o", str(out), "--minutes", "0.3", "--variants", "m1,f4",
                 "--no-install"]) == 0
    assert (out / "manifest.jsonl").read_text() == before
    assert {p: Path(p).stat().st_mtime_ns for p in stamp} == stamp


def test_espeak_corpus_bad_requests_are_one_line_errors(tmp_path, capsys):
    from neurocodec.data import espeak

    with pytest.raises(UserError, match="would overwrite"):
        espeak.build_espeak_corpus(DEMO, DEMO.parent, minutes=1)
    with pytest.raises(UserError, match="must be > 0"):
        espeak.build_espeak_corpus(DEMO, tmp_path / "a", minutes=0)
    with pytest.raises(UserError, match=r"unknown espeak-ng variant\(s\) \['m99'\]"):
        espeak.build_espeak_corpus(DEMO, tmp_path / "a", minutes=1, variants=("m1", "m99"))
    with pytest.raises(UserError, match="not found"):
        espeak.build_espeak_corpus(DEMO, tmp_path / "a", minutes=1, binary="no-such-espeak")
    untranscribed = _write_manifest(tmp_path / "m.jsonl", [{"path": str(ROOT / "data/demo" / u.path), "split": "train",
                                                           "language": "en"} for u in read_manifest(DEMO)[:3]])
    with pytest.raises(UserError, match="no training lines with a transcript"):
        espeak.build_espeak_corpus(untranscribed, tmp_path / "b", minutes=1)
    # From the command line: the message, no traceback.
    assert main(["data", "espeak", str(untranscribed), "-o", str(tmp_path / "c"), "--no-install"]) != 0
    err = capsys.readouterr().err
    assert "no training lines with a transcript" in err and "Traceback" not in err


def _g722_tone(path: Path, seconds: float, seed: int) -> None:
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
            _g722_tone(folder / f"{key}.g722", 0.3 + 0.05 * seed, seed)
        _g722_tone(folder / "silence" / "1.g722", 0.2, 99)  # not speech: never travels
    return sounds


def test_data_debian_without_a_test_voice(tmp_path):
    sounds = _sounds(tmp_path)
    assert main(["data", "debian", "-o", str(tmp_path / "c"), "--sounds-dir", str(sounds), "--no-install",
                       "--no-music", "--languages", "en,it", "--test-language", "none"]) == 0
    splits = {u.split for u in read_manifest(tmp_path / "c" / "manifest.jsonl")}
    assert splits == {"train", "valid"}
    # Naming a test voice that is not among the languages is still an error.
    assert main(["data", "debian", "-o", str(tmp_path / "d"), "--sounds-dir", str(sounds), "--no-install",
                       "--no-music", "--languages", "en,it"]) == 2
