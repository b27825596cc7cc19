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
