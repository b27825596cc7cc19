"""The `semanticodec` family: trains with the real Lightning path (teacher, k-means targets, GAN), streams
exactly like offline, serves through gRPC and exports token datasets, all from the trained checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from neurocodec.audio import load_audio
from neurocodec.cli import main as cli
from neurocodec.codecs.checkpoint import build_codec, load_codec
from neurocodec.codecs.commands import decode_streaming, encode_streaming
from neurocodec.codecs.kmeans import load_kmeans
from neurocodec.codecs.teacher import build_teacher
from neurocodec.config import ConfigError
from neurocodec.data.manifest import read_manifest, write_manifest
from neurocodec.train.module import CodecTrainingModule

from test_train import DEMO, MelRecorder, config, fit

SR = 16000


class Recorder(MelRecorder):
    def __init__(self) -> None:
        super().__init__()
        self.semantic: list[float] = []
        self.accuracy: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        super().on_train_batch_end(trainer, module, outputs, batch, batch_idx)
        self.semantic.append(float(trainer.callback_metrics["train/semantic"]))
        self.accuracy.append(float(trainer.callback_metrics["train/semantic_accuracy"]))


@pytest.fixture(scope="module")
def kmeans_file(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("km") / "km.safetensors"
    assert cli(["kmeans", "--teacher", "semanticodec:tiny", "--manifest", str(DEMO), "--split", "valid", "-o", str(out),
                "--max-files", "4", "--iters", "40", "--batch-size", "256"]) == 0
    return out


@pytest.fixture(scope="module")
def trained(kmeans_file, tmp_path_factory):
    """12 generator steps of semanticodec:tiny on a fixed batch of demo speech; returns losses and the run."""
    run = tmp_path_factory.mktemp("run") / "semanticodec"
    cfg = config("semanticodec", "trainer.max_steps=12", "optim.lr=3e-3", f"model.semanticodec.kmeans={kmeans_file}")
    recorder = Recorder()
    trainer, module, export = fit(cfg, run, callbacks=[recorder])
    return {"recorder": recorder, "module": module, "trainer": trainer, "run": run, "codec": export.codec_path,
            "config": cfg}


def test_training_lowers_semantic_and_mel_losses(trained, kmeans_file):
    r, module = trained["recorder"], trained["module"]
    assert int(module.gen_step) == 12 and len(r.mel) == len(r.semantic) == 12
    print(f"mel {r.mel[0]:.3f} -> {r.mel[-1]:.3f}; semantic CE {r.semantic[0]:.3f} -> {r.semantic[-1]:.3f}; "
          f"accuracy {r.accuracy[0]:.2f} -> {r.accuracy[-1]:.2f}")
    assert np.mean(r.mel[-2:]) < 0.9 * r.mel[0], r.mel
    assert np.mean(r.semantic[-2:]) < 0.8 * r.semantic[0], r.semantic
    assert np.mean(r.accuracy[-2:]) > r.accuracy[0], r.accuracy
    # the teacher is not part of the module's state: not in the Lightning checkpoint, not in the export
    ckpt = torch.load(trained["run"] / "checkpoints" / "last.ckpt", weights_only=False, map_location="cpu")
    assert not any("teacher" in k for k in ckpt["state_dict"])
    exported = load_file(str(trained["codec"]))
    assert not any("teacher" in k for k in exported)
    # the k-means centroids were loaded at training start and are saved with the codec's weights
    centroids, _ = load_kmeans(kmeans_file)
    assert torch.equal(exported["quantizer.centroids"], centroids)


def test_trained_codec_needs_no_teacher_and_streams_exactly(trained):
    codec = load_codec(trained["codec"])
    assert codec.info()["family"] == "semanticodec" and codec.cardinality == [32, 256]
    wav = load_audio(read_manifest(DEMO, "test")[0].path, SR)[:, : SR + 123].unsqueeze(0)
    codes = codec.encode(wav)
    assert codes.shape == (1, 2, 51) and codes[:, 0].unique().numel() > 1
    audio = codec.decode(codes)
    for chunk in (160, 320, 1000, 4801):
        assert torch.equal(encode_streaming(codec, wav, chunk), codes), chunk
    for frames in (1, 4):
        assert (decode_streaming(codec, codes, frames) - audio).abs().max() < 1e-5


@pytest.mark.parametrize("spec, hop", [("semanticodec_50tps:tiny", 640), ("semanticodec_25tps:tiny", 1280)])
def test_other_token_rates_stream_exactly(spec, hop):
    codec = load_codec(spec)
    assert codec.frame_size == hop and codec.info()["tokens_per_second"] == 2 * SR / hop
    wav = torch.from_numpy(np.random.default_rng(0).standard_normal(SR + 77).astype(np.float32)).view(1, 1, -1) * 0.1
    codes = codec.encode(wav)
    audio = codec.decode(codes)
    for chunk in (333, hop, 3 * hop + 1):
        assert torch.equal(encode_streaming(codec, wav, chunk), codes), chunk
    assert (decode_streaming(codec, codes, 2) - audio).abs().max() < 1e-5
    # sessions in one batch are independent: a masked session keeps its state (the server's pattern)
    two = torch.cat([wav, wav.flip(-1)])[..., : 4 * hop]
    ref = codec.encode(two)
    with codec.encoder.streaming(2):
        first = codec.encode_step(two[..., :hop])
        codec.encoder.set_exec_mask(torch.tensor([True, False]))
        a = codec.encode_step(two[..., hop: 2 * hop])
        codec.encoder.set_exec_mask(torch.tensor([True, True]))
        b = codec.encode_step(torch.cat([two[:1, :, 2 * hop: 3 * hop], two[1:, :, hop: 2 * hop]]))
    assert torch.equal(first, ref[..., :1]) and torch.equal(a[:1], ref[:1, :, 1:2])
    assert torch.equal(b[:1], ref[:1, :, 2:3]) and torch.equal(b[1:], ref[1:, :, 1:2])


def test_serves_through_grpc(trained):
    from neurocodec.serve.client import CodecClient
    from neurocodec.serve.server import ServerOptions, ServerThread

    codec = load_codec(trained["codec"])
    name = "semantic"
    srv = ServerThread(ServerOptions(models=[name], port=0, max_streams=4, grace_s=1.0), preloaded={name: codec})
    srv.start()
    try:
        audio = load_audio(read_manifest(DEMO, "test")[1].path, SR)[0, : SR - 50].numpy()
        expected = codec.encode(torch.from_numpy(audio).view(1, 1, -1))[0].numpy()
        with CodecClient(f"127.0.0.1:{srv.port}") as client:
            chunks = [audio[i: i + 555] for i in range(0, len(audio), 555)]
            frames = list(client.stream_encode(chunks, sample_rate=SR, fmt="float32", model=name))
            got = np.stack([f.tokens for f in frames], axis=1)
            np.testing.assert_array_equal(got, expected)
            wav = np.concatenate(list(client.stream_decode([expected], frames_per_message=3, num_codebooks=2, model=name)))
            want = codec.decode(torch.from_numpy(expected).unsqueeze(0))[0, 0].numpy()
            np.testing.assert_allclose(wav, want, atol=1e-4, rtol=0)
    finally:
        srv.stop()


def test_exports_token_dataset(trained, tmp_path):
    utts = read_manifest(DEMO, "test")[:3]
    manifest = write_manifest(tmp_path / "m.jsonl", utts)
    out = tmp_path / "tokens"
    assert cli(["export", "--model", str(trained["codec"]), "--manifest", str(manifest), "--out", str(out),
                "--workers", "0"]) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["code_layout"]["quantizer"] == "semantic+rvq"
    assert [c.get("role") for c in info["code_layout"]["codebooks"]] == ["semantic", "acoustic"]
    assert [c["cardinality"] for c in info["code_layout"]["codebooks"]] == [32, 256]
    rows = [r for name in info["files"] for r in pq.read_table(out / name).to_pylist()]
    codec = load_codec(trained["codec"])
    for row, utt in zip(rows, utts):
        codes = codec.encode(load_audio(utt.path, SR).unsqueeze(0))[0].numpy()
        np.testing.assert_array_equal(np.asarray(row["codes"]), codes)


def test_fine_tuning_keeps_the_loaded_centroids():
    """--init_from: the classifier and decoder learnt the loaded cluster ids, so training must not refit them
    (without a k-means file a fresh run fits new ones, as the next test shows)."""
    cfg = config("semanticodec")
    codec = build_codec(cfg.model)
    with torch.no_grad():
        codec.quantizer.centroids.copy_(torch.randn_like(codec.quantizer.centroids))
    loaded = codec.quantizer.centroids.clone()
    CodecTrainingModule(cfg, codec, fine_tuning=True)
    assert torch.equal(codec.quantizer.centroids, loaded)


def test_training_setup_errors_are_one_line(kmeans_file, tmp_path):
    def module(*overrides):
        cfg = config("semanticodec", *overrides)
        return CodecTrainingModule(cfg, build_codec(cfg.model))

    # no k-means file: a single-process run fits one on its training split (here 2 files); DDP refuses
    two = write_manifest(tmp_path / "two.jsonl", read_manifest(DEMO, "train")[:2])
    fitted = module(f"data.manifest={two}").codec.quantizer.centroids
    assert fitted.shape == (32, 32) and fitted.abs().sum() > 0 and fitted.unique(dim=0).shape[0] == 32
    with pytest.raises(ConfigError, match="kmeans is not set: fit the semantic k-means first"):
        module("trainer.devices=2", "trainer.accelerator=cpu")
    with pytest.raises(ConfigError, match="has 32 clusters; model.semanticodec.clusters is 64"):
        module(f"model.semanticodec.kmeans={kmeans_file}", "model.semanticodec.clusters=64")
    with pytest.raises(ConfigError, match="fitted on teacher .* layer 2, but training uses .* layer 1"):
        module(f"model.semanticodec.kmeans={kmeans_file}", "teacher.layer=1")
    with pytest.raises(ConfigError, match="fitted at 50.0 frames/s"):
        c25 = config("semanticodec_25tps", f"model.semanticodec.kmeans={kmeans_file}")
        CodecTrainingModule(c25, build_codec(c25.model))
    with pytest.raises(ConfigError, match="does not exist|no such"):
        module(f"model.semanticodec.kmeans={tmp_path / 'none.safetensors'}")
    with pytest.raises(ConfigError, match="semantic.strides"):
        build_codec(config("semanticodec", "model.semanticodec.semantic.strides=[2,4,5]").model)
    # a teacher of another width is refused before anything else, fine-tuning included
    wide = config("semanticodec", f"model.semanticodec.kmeans={kmeans_file}", "model.semanticodec.teacher_dim=48")
    for fine_tuning in (False, True):
        with pytest.raises(ConfigError, match="the teacher gives 32-d features; model.semanticodec.teacher_dim is 48"):
            CodecTrainingModule(wide, build_codec(wide.model), fine_tuning=fine_tuning)
    teacher = build_teacher(config("semanticodec").teacher)
    assert teacher.dim == 32  # the tiny preset's teacher matches its teacher_dim
