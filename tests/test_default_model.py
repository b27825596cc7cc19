"""The pretrained model shipped in the package: `--model default`, and every command's default."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from neurocodec.audio import load_audio
from neurocodec.cli import main
from neurocodec.codecs import checkpoint
from neurocodec.codecs.checkpoint import DEFAULT_MODEL_PATH, load_codec, read_metadata
from neurocodec.errors import UserError
from neurocodec.serve.client import CodecClient
from neurocodec.serve.server import ServerOptions, ServerThread
from neurocodec.tokens.reader import TokenDataset


def test_shipped_weights_are_a_trained_grvq_4cb():
    assert DEFAULT_MODEL_PATH.is_file()
    assert DEFAULT_MODEL_PATH.stat().st_size <= 25 * 2**20  # the limit
    meta = read_metadata(DEFAULT_MODEL_PATH)
    assert meta["format"] == checkpoint.FORMAT
    codec = load_codec("default")
    assert codec.name == "default" and codec.bitrate == 2000.0 and codec.num_codebooks == 4
    # Trained, not the seeded config-only model: the weights differ from a fresh build of the same config.
    fresh = load_codec("grvq_4cb:tiny")
    assert checkpoint.weights_sha256(codec) != checkpoint.weights_sha256(fresh)


def test_shipped_model_opens_streams_without_a_click():
    """Stream-start priming (codecs/stream_start.py): a stream that opens on noise starts near the input's level
    (loudest frame of the first 200 ms: +2.0 / +1.5 / +1.4 dB at -60 / -40 / -30 dBFS for step 124,720), where the
    zero-state start of the same weights is louder (+3.0 / +3.8 / +5.6 dB; step 122,720's: +17 dB at -30 dBFS)."""
    from neurocodec.eval.metrics import STREAM_START_LEVELS_DBFS, stream_start_overshoot_db

    codec = load_codec("default")
    assert codec.config.stream_start == "mirror"
    for level in STREAM_START_LEVELS_DBFS:
        assert stream_start_overshoot_db(codec, level) < 3.0, level
    primed = stream_start_overshoot_db(codec, -30.0)
    codec.config.stream_start = "none"
    try:
        assert stream_start_overshoot_db(codec, -30.0) > primed + 3.0  # what priming removes
    finally:
        codec.config.stream_start = "mirror"


def test_missing_default_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(checkpoint, "DEFAULT_MODEL_PATH", tmp_path / "absent.safetensors")
    with pytest.raises(UserError, match="default model is not installed"):
        load_codec("default")


def test_commands_use_the_default_model_when_none_is_named(speech_wav, tmp_path):
    codes_path, out_wav = tmp_path / "codes.npy", tmp_path / "out.wav"
    assert main(["encode", str(speech_wav), "-o", str(codes_path)]) == 0
    codes = np.load(codes_path)
    expected = load_codec("default").encode(load_audio(speech_wav, 16000).unsqueeze(0))[0].numpy()
    assert np.array_equal(codes, expected)
    assert main(["decode", str(codes_path), "-o", str(out_wav), "--model", "default"]) == 0
    r = subprocess.run([sys.executable, "-m", "neurocodec.cli", "info"], capture_output=True, text=True)
    assert r.returncode == 0 and "default" in r.stdout and "2.000 kbps" in r.stdout


def test_serve_stream_and_export_with_the_default_model(speech_wav, tmp_path):
    codec = load_codec("default")
    audio = load_audio(speech_wav, 16000)[0].numpy()
    srv = ServerThread(ServerOptions(models=["default"], port=0, max_streams=2, grace_s=1.0))
    srv.start()
    try:
        with CodecClient(f"127.0.0.1:{srv.port}") as client:
            assert client.model_info("").name == "default"
            chunks = [audio[i:i + 800] for i in range(0, len(audio), 800)]
            frames = list(client.stream_encode(chunks, sample_rate=16000))
        served = np.stack([f.tokens for f in frames], axis=1)
        assert np.array_equal(served, codec.encode(torch.from_numpy(audio).view(1, 1, -1))[0].numpy())
    finally:
        srv.stop()

    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "a", "path": "%s", "text": "hello"}\n' % speech_wav)
    assert main(["export", "--manifest", str(manifest), "--out", str(tmp_path / "tokens")]) == 0
    rows = list(TokenDataset(tmp_path / "tokens"))
    assert len(rows) == 1 and np.array_equal(np.asarray(rows[0]["codes"]), served)


