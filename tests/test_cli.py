"""The encode / decode / info commands, checkpoints, and clear one-line errors for bad input."""

import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch

from neurocodec.audio import load_audio
from neurocodec.cli import main
from neurocodec.codecs.checkpoint import load_codec, save_codec

from conftest import synthetic_speechlike

TINY = "grvq_4cb:tiny"


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "neurocodec.cli", *map(str, args)], capture_output=True, text=True)


def test_chunked_streaming_encode_equals_offline_default_model(speech_wav, tmp_path):
    """The issue's check, with the real default-size model and the real command line."""
    offline, streamed = tmp_path / "offline.npy", tmp_path / "streamed.npy"
    assert main(["encode", str(speech_wav), "-o", str(offline), "--model", "grvq_4cb"]) == 0
    r = run_cli("encode", speech_wav, "-o", streamed, "--model", "grvq_4cb", "--chunk-ms", 7)
    assert r.returncode == 0, r.stderr
    assert "2.00 kbps" in r.stdout
    a, b = np.load(offline), np.load(streamed)
    assert a.shape == (4, int(np.ceil(1.3 * 16000 / 320))) and np.issubdtype(a.dtype, np.integer)
    assert np.array_equal(a, b)


@pytest.mark.parametrize("chunk_ms", [0.5, 13.3, 20, 250])
def test_fractional_and_odd_chunks(tmp_path, chunk_ms):
    clip, ref, out = tmp_path / "clip.wav", tmp_path / "ref.npy", tmp_path / "out.npy"
    sf.write(clip, synthetic_speechlike(0.15 if chunk_ms < 1 else 0.7, seed=4), 16000, subtype="FLOAT")
    assert main(["encode", str(clip), "-o", str(ref), "--model", TINY]) == 0
    assert main(["encode", str(clip), "-o", str(out), "--model", TINY, "--chunk-ms", str(chunk_ms)]) == 0
    assert np.array_equal(np.load(ref), np.load(out))


def test_decode_offline_and_streaming(speech_wav, tmp_path):
    codes_path = tmp_path / "codes.npy"
    main(["encode", str(speech_wav), "-o", str(codes_path), "--model", TINY])
    codes = np.load(codes_path)
    codec = load_codec(TINY)
    expected = codec.decode(torch.from_numpy(codes.astype(np.int64)).unsqueeze(0))[0, 0].numpy()
    for extra in ([], ["--chunk-frames", "3"]):
        out = tmp_path / f"out{len(extra)}.wav"
        assert main(["decode", str(codes_path), "-o", str(out), "--model", TINY, *extra]) == 0
        audio, sr = sf.read(out)
        assert sr == 16000 and len(audio) == codes.shape[1] * 320
        np.testing.assert_allclose(audio, np.clip(expected, -1, 1), atol=2 / 32768)  # 16-bit PCM file


def test_any_rate_and_channel_count_is_accepted(tmp_path):
    stereo = np.stack([synthetic_speechlike(0.5, 44100), synthetic_speechlike(0.5, 44100, seed=1)], axis=1)
    path = tmp_path / "stereo44k.flac"
    sf.write(path, stereo, 44100)
    wav = load_audio(path, 16000)
    assert wav.shape == (1, 8000)
    assert main(["encode", str(path), "-o", str(tmp_path / "c.npy"), "--model", TINY]) == 0
    assert np.load(tmp_path / "c.npy").shape == (4, 25)


def test_num_codebooks_truncates(speech_wav, tmp_path):
    full, two = tmp_path / "full.npy", tmp_path / "two.npy"
    main(["encode", str(speech_wav), "-o", str(full), "--model", TINY])
    main(["encode", str(speech_wav), "-o", str(two), "--model", TINY, "--num-codebooks", "2"])
    assert np.array_equal(np.load(two), np.load(full)[:2])
    assert main(["encode", str(speech_wav), "-o", str(two), "--model", TINY, "--num-codebooks", "3"]) == 2


def test_info(capsys):
    assert main(["info", "--model", "grvq_4cb"]) == 0
    out = capsys.readouterr().out
    for text in ["16000 Hz", "50 Hz (320 samples per frame)", "1024, 1024, 1024, 1024", "2.000 kbps", "20 ms"]:
        assert text in out


