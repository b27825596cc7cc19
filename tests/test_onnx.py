"""Streaming ONNX export (neurocodec/codecs/onnx_streaming.py): the exported steps, run in ONNX Runtime frame by
frame, give the codes and audio of the PyTorch codec, for every audio family, several streams at once and
multi-frame steps; bad input gets clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from neurocodec.audio import load_audio
from neurocodec.cli import main as cli_main
from neurocodec.codecs.checkpoint import build_codec, load_codec
from neurocodec.codecs.onnx_streaming import OnnxStreamingCodec, export_streaming_onnx
from neurocodec.config import load_config
from neurocodec.data.manifest import read_manifest
from neurocodec.errors import CodesError, UserError

from conftest import synthetic_speechlike

DEMO = Path(__file__).resolve().parents[1] / "data" / "demo" / "manifest.jsonl"


@pytest.fixture(scope="module")
def default_codec():
    return load_codec("default")


@pytest.fixture(scope="module")
def speech(default_codec):
    """The first three demo utterances of at least 2.4 s, cut to 2.4 s (120 frames): three streams [3, 1, N]."""
    n = 120 * default_codec.frame_size
    clips = [wav[0, :n] for wav in (load_audio(u.path, 16000) for u in read_manifest(DEMO)) if wav.shape[-1] >= n]
    return torch.stack(clips[:3]).unsqueeze(1)


@pytest.fixture(scope="module")
def exported(default_codec, tmp_path_factory):
    return export_streaming_onnx(default_codec, tmp_path_factory.mktemp("onnx"))


def run_onnx(folder, audio: np.ndarray, frames_per_call: int):
    """Encode then decode B streams through the ONNX steps, `frames_per_call` frames a call."""
    onnx = OnnxStreamingCodec(folder)
    width = frames_per_call * onnx.frame_size
    with onnx.streaming(audio.shape[0]):
        codes = np.concatenate([onnx.encode_step(audio[..., i:i + width]) for i in range(0, audio.shape[-1], width)], -1)
    with onnx.streaming(audio.shape[0]):
        decoded = np.concatenate([onnx.decode_step(codes[..., i:i + frames_per_call])
                                  for i in range(0, codes.shape[-1], frames_per_call)], -1)
    return codes, decoded


def test_default_model_streams_three_speakers_like_pytorch(default_codec, speech, exported):
    codes, decoded = run_onnx(exported, speech.numpy(), frames_per_call=1)
    with torch.no_grad():
        offline_codes = default_codec.encode(speech).numpy()  # exact (float64) encoding, see the module docstring
        offline_audio = default_codec.decode(torch.from_numpy(codes)).numpy()
    assert codes.shape == offline_codes.shape == (3, default_codec.num_codebooks, 120)
    # float32 against float64 encoding may flip a code at a cell boundary; on real speech that is rare
    assert (codes == offline_codes).mean() >= 0.99
    assert np.abs(decoded - offline_audio).max() < 1e-5  # same codes -> same audio (DESIGN: within 1e-5)
    info = json.loads((exported / "streaming.json").read_text())
    assert info["frames_per_step"] == 1 and info["batch_size"] is None and info["num_codebooks"] == 4


def test_streams_are_independent(exported, speech):
    """A stream's codes do not depend on what its neighbours in the batch carry."""
    together, _ = run_onnx(exported, speech.numpy(), frames_per_call=1)
    alone, _ = run_onnx(exported, speech[1:2].numpy(), frames_per_call=1)
    assert np.array_equal(together[1:2], alone)


@pytest.mark.parametrize("frames_per_step,frames_per_call", [(2, 2), (2, 6)])
def test_multi_frame_steps_for_a_fixed_batch(default_codec, speech, exported, tmp_path, frames_per_step, frames_per_call):
    folder = export_streaming_onnx(default_codec, tmp_path, frames_per_step=frames_per_step, batch_size=1)
    codes, decoded = run_onnx(folder, speech[:1].numpy(), frames_per_call)
    one_frame_codes, one_frame_audio = run_onnx(exported, speech[:1].numpy(), frames_per_call=1)
    assert np.array_equal(codes, one_frame_codes)
    assert np.abs(decoded - one_frame_audio).max() < 1e-5
    with pytest.raises(UserError, match="exactly 1 stream"):
        with OnnxStreamingCodec(folder).streaming(2):
            pass


