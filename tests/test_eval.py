"""Evaluation: metrics sanity, real Opus / Codec2 baselines, the runner's JSON and error handling, reports,
the `eval` command end to end, and the BENCHMARKS.md generator.

The baselines run the real binaries (Debian opus-tools and codec2, installed by scripts/setup.sh): when they
are missing these tests FAIL, on purpose — CI installs them.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from neurocodec.audio import load_audio
from neurocodec.cli import main
from neurocodec.data.manifest import Utterance, read_manifest
from neurocodec.eval.baselines import BaselineError, parse_baselines
from neurocodec.eval.metrics import align
from neurocodec.eval.runner import evaluate, find_clips, score, summarize

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "data" / "demo" / "manifest.jsonl"


def _espeak_clip(path: Path, text: str, voice: str = "en") -> Path:
    """Fallback speech when the demo corpus is absent: espeak-ng, resampled to 16 kHz."""
    raw = path.with_suffix(".raw.wav")
    subprocess.run(["espeak-ng", "-v", voice, "-w", str(raw), text], check=True, capture_output=True)
    sf.write(path, load_audio(raw, 16000)[0].numpy(), 16000)
    return path


@pytest.fixture(scope="module")
def speech_clips(tmp_path_factory) -> list[Path]:
    """Two short real-speech clips: the held-out speaker of the demo corpus (espeak-ng if it is not there)."""
    if DEMO.is_file():
        test = sorted(read_manifest(DEMO, "test"), key=lambda u: u.duration or 0)
        if len(test) >= 2:
            return [Path(test[0].path), Path(test[1].path)]
    tmp = tmp_path_factory.mktemp("speech")
    return [_espeak_clip(tmp / "a.wav", "Press six to play the next message."),
            _espeak_clip(tmp / "b.wav", "The weather today is cold and clear.", "en+f3")]


@pytest.fixture(scope="module")
def speech(speech_clips) -> np.ndarray:
    return load_audio(speech_clips[0], 16000)[0].numpy()


def _noisy(x: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).standard_normal(len(x)).astype(np.float32)
    noise *= np.sqrt(np.mean(x ** 2) / np.mean(noise ** 2) / 10 ** (snr_db / 10))
    return x + noise


# --- metrics -----------------------------------------------------------------------------------------
def test_identity_scores_perfect(speech):
    m = score(speech, speech.copy(), 16000, max_shift=800)
    assert m["pesq"] == pytest.approx(4.64, abs=0.01)  # the top of the P.862.2 scale
    assert m["pesq_nb"] > 4.4
    assert m["stoi"] == pytest.approx(1.0, abs=1e-6)
    assert m["mel_distance"] == pytest.approx(0.0, abs=1e-6)
    assert m["si_sdr"] > 100
    assert m["lag_ms"] == 0


def test_noise_lowers_scores_monotonically(speech):
    scores = [score(speech, _noisy(speech, snr), 16000, max_shift=800) for snr in (30, 15, 0)]
    clean = score(speech, speech, 16000, max_shift=800)
    pesq = [clean["pesq"]] + [s["pesq"] for s in scores]
    stoi = [clean["stoi"]] + [s["stoi"] for s in scores]
    mel = [clean["mel_distance"]] + [s["mel_distance"] for s in scores]
    assert all(a > b for a, b in zip(pesq, pesq[1:])), pesq
    assert all(a > b for a, b in zip(stoi, stoi[1:])), stoi
    assert all(a < b for a, b in zip(mel, mel[1:])), mel
    # SI-SDR of signal + white noise is the SNR (noise is uncorrelated with the signal)
    for snr, s in zip((30, 15, 0), scores):
        assert s["si_sdr"] == pytest.approx(snr, abs=0.5)


def test_visqol_is_a_second_opinion_that_also_falls_with_noise(speech, speech_clips):
    """ViSQOL is scored only when asked; it tops out on identical audio and falls as the SNR does, at 16 kHz
    and on 8 kHz material (resampled to its 16 kHz speech mode). Below ~20 dB SNR it sits at its floor."""
    assert "visqol" not in score(speech, speech, 16000, max_shift=800)
    at_16k = [score(speech, _noisy(speech, snr), 16000, max_shift=800, visqol=True)["visqol"] for snr in (40, 30, 25)]
    clean = score(speech, speech.copy(), 16000, max_shift=800, visqol=True)["visqol"]
    assert clean > 4.5 and all(1.0 <= v <= 5.0 for v in at_16k)
    assert all(a > b for a, b in zip([clean] + at_16k, at_16k)), (clean, at_16k)
    # a clip too short for ViSQOL keeps its other scores and says why it has no ViSQOL
    short = score(speech[:8000], speech[:8000], 16000, max_shift=800, visqol=True)
    assert short["visqol"] is None and "at least 0.65 s" in short["visqol_error"] and short["pesq"] > 4
    narrow = load_audio(speech_clips[1], 8000)[0].numpy()
    assert score(narrow, _noisy(narrow, 40), 8000, 400, visqol=True)["visqol"] > \
        score(narrow, _noisy(narrow, 20), 8000, 400, visqol=True)["visqol"]


def test_pause_level_measures_what_the_output_adds_in_pauses():
    """pause_level_db: 0 dB for the original itself; noise added only where the original is quiet raises it by the
    power ratio; noise of the same power over loud speech does not move it; a clip with no quiet frame has none."""
    from neurocodec.eval.metrics import pause_level_db

    rng = np.random.default_rng(3)
    t = np.arange(16000) / 16000
    loud = 0.3 * np.sin(2 * np.pi * 200 * t)
    ref = np.concatenate([loud, 1e-3 * rng.standard_normal(16000)]).astype(np.float32)  # speech, then a pause
    assert pause_level_db(ref, ref.copy(), 16000) == pytest.approx(0.0, abs=1e-9)
    hiss = np.zeros_like(ref)
    hiss[16000:] = 3e-3 * rng.standard_normal(16000)  # 9x the pause's power: +10 dB
    assert pause_level_db(ref, ref + hiss, 16000) == pytest.approx(10.0, abs=0.3)
    assert score(ref, ref + hiss, 16000, max_shift=0)["pause_level_db"] == pytest.approx(10.0, abs=0.3)
    on_speech = np.roll(hiss, -16000)
    assert pause_level_db(ref, ref + on_speech, 16000) == pytest.approx(0.0, abs=1e-9)
    assert pause_level_db(loud, loud, 16000) is None


def test_stream_start_overshoot_is_the_loudest_early_frames_excess_over_the_input():
    """0 dB for a codec that passes audio through; a codec whose first (or fifth) frame comes out 10x louder (a click at
    the start of every stream) measures +20 dB at every level."""
    import torch

    from neurocodec.eval.metrics import stream_start_overshoot_db

    class PassThrough:  # the two methods and two sizes the measure uses, nothing else
        sample_rate, frame_size = 16000, 320

        def encode(self, wav):
            return wav

        def decode(self, codes):
            return codes.clone()

    class ClickAtStart(PassThrough):
        def decode(self, codes):
            out = codes.clone()
            out[..., :self.frame_size] *= 10
            return out

    class ClickInFifthFrame(PassThrough):  # where a burst learnt by the PESQ loss, which skips 60 ms, would sit
        def decode(self, codes):
            out = codes.clone()
            out[..., 4 * self.frame_size:5 * self.frame_size] *= 10
            return out

    for level in (-60.0, -30.0):
        assert stream_start_overshoot_db(PassThrough(), level) == pytest.approx(0.0, abs=1e-6)
        assert stream_start_overshoot_db(ClickAtStart(), level) == pytest.approx(20.0, abs=1e-6)
        assert stream_start_overshoot_db(ClickInFifthFrame(), level) == pytest.approx(20.0, abs=1e-6)
    assert torch.is_grad_enabled()  # measured without autograd, and without turning it off for the caller


def test_alignment_undoes_a_delay(speech):
    delayed = np.concatenate([np.zeros(123, np.float32), speech])[: len(speech)]
    ref, deg, lag = align(speech, delayed, 400)
    assert lag == 123
    assert score(speech, delayed, 16000, max_shift=400)["pesq"] > 4.5


def test_summary_is_a_student_t_interval():
    s = summarize([1.0, 2.0, 3.0])
    assert s["mean"] == pytest.approx(2.0) and s["sd"] == pytest.approx(1.0) and s["n"] == 3
    half = 4.302653 / math.sqrt(3)  # t(0.975, 2 dof)
    assert s["ci95"] == pytest.approx([2.0 - half, 2.0 + half], rel=1e-5)
    assert summarize([1.5])["ci95"] is None
    assert summarize([float("nan"), None])["n"] == 0


# --- baselines ----------------------------------------------------------------------------------------
def test_baseline_binaries_are_installed():
    """setup.sh installs opus-tools and codec2; evaluation without them is not evaluation."""
    for tool in ("opusenc", "opusdec", "opusinfo", "c2enc", "c2dec"):
        assert shutil.which(tool), f"{tool} missing: run scripts/setup.sh (apt-get install opus-tools codec2)"


def test_opus_and_codec2_run_for_real(speech):
    results = {}
    for b in parse_baselines("opus:6,opus:12,codec2:3200,codec2:700C"):
        decoded, kbps = b.run(speech, 16000)
        assert abs(len(decoded) - len(speech)) < 0.05 * 16000  # codec2 drops the last partial frame
        results[b.name] = (score(speech, decoded, 16000, max_shift=800), kbps)
    # hard CBR: the payload rate is the one asked for
    assert results["Opus 6 kbps"][1] == pytest.approx(6.0, rel=0.03)
    assert results["Opus 12 kbps"][1] == pytest.approx(12.0, rel=0.03)
    # codec2's bit file is exactly its bitrate (700C packs 28-bit frames in 4 bytes: 800 bit/s on disk)
    assert results["Codec2 3200"][1] == pytest.approx(3.2, rel=0.03)
    assert results["Codec2 700C"][1] == pytest.approx(0.8, rel=0.03)
    for name, (m, _) in results.items():
        assert 1.0 <= m["pesq"] < 4.3, (name, m)  # really coded: well below identity
        assert 0.3 < m["stoi"] < 0.999, (name, m)
    # more bits, better quality: the codecs really ran at the requested rates
    assert results["Opus 12 kbps"][0]["pesq"] > results["Opus 6 kbps"][0]["pesq"]
    assert results["Codec2 3200"][0]["stoi"] > results["Codec2 700C"][0]["stoi"]


def test_parse_baselines_validates():
    names = [b.name for b in parse_baselines("opus:6, opus:6 ,codec2:700c,identity")]
    assert names == ["Opus 6 kbps", "Codec2 700C", "identity"]
    assert parse_baselines("none") == []
    for bad in ("opus:3", "opus:x", "codec2:999", "mp3:128"):
        with pytest.raises(BaselineError):
            parse_baselines(bad)


# --- runner, report --------------------------------------------------------------------------------
def _tiny_codec(name: str = "grvq_4cb"):
    """A tiny codec without the k-means warm start (fast); the evaluation path is the same."""
    from neurocodec.codecs.checkpoint import build_codec
    from neurocodec.config import load_config

    return build_codec(load_config(name, "tiny")["model"], name=f"{name}:tiny").eval()


def test_evaluate_one_row_per_system_and_bad_clip_reported(speech_clips, tmp_path):
    bad = tmp_path / "corrupt.wav"
    bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEjunk")
    short = tmp_path / "short.wav"  # readable but too short for PESQ: every system fails on it
    sf.write(short, 0.01 * np.random.default_rng(0).standard_normal(400).astype(np.float32), 16000)
    clips = [Utterance(id=p.stem, path=str(p)) for p in speech_clips]
    clips.insert(1, Utterance(id="corrupt", path=str(bad)))
    clips.append(Utterance(id="short", path=str(short)))
    result = evaluate(_tiny_codec(), clips, None, parse_baselines("identity,opus:6,codec2:3200"),
                      model_spec="grvq_4cb:tiny", progress=False)
    payload = result.to_json()
    names = [r["system"] for r in payload["systems"]]
    assert names == ["ours K=4", "identity", "Opus 6 kbps", "Codec2 3200"]
    rows = {r["system"]: r for r in payload["systems"]}
    assert all(r["n_clips"] == 2 for r in rows.values())
    assert rows["identity"]["pesq"]["mean"] == pytest.approx(4.64, abs=0.01)
    assert rows["ours K=4"]["kbps"] == pytest.approx(2.0)  # 4 x log2(1024) x 50 / 1000
    assert rows["Opus 6 kbps"]["pesq"]["mean"] < rows["identity"]["pesq"]["mean"]
    ci = rows["Opus 6 kbps"]["pesq"]["ci95"]
    assert ci[0] <= rows["Opus 6 kbps"]["pesq"]["mean"] <= ci[1]
    # the corrupt file is one error for the clip; the short one an error per system; nothing fatal
    clip_errors = [e for e in payload["errors"] if e["clip"] == "corrupt"]
    assert len(clip_errors) == 1 and clip_errors[0]["system"] is None and "cannot read" in clip_errors[0]["error"]
    assert {e["system"] for e in payload["errors"] if e["clip"] == "short"} == set(names)
    assert payload["data"]["n_clips"] == 4
    # codebook usage over the set, one entry per codebook
    usage = payload["codebooks"]["K=4"]
    assert len(usage) == 4 and all(0 < u["usage"] <= 1 and u["cardinality"] == 1024 for u in usage)
    assert sum(u["codes_seen"] for u in usage) == 4 * sum(
        -(-len(load_audio(p, 16000)[0]) // 320) for p in speech_clips)
    assert payload["model"]["trained"] is False

    from neurocodec.eval.report import write_report

    paths = write_report(result, tmp_path / "report")
    saved = json.loads(paths["json"].read_text())
    assert [r["system"] for r in saved["systems"]] == names
    md = paths["markdown"].read_text()
    assert "UNTRAINED" in md and "corrupt" in md and "| Opus 6 kbps |" in md
    for key in ("pesq_vs_kbps", "spectrograms", "codebook_usage"):
        data = paths[key].read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
        assert f"({paths[key].name})" in md


def test_variable_bitrate_rows_per_k(speech_clips):
    codec = _tiny_codec("rvq_8cb")
    ks = codec.allowed_num_codebooks()
    pick = [ks[0], ks[-1]]
    result = evaluate(codec, [Utterance(id="a", path=str(speech_clips[0]))], pick, [], progress=False)
    rows = result.to_json()["systems"]
    assert [r["num_codebooks"] for r in rows] == pick
    assert rows[0]["kbps"] < rows[1]["kbps"]
    assert set(result.codebooks) == {f"K={k}" for k in pick}
    assert len(result.codebooks[f"K={pick[-1]}"]) == pick[-1]
    assert codec.num_codebooks == max(ks)  # restored after the run


def test_narrow_band_material_is_scored_at_8k_with_pesq_nb(speech, tmp_path):
    from neurocodec.audio import resample
    import torch

    narrow = tmp_path / "phone.wav"
    sf.write(narrow, resample(torch.from_numpy(speech)[None], 16000, 8000)[0].numpy(), 8000)
    result = evaluate(_tiny_codec(), [Utterance(id="phone", path=str(narrow))], None,
                      parse_baselines("identity,codec2:3200"), progress=False)
    payload = result.to_json()
    assert payload["scoring"]["sample_rate"] == 8000 and "narrow" in payload["scoring"]["pesq"]
    rows = {r["system"]: r for r in payload["systems"]}
    assert rows["identity"]["pesq"]["mean"] > 4.4  # top of the P.862 scale
    assert rows["Codec2 3200"]["pesq"]["mean"] == pytest.approx(rows["Codec2 3200"]["pesq_nb"]["mean"])
    assert rows["ours K=4"]["n_clips"] == 1


def test_find_clips_folder_manifest_and_errors(tmp_path, speech_clips):
    for i, p in enumerate(speech_clips):
        shutil.copy(p, tmp_path / f"clip{i}{p.suffix}")
    (tmp_path / "notes.txt").write_text("not audio")
    assert [c.id for c in find_clips(tmp_path)] == ["clip0", "clip1"]
    assert len(find_clips(tmp_path, max_clips=1)) == 1
    from neurocodec.errors import UserError

    with pytest.raises(UserError, match="manifest"):
        find_clips(tmp_path, split="test")
    with pytest.raises(UserError):
        find_clips(tmp_path / "missing")


# --- the command ------------------------------------------------------------------------------------
def test_eval_cli_end_to_end(speech_clips, tmp_path, capsys):
    manifest = tmp_path / "manifest.jsonl"
    rows = [{"id": f"clip{i}", "path": str(p), "split": "test"} for i, p in enumerate(speech_clips)]
    rows.insert(1, {"id": "missing", "path": str(tmp_path / "nowhere.flac"), "split": "test"})
    rows.append({"id": "train-only", "path": str(speech_clips[0]), "split": "train"})
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out_json, report = tmp_path / "eval.json", tmp_path / "report"
    rc = main(["eval", "--model", "grvq_4cb:tiny", "--data", str(manifest), "--split", "test",
               "--baselines", "opus:6,codec2:3200", "--json", str(out_json), "--report", str(report), "--visqol"])
    printed = capsys.readouterr().out
    assert rc == 0
    payload = json.loads(out_json.read_text())
    assert [r["system"] for r in payload["systems"]] == ["ours K=4", "Opus 6 kbps", "Codec2 3200"]
    assert payload["data"]["n_clips"] == 3 and payload["data"]["n_scored"] == 2
    assert [e["clip"] for e in payload["errors"]] == ["missing"]
    assert "| ours K=4 | 2.00 |" in printed and "error: missing" in printed and "UNTRAINED" in printed
    assert "- target PESQ-WB at 2 kbps >= Opus 6 kbps: ours K=4 (2.00 kbps)" in printed
    assert (report / "report.md").is_file() and (report / "spectrograms.png").is_file()
    assert json.loads((report / "results.json").read_text())["systems"] == payload["systems"]
    scored = [c["systems"] for c in payload["clips"] if "systems" in c]
    diffs = [c["ours K=4"]["pesq"] - c["Opus 6 kbps"]["pesq"] for c in scored]
    assert f"(paired over the 2 clips: {np.mean(diffs):+.3f} ± " in (report / "report.md").read_text()
    assert all(1.0 <= m["visqol"] <= 5.0 for c in scored for m in c.values())  # --visqol: every system, every clip
    assert "| ViSQOL | clips |" in printed and "visqol" in payload["scoring"]
    assert "--visqol" in (report / "report.md").read_text()  # the command that reproduces the report
    start = payload["model"]["stream_start_overshoot_db"]
    assert list(start) == ["-60", "-40", "-30"] and all(np.isfinite(v) for v in start.values())
    assert f"is {start['-60']:+.1f} dB, " in (report / "report.md").read_text()


def test_eval_cli_says_which_clips_were_too_short_for_visqol(speech, tmp_path, capsys):
    sf.write(tmp_path / "long.wav", speech, 16000)
    sf.write(tmp_path / "short.wav", speech[:8000], 16000)
    assert main(["eval", "--model", "grvq_4cb:tiny", "--data", str(tmp_path), "--baselines", "none", "--visqol"]) == 0
    printed = capsys.readouterr().out
    assert "note: no ViSQOL for 1 clip/system pair(s), e.g. short [ours K=4]: ViSQOL needs at least 0.65 s" in printed


def test_paired_difference_uses_only_clips_both_systems_scored():
    from neurocodec.eval.report import paired_difference

    clips = [{"systems": {"a": {"pesq": 2.0}, "b": {"pesq": 1.5}}},
             {"systems": {"a": {"pesq": 1.0}, "b": {"pesq": 1.3}}},
             {"systems": {"a": {"pesq": 1.8}, "b": {"pesq": 1.6}}},
             {"systems": {"a": {"pesq": 4.5}}},  # b failed on this clip: not a pair
             {"systems": {"b": {"pesq": 1.0}}}]
    diff = paired_difference({"clips": clips}, "a", "b")
    assert diff["n"] == 3 and diff["mean"] == pytest.approx((0.5 - 0.3 + 0.2) / 3)
    lo, hi = diff["ci95"]
    t_975_2 = 4.303  # Student t quantile, 2 degrees of freedom
    assert lo < diff["mean"] < hi
    assert (hi - lo) / 2 == pytest.approx(t_975_2 * np.std([0.5, -0.3, 0.2], ddof=1) / 3 ** 0.5, rel=1e-3)


def test_usage_target_line_says_how_many_codes_per_entry_the_set_had():
    from neurocodec.codecs.quantizers import uniform_usage
    from neurocodec.eval.report import target_lines

    assert uniform_usage(8192, 8192) == pytest.approx(1 - np.exp(-1), abs=1e-4)
    rows = [{"codebook": 0, "cardinality": 8192, "usage": 0.388, "codes_seen": 4225},
            {"codebook": 1, "cardinality": 8192, "usage": 0.96, "codes_seen": 37851}]
    (line,) = target_lines({"systems": [], "codebooks": {"K=2": rows}})
    assert "smallest usage 38.8% over 4,225 codes, 0.5 per entry (uniform codes would use 40%)" in line
    assert line.endswith("**not met**")
    (line,) = target_lines({"systems": [], "codebooks": {"K=1": rows[1:]}})
    assert "4.6 per entry (uniform codes would use 99%)" in line and line.endswith("**met**")


@pytest.mark.parametrize("argv, message", [
    (["--baselines", "opus:2"], "Opus codes mono"),
    (["--max-clips", "0"], "--max-clips"),
    (["--data", "/nonexistent/dir"], "neither a folder"),
])
def test_eval_cli_user_errors(argv, message, capsys, tmp_path):
    args = ["eval", "--model", "grvq_4cb:tiny", "--data", str(tmp_path)] + argv
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


# --- benchmarks -------------------------------------------------------------------------------------
def test_benchmarks_markdown_from_results(tmp_path):
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        import common
    finally:
        sys.path.pop(0)
    figs = [common.figure("encode+decode speed", 120.0, "x real time", reference="encodec", reference_value=40.0,
                          target="single_stream_speed"),
            common.figure("p99 latency", 35.0, "ms", target="served_p99_latency")]
    assert figs[0]["ratio"] == pytest.approx(3.0) and figs[0]["met"] is True and figs[1]["met"] is False
    common.write_result("codec_speed", {"title": "Codec speed", "figures": figs}, quick=True, out_dir=tmp_path)
    common.write_result("legacy", {"throughput": 12.5, "note": "no figures", "gan": {"median_step_s": 0.25}},
                        out_dir=tmp_path)
    (tmp_path / "broken.json").write_text("{not json")
    data = json.loads((tmp_path / "codec_speed.json").read_text())
    assert data["machine"]["cpu_count"] and data["versions"]["torch"] and data["date"] and data["quick"] is True

    from neurocodec.eval.benchmarks import write_benchmarks_md

    md = write_benchmarks_md(tmp_path, tmp_path / "BENCHMARKS.md", {"serve_latency": "exit code 1"}).read_text()
    assert "## Codec speed" in md and "| 3 x |" in md and "**met**" in md and "**not met**" in md
    assert "serve_latency" in md and "| throughput | 12.5 |" in md and "| gan.median_step_s | 0.25 |" in md
    assert "unreadable" in md
    assert data["machine"]["cpu_model"] in md


def test_the_default_model_is_described_as_the_trained_checkpoint_it_is():
    """`--model default` names the shipped weights: reports must not call it untrained."""
    from neurocodec.codecs.checkpoint import DEFAULT_MODEL_PATH, file_sha256, load_codec
    from neurocodec.eval.runner import model_description

    described = model_description(load_codec("default"), "default")
    assert described["trained"] is True and "note" not in described
    assert described["checkpoint_sha256"] == file_sha256(DEFAULT_MODEL_PATH)
    assert int(described["checkpoint_metadata"]["total_steps"]) > 0
    assert model_description(load_codec("grvq_4cb:tiny"), "grvq_4cb:tiny")["trained"] is False


def test_spectrogram_figure_draws_the_panels_it_is_given(tmp_path):
    """plot_spectrograms: by default original / ours / Opus from an eval example; with `panels`, one row per given
    signal (several models on one clip), so the figure grows with them."""
    from PIL import Image

    from neurocodec.eval.plots import plot_spectrograms

    rng = np.random.default_rng(0)
    ref = rng.standard_normal(8000).astype(np.float32) * 0.1
    example = {"clip": "c", "sample_rate": 16000, "reference": ref, "decoded": {"ours K=4": ref * 0.5}}
    two = plot_spectrograms(example, tmp_path / "two.png")
    four = plot_spectrograms(example, tmp_path / "four.png",
                             panels=[(f"model {i}", ref * (i + 1) / 4) for i in range(4)])
    h2, h4 = Image.open(two).size[1], Image.open(four).size[1]
    assert h4 > 1.6 * h2, (h2, h4)