def bad_inputs(tmp_path):
    (tmp_path / "garbage.wav").write_bytes(b"RIFF not really a wav file")
    sf.write(tmp_path / "empty.wav", np.zeros(0, dtype=np.float32), 16000)
    nan = synthetic_speechlike(0.2)
    nan[100] = np.nan
    sf.write(tmp_path / "nan.wav", nan, 16000, subtype="FLOAT")
    np.save(tmp_path / "codes3d.npy", np.zeros((1, 4, 5), dtype=np.int32))
    np.save(tmp_path / "float.npy", np.zeros((4, 5), dtype=np.float32))
    np.save(tmp_path / "range.npy", np.full((4, 5), 1024, dtype=np.int32))
    np.save(tmp_path / "three.npy", np.zeros((3, 5), dtype=np.int32))
    (tmp_path / "notnpy.npy").write_text("hello")
    return [
        (["encode", tmp_path / "missing.wav"], "cannot read audio"),
        (["encode", tmp_path / "garbage.wav"], "cannot read audio"),
        (["encode", tmp_path / "empty.wav"], "no audio samples"),
        (["encode", tmp_path / "nan.wav"], "NaN or Inf"),
        (["decode", tmp_path / "codes3d.npy"], "[K, T]"),
        (["decode", tmp_path / "float.npy"], "integers"),
        (["decode", tmp_path / "range.npy"], "out of range"),
        (["decode", tmp_path / "three.npy"], "codebooks"),
        (["decode", tmp_path / "notnpy.npy"], "not a readable .npy"),
    ]


def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path, capsys):
    for args, message in bad_inputs(tmp_path):
        code = main([str(a) for a in args] + ["-o", str(tmp_path / "out"), "--model", TINY])
        err = capsys.readouterr().err
        assert code == 2, args
        assert message in err and err.count("\n") == 1, (args, err)


def test_bad_input_through_the_real_command_has_no_traceback(tmp_path):
    bad_inputs(tmp_path)
    r = run_cli("encode", tmp_path / "nan.wav", "-o", tmp_path / "x.npy", "--model", TINY)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("neurocodec encode: error:"), r.stderr
    r = run_cli("info", "--model", "no_such_config")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "no config named" in r.stderr, r.stderr


def test_checkpoint_round_trip(speech_wav, tmp_path):
    codec = load_codec(TINY)
    path = save_codec(codec, tmp_path / "model.safetensors")
    again = load_codec(str(path))
    wav = load_audio(speech_wav, 16000).unsqueeze(0)
    assert torch.equal(codec.encode(wav), again.encode(wav))
    assert again.info()["bitrate_bps"] == codec.info()["bitrate_bps"]
    assert main(["encode", str(speech_wav), "-o", str(tmp_path / "c.npy"), "--model", str(path)]) == 0
    (tmp_path / "broken.safetensors").write_bytes(b"\x00" * 20)
    assert main(["info", "--model", str(tmp_path / "broken.safetensors")]) == 2


def test_a_config_extends_another_and_states_only_how_it_differs(tmp_path):
    from neurocodec.config import ConfigError, load_config

    base, variant = load_config("semanticodec", "tiny"), load_config("semanticodec_25tps", "tiny")
    assert base["model"]["seanet"]["strides"] == [2, 4, 5, 8] and variant["model"]["seanet"]["strides"] == [2, 4, 5, 8, 4]
    assert variant["model"]["seanet"]["channels"] == 8  # the base's tiny preset applies to the variant
    assert variant["teacher"] == base["teacher"] and variant["data"]["segment_seconds"] == 1.28
    (tmp_path / "base.yaml").write_text("model: {seanet: {channels: 32, dimension: 64}}\n"
                                        "presets: {tiny: {model: {seanet: {channels: 4}}}}\n")
    (tmp_path / "child.yaml").write_text("extends: base.yaml\nmodel: {seanet: {dimension: 16}}\n")
    child = load_config(tmp_path / "child.yaml", "tiny")
    assert child["model"]["seanet"] == {"channels": 4, "dimension": 16} and child["name"] == "child"
    (tmp_path / "base.yaml").write_text("extends: child.yaml\n")
    with pytest.raises(ConfigError, match="circle"):
        load_config(tmp_path / "child.yaml")