def _script(name: str = "ship_default_model"):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_heldout_speakers_table_scores_each_speaker_against_opus(tmp_path, monkeypatch):
    """scripts/heldout_speakers.py: one eval per test_<speaker>.jsonl; the table's paired difference is the mean of
    the clip-by-clip differences in the eval's own JSON."""
    import json
    from pathlib import Path

    from neurocodec.data.manifest import read_manifest, write_manifest

    demo = read_manifest(Path(__file__).resolve().parent.parent / "data" / "demo" / "manifest.jsonl")
    corpus = tmp_path / "corpus"
    for speaker in ("june_wallack", "carlo_flora"):
        write_manifest(corpus / f"test_{speaker}.jsonl", [u for u in demo if u.speaker == speaker][:2])
    script = _script("heldout_speakers")
    monkeypatch.setattr(sys, "argv", ["heldout_speakers.py", "--model", "grvq_4cb:tiny", "--corpus", str(corpus),
                                      "--max-clips", "2", "--out", str(tmp_path / "out")])
    assert script.main() == 0
    text = (tmp_path / "out" / "heldout_speakers.md").read_text()
    for speaker in ("june_wallack", "carlo_flora"):
        payload = json.loads((tmp_path / "out" / "heldout" / f"{speaker}.json").read_text())
        diffs = [c["systems"]["ours K=4"]["pesq"] - c["systems"]["Opus 6 kbps"]["pesq"] for c in payload["clips"]]
        assert len(diffs) == 2
        row = next(line for line in text.splitlines() if line.startswith(f"| {speaker} |"))
        assert f"{sum(diffs) / 2:+.3f}" in row and row.endswith("| not met |")  # an untrained model is far below Opus
        # the ViSQOL table pairs the same clips
        diffs = [c["systems"]["ours K=4"]["visqol"] - c["systems"]["Opus 6 kbps"]["visqol"] for c in payload["clips"]]
        rows = [line for line in text.splitlines() if line.startswith(f"| {speaker} |")]
        assert len(rows) == 2 and f"| {sum(diffs) / 2:+.3f} ± " in rows[1]


def test_training_curve_follows_the_lineage_of_a_fine_tuned_run(tmp_path):
    """A run fine-tuned from the shipped model (steps_before=N) continues the shipped history at step N; points
    that an earlier ship wrote beyond N (another branch) are dropped, and a run from scratch starts anew."""
    from neurocodec.eval.plots import read_validation_curve, write_validation_curve

    history = write_validation_curve({"valid/pesq": {500.0: 1.05, 1000.0: 1.10, 1500.0: 1.07},
                                      "valid/stoi": {1000.0: 0.70}, "valid/usage_mean": {}}, tmp_path / "history.csv")
    (tmp_path / "run" / "csv").mkdir(parents=True)
    # a CSV log as Lightning writes it: training rows with gen_step, validation rows with step only
    (tmp_path / "run" / "csv" / "metrics.csv").write_text(
        "step,gen_step,train/mel,valid/pesq,valid/stoi,valid/usage_mean\n"
        "49,50,0.30,,,\n"
        "499,,,1.12,0.72,0.9\n"
        "999,,,1.15,0.74,0.92\n")
    ship = _script()
    curve, marks = ship.lineage_curve(tmp_path / "run", history, steps_before=1000)
    # validation after 500 steps is logged at Lightning's step 499: the curve says 500
    assert curve["valid/pesq"] == {500.0: 1.05, 1000.0: 1.10, 1500.0: 1.12, 2000.0: 1.15}
    assert curve["valid/stoi"] == {1000.0: 0.70, 1500.0: 0.72, 2000.0: 0.74}
    assert list(marks) == [1000]
    # shipping an earlier export of the run (--codec): its curve ends at that export's step
    earlier, _ = ship.lineage_curve(tmp_path / "run", history, steps_before=1000, until=1500)
    assert earlier["valid/pesq"] == {500.0: 1.05, 1000.0: 1.10, 1500.0: 1.12}
    # written and read back unchanged: the next fine-tuning continues from it
    assert read_validation_curve(write_validation_curve(curve, tmp_path / "again.csv")) == curve
    scratch, marks = ship.lineage_curve(tmp_path / "run", history, steps_before=0)
    assert scratch["valid/pesq"] == {500.0: 1.12, 1000.0: 1.15} and marks == {}


def test_shipped_history_ends_at_the_shipped_models_step():
    """docs/default_model/validation_history.csv is the curve of the weights in the package: it ends at their
    step, so that a run fine-tuned from them continues it at the right place."""
    from neurocodec.codecs.checkpoint import lineage_steps
    from neurocodec.eval.plots import read_validation_curve

    history = read_validation_curve(DEFAULT_MODEL_PATH.parents[2] / "docs" / "default_model" / "validation_history.csv")
    assert max(history["valid/pesq"]) == lineage_steps(read_metadata(DEFAULT_MODEL_PATH))


