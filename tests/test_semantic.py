"""Semantic teacher (transformers, tiny and from a saved folder) and `neurocodec kmeans` (fit, assign, file).

No network: tiny teachers are built from a config with random (seeded) weights; the saved-folder test goes
through the real `AutoModel.from_pretrained` path that users run with HuBERT / WavLM / Whisper weights.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from neurocodec.cli import main as cli
from neurocodec.codecs.kmeans import assign, fit_minibatch_kmeans, load_kmeans
from neurocodec.codecs.teacher import build_teacher
from neurocodec.config import ConfigError, load_config
from neurocodec.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "manifest.jsonl"
TINY = load_config("semanticodec", "tiny")["teacher"]  # the tiny HuBERT of the shipped config
WAV2VEC_TINY = {k: v for k, v in TINY["tiny"].items()}
WHISPER_TINY = dict(d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64, decoder_layers=1,
                    decoder_attention_heads=2, decoder_ffn_dim=64, num_mel_bins=16, max_source_positions=50,
                    vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)


def _wav(seconds: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(2, 1, int(16000 * seconds), generator=g)


@pytest.mark.parametrize("kind", ["hubert", "wavlm", "wav2vec2"])
def test_tiny_teacher_features_at_every_codec_rate(kind):
    tiny = dict(WAV2VEC_TINY, **({"num_buckets": 16, "max_bucket_distance": 32} if kind == "wavlm" else {}))
    teacher = build_teacher({"kind": kind, "tiny": tiny, "layer": 2})
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.model.training
    wav = _wav(1.0 + 3 * 320 / 16000)  # 53 frames of 20 ms
    f50 = teacher.features(wav, 50.0)
    assert f50.shape == (2, 32, 53) and torch.isfinite(f50).all()
    # 25 / 12.5 Hz average whole 50 Hz frames; 100 Hz interpolates; T always matches N / frame_size
    even = wav[..., : 320 * 52]
    f25, f50e = teacher.features(even, 25.0), teacher.features(even, 50.0)
    assert f25.shape == (2, 32, 26)
    assert torch.allclose(f25[..., 3], f50e[..., 6:8].mean(-1), atol=1e-5)
    assert teacher.features(wav, 12.5, num_frames=13).shape == (2, 32, 13)
    assert teacher.features(wav, 100.0).shape == (2, 32, 106)
    # the same seeded config gives the same teacher in another build
    again = build_teacher({"kind": kind, "tiny": tiny, "layer": 2})
    assert torch.equal(again.features(wav, 50.0), f50)


def test_saved_folders_load_through_from_pretrained(tmp_path):
    """`teacher.source` = a save_pretrained folder: the real loading path (HuBERT and Whisper's encoder)."""
    import transformers

    hub = tmp_path / "hubert"
    torch.manual_seed(0)
    transformers.HubertModel(transformers.HubertConfig(**WAV2VEC_TINY)).save_pretrained(hub)
    tiny = build_teacher({"kind": "hubert", "tiny": WAV2VEC_TINY, "layer": 1})
    loaded = build_teacher({"source": str(hub), "layer": 1})  # kind read from config.json
    assert loaded.kind == "hubert" and loaded.dim == 32
    wav = _wav(0.5)
    ref = transformers.HubertModel.from_pretrained(hub).eval()
    with torch.no_grad():  # layer 1 of the saved model itself, with our padding: 40 samples each side
        want = ref(torch.nn.functional.pad(wav[:, 0], (40, 40)), output_hidden_states=True).hidden_states[1]
    assert torch.allclose(loaded.features(wav, 50.0), want.transpose(1, 2), atol=1e-5)
    assert tiny.features(wav, 50.0).shape == loaded.features(wav, 50.0).shape

    whisper = tmp_path / "whisper"
    transformers.WhisperModel(transformers.WhisperConfig(**WHISPER_TINY)).save_pretrained(whisper)
    teacher = build_teacher({"source": str(whisper), "layer": -1})
    assert teacher.kind == "whisper" and teacher.layer == 2
    # 1.5 s is longer than this tiny encoder's 1 s window: two windows, frames concatenated
    feats = teacher.features(_wav(1.5), 25.0)
    assert feats.shape == (2, 32, 38) and torch.isfinite(feats).all()

    # a tiny Whisper teacher builds the encoder alone (log-mel front end from its config)
    tiny_whisper = build_teacher({"kind": "whisper", "tiny": WHISPER_TINY, "layer": 1})
    assert tiny_whisper.features(_wav(0.4), 50.0).shape == (2, 32, 20)

    with pytest.raises(ConfigError, match="holds a hubert model"):
        build_teacher({"source": str(hub), "kind": "wavlm"})


@pytest.mark.parametrize("config, message", [
    ({}, "set teacher.source"),
    ({"source": "./no/such/teacher"}, "no such folder"),
    ({"kind": "hubbert", "tiny": {}}, "not one of hubert"),
    ({"kind": "hubert", "tiny": WAV2VEC_TINY, "layer": 3}, "out of range for a 2-layer"),
    ({"tiny": WAV2VEC_TINY}, "teacher.kind is required"),
    ({"kind": "hubert", "tiny": WAV2VEC_TINY, "layr": 1}, "unknown option"),
])
def test_teacher_config_errors_are_one_line(config, message):
    with pytest.raises(ConfigError, match=message) as info:
        build_teacher(config)
    assert "\n" not in str(info.value)


def test_kmeans_fit_assign_round_trip():
    g = torch.Generator().manual_seed(1)
    centres = 10 * torch.randn(6, 8, generator=g)
    frames = centres[torch.randint(0, 6, (3000,), generator=g)] + 0.1 * torch.randn(3000, 8, generator=g)
    fitted = fit_minibatch_kmeans(frames, 6, iters=60, batch_size=256, seed=0, progress=False)
    ids = assign(frames, fitted)
    # every fitted centre sits on one true centre, and the nearest-centroid ids are exactly those
    distances = torch.cdist(frames, fitted)
    assert torch.equal(ids, distances.argmin(1))
    true_of_fitted = torch.cdist(fitted, centres).argmin(1)
    assert sorted(true_of_fitted.tolist()) == list(range(6))
    assert torch.cdist(fitted, centres).min(1).values.max() < 0.1
    # [B, D, T] layout gives the same ids as [N, D]
    feats = frames[:40].t().reshape(8, 2, 20).transpose(0, 1)  # [2, 8, 20]
    assert torch.equal(assign(feats, fitted), ids[:40].view(2, 20))
    with pytest.raises(UserError, match="at least as many frames"):
        fit_minibatch_kmeans(frames[:4], 6, progress=False)


def test_kmeans_command_on_demo_clips(tmp_path, capsys):
    out = tmp_path / "km.safetensors"
    assert cli(["kmeans", "--teacher", "semanticodec:tiny", "--manifest", str(DEMO), "-o", str(out),
                "--max-files", "3", "--iters", "30", "--batch-size", "256", "--clusters", "16"]) == 0
    assert "16 clusters over" in capsys.readouterr().out
    centroids, meta = load_kmeans(out)
    assert centroids.shape == (16, 32)
    assert meta["kind"] == "hubert" and int(meta["layer"]) == 2 and float(meta["frame_rate"]) == 50.0
    assert int(meta["clusters"]) == 16 and meta["teacher"].startswith("tiny:hubert")
    assert not list(tmp_path.glob("*.tmp"))  # written atomically
    # the ids of the training features are the nearest centroids (round trip through the file)
    from neurocodec.audio import load_audio
    from neurocodec.data.manifest import read_manifest

    teacher = build_teacher(TINY)
    wav = load_audio(read_manifest(DEMO, "train")[0].path, 16000)[None]
    feats = teacher.features(wav, 50.0)[0].t()
    ids = assign(feats, centroids)
    assert torch.equal(ids, torch.cdist(feats, centroids).argmin(1))
    assert ids.unique().numel() > 1

    # a 25 Hz config clusters 25 Hz features
    out25 = tmp_path / "km25.safetensors"
    assert cli(["kmeans", "--teacher", "semanticodec_50tps:tiny", "--manifest", str(DEMO), "-o", str(out25),
                "--max-files", "2", "--iters", "5", "--batch-size", "64"]) == 0
    assert float(load_kmeans(out25)[1]["frame_rate"]) == 25.0


@pytest.mark.parametrize("args, message", [
    (["--teacher", "./nowhere"], "no such config or folder"),
    (["--teacher", "grvq_4cb"], "has no teacher: section"),
    (["--teacher", "semanticodec:tiny", "--clusters", "100000", "--max-files", "1"], "at least as many frames"),
    (["--teacher", "semanticodec:tiny", "--split", "nosuchsplit"], "no files in split"),
    (["--teacher", "semanticodec:tiny", "--layer", "7"], "out of range"),
    (["--teacher", "semanticodec:tiny", "--iters", "0"], "--iters must be >= 1"),
])
def test_kmeans_command_errors_are_one_line(args, message, tmp_path, capsys):
    assert cli(["kmeans", "--manifest", str(DEMO), "-o", str(tmp_path / "km.safetensors"), *args]) == 2
    err = capsys.readouterr().err.strip()
    last = err.splitlines()[-1]  # (progress bars may come before it)
    assert last.startswith("neurocodec kmeans: error:") and message in last and "Traceback" not in err, err
    assert not (tmp_path / "km.safetensors").exists()


def test_bad_kmeans_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_kmeans(tmp_path / "nope.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable"):
        load_kmeans(junk)
