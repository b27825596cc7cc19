"""The encode / decode / info commands, checkpoints, and clear one-line errors for bad input."""

import json
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


def test_average_weights_codec_files_of_one_network(speech_wav, tmp_path, capsys):
    """`neurocodec average`: every floating tensor is the weighted mean of the inputs', the result is a codec file
    that loads and encodes, an average of a file with itself is that file, and mismatched inputs are refused."""
    from safetensors.torch import load_file

    from neurocodec.codecs.checkpoint import build_codec, read_metadata
    from neurocodec.config import load_config

    paths = []
    for seed in (1, 2):
        codec = build_codec(load_config("grvq_4cb", "tiny")["model"], name="grvq_4cb:tiny").eval()
        with torch.no_grad():  # the config seeds the weights: make the two files differ as two fine-tunes would
            noise = torch.Generator().manual_seed(seed)
            for tensor in codec.state_dict().values():  # parameters and EMA codebooks (buffers)
                if tensor.is_floating_point():
                    tensor.add_(0.01 * torch.randn(tensor.shape, generator=noise))
        paths.append(save_codec(codec, tmp_path / f"seed{seed}.safetensors", metadata={"total_steps": 10 * seed}))
    out = tmp_path / "avg.safetensors"
    # codebooks that differ are not averaged unless asked: by default the command refuses and says what to choose
    assert main(["average", str(paths[0]), str(paths[1]), "-o", str(out)]) == 2
    assert "--codebooks-from N" in capsys.readouterr().err and not out.exists()
    assert main(["average", str(paths[0]), str(paths[1]), "--weights", "1", "3", "--codebooks-from", "2",
                 "-o", str(out)]) == 0
    a, b, avg = (load_file(str(p)) for p in (*paths, out))
    floating = [k for k in a if a[k].is_floating_point()]
    codebooks = [k for k in floating if k.startswith("quantizer.")]
    assert codebooks and all(not torch.equal(a[k], b[k]) for k in floating)
    for k in floating:
        expected = b[k] if k in codebooks else 0.25 * a[k] + 0.75 * b[k]
        torch.testing.assert_close(avg[k], expected, rtol=0, atol=1e-6)
    sources = json.loads(read_metadata(out)["averaged_from"])
    assert [s["weight"] for s in sources] == [0.25, 0.75] and read_metadata(out)["total_steps"] == "20"
    assert main(["average", str(paths[0]), str(paths[1]), "--average-codebooks", "-o", str(out)]) == 0
    avg = load_file(str(out))
    torch.testing.assert_close(avg[codebooks[0]], 0.5 * a[codebooks[0]] + 0.5 * b[codebooks[0]], rtol=0, atol=1e-6)
    assert load_codec(str(out)).encode(load_audio(speech_wav, 16000).unsqueeze(0)).shape[1] == 4
    same = tmp_path / "same.safetensors"
    assert main(["average", str(paths[0]), str(paths[0]), "-o", str(same)]) == 0
    wav = load_audio(speech_wav, 16000).unsqueeze(0)
    assert torch.equal(load_codec(str(same)).encode(wav), load_codec(str(paths[0])).encode(wav))
    # a file written before an option existed (its config lacks the key) averages with one that has its default
    from safetensors.torch import save_file

    meta = read_metadata(paths[1])
    config = json.loads(meta["config"])
    del config["seanet"]["decoder_snake"]
    older = tmp_path / "older.safetensors"
    save_file(load_file(str(paths[1])), str(older), metadata={**meta, "config": json.dumps(config)})
    assert main(["average", str(paths[0]), str(older), "--codebooks-from", "1", "-o", str(same)]) == 0
    other = save_codec(load_codec("fsq:tiny"), tmp_path / "fsq.safetensors")
    for bad, message in (([paths[0]], "at least two"), ([paths[0], other], "different configs"),
                         ([paths[0], paths[1], "--weights", "1"], "1 weights for 2 files"),
                         ([paths[0], paths[1], "--weights", "1", "-1"], "non-negative"),
                         ([paths[0], paths[1], "--codebooks-from", "3"], "there are 2 inputs")):
        assert main(["average", *map(str, bad), "-o", str(tmp_path / "bad.safetensors")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("neurocodec average: error:") and message in err, err
    assert not (tmp_path / "bad.safetensors").exists()