def test_compare_runs_pairs_checkpoints_with_the_reference_and_the_arms_at_common_steps(tmp_path):
    """scripts/compare_runs.py: a checkpoint that is the reference itself differs by exactly 0 on every clip; the
    arms are compared over the steps both have, clip by clip, from the evaluations it cached."""
    import json
    from pathlib import Path

    import numpy as np

    from neurocodec.codecs.checkpoint import build_codec, save_codec
    from neurocodec.config import load_config
    from neurocodec.data.manifest import read_manifest, write_manifest

    demo = read_manifest(Path(__file__).resolve().parent.parent / "data" / "demo" / "manifest.jsonl")
    corpus = tmp_path / "corpus"
    write_manifest(corpus / "test_june_wallack.jsonl", [u for u in demo if u.speaker == "june_wallack"][:2])
    for arm, steps in (("a", (2, 4)), ("b", (4,))):
        for step in steps:
            torch.manual_seed(step + (0 if arm == "a" else 100))
            codec = build_codec(load_config("grvq_4cb", "tiny")["model"], name="grvq_4cb:tiny").eval()
            save_codec(codec, tmp_path / arm / "exports" / f"codec_step{step:07d}.safetensors",
                       metadata={"gen_step": step})
    reference = tmp_path / "a" / "exports" / "codec_step0000002.safetensors"
    out = tmp_path / "cmp"
    script = _script("compare_runs")
    assert script.main(["--corpus", str(corpus), "--arm", f"A={tmp_path / 'a'}", "--arm", f"B={tmp_path / 'b'}",
                        "--reference", str(reference), "--max-clips", "2", "--jobs", "2", "--out", str(out)]) == 0
    text = (out / "compare.md").read_text()
    assert "| A 2 | +0.000 ± 0.000 | +0.000 |" in text  # the reference against itself
    assert "steps every arm has (4)" in text
    clips = {name: script.clip_scores(json.loads(next((out / "eval").glob(f"{name}_step4_*_june_wallack.json"))
                                                  .read_text())) for name in ("A", "B")}
    assert len(clips["A"]) == 2
    expected = np.mean([clips["B"][i] - clips["A"][i] for i in clips["A"]])
    row = next(line for line in text.splitlines() if line.startswith("| B - A |"))
    assert row.startswith(f"| B - A | {expected:+.3f} ± ")
    import matplotlib.colors
    import matplotlib.image

    figure = matplotlib.image.imread(out / "compare.png")[..., :3]  # the first table, drawn: two panels side by side
    assert figure.shape[1] > 1.5 * figure.shape[0]
    for color in ("#1f77b4", "#ff7f0e"):  # matplotlib's first two line colours: arm A's and arm B's points are drawn
        rgb = np.array(matplotlib.colors.to_rgb(color))
        assert (np.abs(figure - rgb).max(axis=-1) < 0.02).sum() > 20, f"no {color} points in compare.png"
    # another metric comes from the same cached evaluations: nothing new is scored
    cached = sorted((out / "eval").iterdir())
    assert script.main(["--corpus", str(corpus), "--arm", f"A={tmp_path / 'a'}", "--arm", f"B={tmp_path / 'b'}",
                        "--reference", str(reference), "--max-clips", "2", "--out", str(out), "--metric", "stoi"]) == 0
    assert sorted((out / "eval").iterdir()) == cached
    stoi = {name: script.clip_scores(json.loads(next((out / "eval").glob(f"{name}_step4_*_june_wallack.json"))
                                                .read_text()), "stoi") for name in ("A", "B")}
    assert all(0 < v <= 1 for v in stoi["A"].values()) and stoi["A"] != clips["A"]
    text = (out / "compare_stoi.md").read_text()
    assert "(STOI, paired per clip)" in text and (out / "compare_stoi.png").is_file()
    row = next(line for line in text.splitlines() if line.startswith("| B - A |"))
    assert row.startswith(f"| B - A | {np.mean([stoi['B'][i] - stoi['A'][i] for i in stoi['A']]):+.3f} ± ")
    # an evaluation cached before a metric existed is scored again when that metric is asked for, and only it
    stale = next((out / "eval").glob("A_step4_*_june_wallack.json"))
    payload = json.loads(stale.read_text())
    for clip in payload["clips"]:
        for row in clip["systems"].values():
            del row["pause_level_db"]
    stale.write_text(json.dumps(payload))
    others = {p: p.stat().st_mtime_ns for p in (out / "eval").iterdir() if p != stale}
    assert script.main(["--corpus", str(corpus), "--arm", f"A={tmp_path / 'a'}", "--arm", f"B={tmp_path / 'b'}",
                        "--reference", str(reference), "--max-clips", "2", "--out", str(out),
                        "--metric", "pause_level_db"]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "eval").iterdir() if p != stale} == others
    assert len(script.clip_scores(json.loads(stale.read_text()), "pause_level_db")) == 2  # both demo clips have pauses
    assert "(level in pauses, dB over the original (lower is better), paired per clip)" in \
        (out / "compare_pause_level_db.md").read_text()
    # ... and one written before streams were primed (no model.stream_start) is scored again, whatever the metric
    unprimed = next((out / "eval").glob("B_step4_*_june_wallack.json"))
    payload = json.loads(unprimed.read_text())
    del payload["model"]["stream_start"]
    unprimed.write_text(json.dumps(payload))
    others = {p: p.stat().st_mtime_ns for p in (out / "eval").iterdir() if p != unprimed}
    assert script.main(["--corpus", str(corpus), "--arm", f"A={tmp_path / 'a'}", "--arm", f"B={tmp_path / 'b'}",
                        "--reference", str(reference), "--max-clips", "2", "--out", str(out)]) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "eval").iterdir() if p != unprimed} == others
    assert json.loads(unprimed.read_text())["model"]["stream_start"] == "mirror"
    # the cache is keyed by the weights: other weights under the same arm name and step are scored anew
    save_codec(build_codec(load_config("grvq_4cb", "tiny")["model"], name="grvq_4cb:tiny").eval(),
               tmp_path / "b" / "exports" / "codec_step0000004.safetensors", metadata={"gen_step": 4})
    assert script.main(["--corpus", str(corpus), "--arm", f"B={tmp_path / 'b'}", "--reference", str(reference),
                        "--max-clips", "2", "--out", str(out)]) == 0
    assert len(list((out / "eval").glob("B_step4_*_june_wallack.json"))) == 2
    # a checkpoint whose every clip failed (weights gone NaN) is named, not turned into a crash in the report
    current = script.model_key(str(tmp_path / "b" / "exports" / "codec_step0000004.safetensors"))
    broken = out / "eval" / f"B_step4_{current}_n2_june_wallack.json"  # the file of B's weights now, not the old one
    payload = json.loads(broken.read_text())
    nan_error = "ValueError: cannot convert float NaN to integer"
    payload["errors"] = [{"clip": c["id"], "error": nan_error} for c in payload["clips"]]
    payload["clips"] = [{**c, "systems": {}} for c in payload["clips"]]
    broken.write_text(json.dumps(payload))
    with pytest.raises(SystemExit, match="no clip was scored .2 errors; first: ValueError: cannot convert float NaN"):
        script.main(["--corpus", str(corpus), "--arm", f"B={tmp_path / 'b'}", "--reference", str(reference),
                     "--max-clips", "2", "--out", str(out)])
    with pytest.raises(SystemExit, match="keep_exports"):
        script.main(["--corpus", str(corpus), "--arm", f"C={tmp_path}", "--out", str(out)])
    # a lone file that training did not write (`neurocodec average`) is an arm of step 0; two such files are refused
    for name in ("soup1", "soup2"):
        save_codec(build_codec(load_config("grvq_4cb", "tiny")["model"]).eval(), tmp_path / f"{name}.safetensors")
    assert script.arm_files(f"S={tmp_path / 'soup1.safetensors'}") == ("S", {0: tmp_path / "soup1.safetensors"})
    with pytest.raises(SystemExit, match="no gen_step metadata"):
        script.arm_files(f"S={tmp_path / 'soup*.safetensors'}")
    # ViSQOL is scored only when asked, into files of their own beside the others (reference and A at step 2)
    before = set((out / "eval").iterdir())
    assert script.main(["--corpus", str(corpus), "--arm", f"A={tmp_path / 'a'}", "--steps", "2", "--reference",
                        str(reference), "--max-clips", "2", "--out", str(out), "--metric", "visqol"]) == 0
    new = sorted(f.name for f in set((out / "eval").iterdir()) - before)
    assert len(new) == 2 and all(name.endswith("_n2_visqol_june_wallack.json") for name in new), new
    text = (out / "compare_visqol.md").read_text()
    assert "(ViSQOL, paired per clip)" in text and "| A 2 | +0.000 ± 0.000 | +0.000 |" in text