def test_streams_are_primed_and_an_unprimed_export_is_read_as_such(default_codec, speech, tmp_path):
    """The graphs are unprimed steps; the runner primes each stream (codecs/stream_start.py), with one-frame graphs
    when a step has several frames. A codec set to `stream_start: none` exports without them, and its streams start
    from zero state, as do folders exported before priming existed (no `stream_start` in streaming.json)."""
    audio = speech[:1].numpy()
    folder = export_streaming_onnx(default_codec, tmp_path, frames_per_step=2)
    info = json.loads((folder / "streaming.json").read_text())
    assert info["stream_start"] == "mirror" and (folder / info["prime_graphs"]["encode"]).is_file()
    primed_codes, primed_audio = run_onnx(folder, audio, frames_per_call=2)
    with torch.no_grad():
        assert (primed_codes == default_codec.encode(speech[:1]).numpy()).mean() >= 0.99
        assert np.abs(primed_audio - default_codec.decode(torch.from_numpy(primed_codes)).numpy()).max() < 1e-5
    default_codec.config.stream_start = "none"
    try:
        folder = export_streaming_onnx(default_codec, tmp_path, frames_per_step=2)  # the same folder again
        with torch.no_grad():
            unprimed_codes = default_codec.encode(speech[:1]).numpy()
            codes, decoded = run_onnx(folder, audio, frames_per_call=2)
            unprimed_audio = default_codec.decode(torch.from_numpy(codes)).numpy()
    finally:
        default_codec.config.stream_start = "mirror"
    info = json.loads((folder / "streaming.json").read_text())
    assert info["stream_start"] == "none" and info["prime_graphs"] is None
    assert not (folder / "encode_prime.onnx").exists() and not (folder / "decode_prime.onnx").exists()
    assert (codes == unprimed_codes).mean() >= 0.99 and np.abs(decoded - unprimed_audio).max() < 1e-5
    assert not np.array_equal(codes, primed_codes)
    del info["stream_start"], info["prime_graphs"]  # as written before priming existed
    (folder / "streaming.json").write_text(json.dumps(info))
    assert np.array_equal(run_onnx(folder, audio, frames_per_call=2)[0], codes)


@pytest.mark.parametrize("name", ["rvq_8cb", "fsq", "semanticodec_25tps", "xy_single", "xy_single+thresholds",
                                  "grvq_4cb+snake"])
def test_every_audio_family_exports(name, tmp_path):
    """Tiny random models of the other families (and the Snake decoder): ONNX steps equal PyTorch's float32
    streaming steps."""
    name, _, extra = name.partition("+")
    overrides = ["model.seanet.decoder_snake=true"] if extra == "snake" else []
    codec = build_codec(load_config(name, "tiny", overrides)["model"], name=f"{name}:tiny").train()
    if extra == "thresholds":  # xy_single as its stage 2 leaves it: LFQ bits cut at fitted per-prefix thresholds
        with torch.no_grad():
            latent = codec.eval().encoder(torch.from_numpy(synthetic_speechlike(4.0, seed=3)[None, None]).float())
        codec.quantizer.fit_thresholds(latent.transpose(1, 2).reshape(-1, latent.shape[1]))
        codec.train()
    codec.set_exact_encoding(True)
    folder = export_streaming_onnx(codec, tmp_path)  # exported in eval mode and float32 ...
    assert codec.training and codec.encoder_dtype == torch.float64  # ... and the codec is left as it was
    codec.eval()
    n = 10 * codec.frame_size
    audio = np.stack([synthetic_speechlike(n / 16000, seed=s)[:n] for s in (1, 2)])[:, None]
    codes, decoded = run_onnx(folder, audio, frames_per_call=1)
    codec.set_exact_encoding(False)
    with torch.no_grad(), codec.streaming(2):
        torch_codes = torch.cat([codec.encode_step(torch.from_numpy(audio[..., i:i + codec.frame_size]))
                                 for i in range(0, n, codec.frame_size)], -1).numpy()
    with torch.no_grad():
        torch_audio = codec.decode(torch.from_numpy(codes)).numpy()
    assert np.array_equal(codes, torch_codes)
    assert np.abs(decoded - torch_audio).max() < 1e-5


def test_bad_input_gets_clear_errors(exported, tmp_path):
    onnx = OnnxStreamingCodec(exported)
    with onnx.streaming(1):
        with pytest.raises(UserError, match=r"whole steps of 1 frame\(s\) of 320 samples"):
            onnx.encode_step(np.zeros((1, 1, 500), np.float32))
        with pytest.raises(CodesError, match=r"code 1024 at stream 0, codebook 2, frame 0 is outside \[0, 1024\)"):
            onnx.decode_step(np.array([[[0], [0], [1024], [0]]]))
        with pytest.raises(CodesError, match=r"codes must be \[B, 4, n \* 1\]"):
            onnx.decode_step(np.zeros((1, 2, 1), np.int64))
        # a rejected call leaves the stream where it was: the next good frame decodes as in a fresh stream
        good = onnx.decode_step(np.zeros((1, 4, 1), np.int64))
    with onnx.streaming(1):
        assert np.array_equal(onnx.decode_step(np.zeros((1, 4, 1), np.int64)), good)
    with pytest.raises(RuntimeError, match="outside a streaming context"):
        onnx.encode_step(np.zeros((1, 1, 320), np.float32))
    with pytest.raises(UserError, match="no streaming.json"):
        OnnxStreamingCodec(tmp_path)
    image = build_codec(load_config("image_fsq", "tiny")["model"])
    with pytest.raises(UserError, match="image codec"):
        export_streaming_onnx(image, tmp_path / "image")


def test_export_onnx_command(tmp_path, capsys):
    assert cli_main(["export-onnx", "--model", "default", "-o", str(tmp_path / "out"), "--batch-size", "1"]) == 0
    assert "1 frame(s) x 320 samples, 4 codebooks" in capsys.readouterr().out
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "encode_step.onnx", "decode_step.onnx", "initial_states.npz", "streaming.json"}
    assert cli_main(["export-onnx", "--model", "default", "-o", str(tmp_path / "bad"), "--frames-per-step", "0"]) == 2
    assert "--frames-per-step must be at least 1" in capsys.readouterr().err
