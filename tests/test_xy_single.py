"""xy_single (one codebook, semantic + acoustic branches) and multi-stage training.

Training runs the real path (`train/fit.py`'s `run_training`, Lightning, the tiny random HuBERT teacher
from `configs/xy_single.yaml:tiny`) on fixed real-speech crops of the demo corpus.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import lightning as L
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from neurocodec.audio import load_audio
from neurocodec.cli import main as cli
from neurocodec.codecs.checkpoint import build_codec, load_codec, prepare_for_inference, warm_start_codebooks
from neurocodec.codecs.commands import decode_streaming, encode_streaming
from neurocodec.config import ConfigError, load_config
from neurocodec.codecs.lfq_balance import lfq_entries
from neurocodec.data.manifest import Utterance, read_manifest, write_manifest
from neurocodec.train.config import StageConfig, discriminator_on_at, parse_train_config
from neurocodec.train.fit import FitArgs, resolve_config, run_training
from neurocodec.train.module import lightning_max_steps
from test_train import DEMO, FAST, FixedBatchData

ROOT = Path(__file__).resolve().parent.parent
MODEL = "xy_single:tiny"
SR = 16000


def xy_config(*overrides: str):
    return resolve_config(FitArgs(config="xy_single", preset="tiny",
                                  overrides=[*FAST, f"data.manifest={DEMO}", "data.segment_seconds=0.64",
                                             "data.valid_segment_seconds=0.64", *overrides]))


class Recorder(L.Callback):
    """Per generator step: losses, the logged stage, and whether the discriminator's weights moved."""

    def __init__(self) -> None:
        self.rows: list[dict] = []
        self._disc: torch.Tensor | None = None

    def _disc_vector(self, module) -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in module.disc.parameters()]).clone()

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._disc = self._disc_vector(module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        m = trainer.callback_metrics
        self.rows.append({"gen_step": int(module.gen_step), "stage": int(m["train/stage"]),
                          "mel": float(m["train/mel"]), "distill": float(m["train/distill"]),
                          "disc_trained": not torch.equal(self._disc, self._disc_vector(module))})


def fit(cfg, run_dir, ckpt_path=None, callbacks=()):
    data = FixedBatchData(cfg.data, cfg.model.sample_rate, cfg.model.seanet.hop_length, seed=0)
    return run_training(cfg, run_dir, ckpt_path=ckpt_path, datamodule=data, extra_callbacks=callbacks, loggers=False)


@pytest.fixture(scope="module")
def clip() -> torch.Tensor:
    """0.9 s of real speech (not a whole number of 40 ms frames)."""
    utt = read_manifest(DEMO, split="test")[0]
    return load_audio(utt.path, SR)[:, 4000: 4000 + 14417].unsqueeze(0)


# -- training -------------------------------------------------------------------------------------------------
def test_trains_and_lowers_mel_and_distillation(tmp_path):
    steps = 10
    cfg = xy_config(f"trainer.max_steps={steps}", "optim.lr=3e-3")
    assert cfg.teacher.tiny is not None and cfg.model.family == "xy_single"
    recorder = Recorder()
    trainer, module, export = fit(cfg, tmp_path / "run", callbacks=[recorder])
    rows = recorder.rows
    assert [r["gen_step"] for r in rows] == list(range(1, steps + 1))
    assert all(r["stage"] == 1 and not r["disc_trained"] for r in rows)  # stage 1 (until 100): no discriminator
    assert trainer.global_step == steps  # no D steps counted in stage 1
    mel, distill = [r["mel"] for r in rows], [r["distill"] for r in rows]
    assert np.mean(mel[-2:]) < 0.9 * mel[0], mel
    assert np.mean(distill[-2:]) < 0.8 * distill[0], distill
    # The exported codec needs no teacher and encodes with one codebook of 8192 entries.
    codec = load_codec(str(export.codec_path))
    assert codec.info()["cardinality"] == [8192] and codec.bitrate == 325.0
    codes = codec.encode(torch.randn(1, 1, 6400) * 0.1)
    assert codes.shape == (1, 1, 10)
    assert codec.quantizer.code_balance.frequency.sum() == pytest.approx(1.0)  # the window travels with the weights

    # scripts/xy_single_report.py on that export: usage over every frame, and the LFQ bit decomposition.
    report = report_script()
    out = tmp_path / "report.json"
    assert report.main(["--model", str(export.codec_path), "--manifest", str(DEMO), "--split", "test",
                        "--max-clips", "3", "--json", str(out), "--config", "xy_single:tiny",
                        "--plot-frames", str(tmp_path / "usage_by_frames.png")]) == 0
    result = json.loads(out.read_text())
    assert result["clips"] == 3 and result["entries"] == 8192 and len(result["bit_share"]) == 13
    assert 0 < result["usage"] <= result["usage_if_uniform"] < 1
    assert result["usage_if_bits_independent"] <= result["usage_if_uniform"] + 1e-9
    assert 0 < result["distill_cosine"] <= 1
    assert 0 < result["usage_if_axes_whitened"] <= 1 and len(result["axes_correlation_eigenvalues"]) == 13
    last = result["usage_by_frames"][-1]
    assert last["usage"] == result["usage"] and last["usage_if_uniform"] == pytest.approx(result["usage_if_uniform"])
    assert (tmp_path / "usage_by_frames.png").stat().st_size > 10_000

    # scripts/xy_single_tradeoff.py on the same export: real audio through the encoder, mel frames aligned with
    # codec frames (too few training frames for 8192 centroids, so no k-means row).
    spec = importlib.util.spec_from_file_location("xy_single_tradeoff", ROOT / "scripts" / "xy_single_tradeoff.py")
    tradeoff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tradeoff)
    out = tmp_path / "tradeoff.json"
    assert tradeoff.main(["--model", str(export.codec_path), "--manifest", str(DEMO), "--train-clips", "4",
                          "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # The tiny latent is 32-d: top-16 components exist, top-32 would be the whole latent.
    assert set(result["assignments"]) == {"model", "model_balanced_thresholds", "axes_whitened",
                                          "latent_whitened_random_axes", "top16_whitened_random_axes"}
    # Its "model" cut is the codec's own code: same entries as `encode` over the same clips.
    used = set()
    for utt in read_manifest(str(DEMO), split="test"):
        used |= set(codec.encode(load_audio(utt.path, codec.sample_rate).unsqueeze(0)).flatten().tolist())
    assert result["assignments"]["model"]["usage"] == len(used) / 8192
    # ... and entry by entry: its sign numbering is the library's.
    utt = read_manifest(str(DEMO), split="test")[0]
    latent, _ = tradeoff.latent_and_log_mel(codec, [utt])
    project = codec.quantizer.impl.project_in
    with torch.no_grad():
        ids = lfq_entries(torch.nn.functional.linear(latent, project.weight.double(), project.bias.double()))
        wav = codec.pad_to_frames(load_audio(utt.path, codec.sample_rate).unsqueeze(0))
        assert torch.equal(ids, codec.encode(wav).flatten())
    assert all(0 < row["usage"] < 1 for row in result["assignments"].values())


def report_script():
    spec = importlib.util.spec_from_file_location("xy_single_report", ROOT / "scripts" / "xy_single_report.py")
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    return report


def test_usage_by_frames_follows_uniform_codes_and_saturates_for_a_half_used_codebook():
    report = report_script()
    g = torch.Generator().manual_seed(2)
    entries = 1024
    uniform = report.usage_by_frames(torch.randint(0, entries, (5000,), generator=g), entries)
    assert [r["frames"] for r in uniform] == [256, 512, 1024, 2048, 4096, 5000]
    for row in uniform:
        assert row["usage"] == pytest.approx(row["usage_if_uniform"], abs=0.03)
    assert uniform[0]["usage"] < uniform[-1]["usage"]
    # Codes that never leave half of the entries stop at 50% however many frames there are.
    half = report.usage_by_frames(torch.randint(0, entries // 2, (20000,), generator=g), entries)
    assert half[-1]["usage"] == 0.5 and half[-1]["usage_if_uniform"] > 0.99


def test_tradeoff_scores_each_way_of_cutting_the_latent_by_usage_and_by_what_it_says_about_the_frame():
    spec = importlib.util.spec_from_file_location("xy_single_tradeoff", ROOT / "scripts" / "xy_single_tradeoff.py")
    tradeoff = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tradeoff)
    g = torch.Generator().manual_seed(3)
    # A latent of 16 tight clusters in 8-d, a "spectrum" that is a linear function of it, 4-bit codes (16 entries).
    centres = torch.randn(16, 8, generator=g, dtype=torch.float64) * 3
    latent = centres[torch.randint(0, 16, (4000,), generator=g)] + 0.05 * torch.randn(4000, 8, generator=g, dtype=torch.float64)
    mel = latent @ torch.randn(8, 5, generator=g, dtype=torch.float64)
    project = torch.nn.Linear(8, 4)
    rows = tradeoff.compare_assignments(latent[:3000], latent[3000:], mel[:3000], mel[3000:], project, kmeans_iters=50)
    assert set(rows) == {"model", "model_balanced_thresholds", "axes_whitened", "latent_whitened_random_axes", "kmeans"}
    # The model's axes with per-prefix thresholds: training frames split evenly, so every entry is met again.
    assert rows["model_balanced_thresholds"]["usage"] == 1.0
    with torch.no_grad():
        model_ids = lfq_entries(project.double()(latent[3000:]))
    assert rows["model"]["usage"] == torch.unique(model_ids).numel() / 16
    # k-means finds the clusters: every entry used, and the entry tells the frame almost exactly.
    assert rows["kmeans"]["usage"] == 1.0 and rows["kmeans"]["r2_latent"] > 0.95 and rows["kmeans"]["r2_log_mel"] > 0.95
    assert rows["latent_whitened_random_axes"]["r2_latent"] < rows["kmeans"]["r2_latent"]
    for row in rows.values():
        assert 0 < row["usage"] <= 1 and row["r2_latent"] <= 1


def test_report_separates_linear_from_non_linear_dependence_of_the_bits():
    report = report_script()
    g = torch.Generator().manual_seed(1)
    n, d = 2000, 8  # 7.8 frames per sign pattern: independent, balanced bits would use 99.96% of them
    independent = torch.randn(n, d, generator=g, dtype=torch.float64)
    # Linear dependence (an offset and a shared component) costs usage; whitening gives it back.
    mixed = independent @ (torch.eye(d, dtype=torch.float64) + 2.0 * torch.ones(d, d, dtype=torch.float64)) + 1.0
    result = report.linear_report(mixed)
    assert report.sign_usage(mixed) < 0.7 and result["usage_if_gaussian_same_covariance"] < 0.7
    assert result["usage_if_axes_whitened"] > 0.99
    assert max(result["axes_correlation_eigenvalues"]) > 5
    # Frames clustered around 20 points: whitening cannot spread them over the 256 patterns, though a
    # Gaussian with their (unremarkable) covariance would cover most of them.
    centres = torch.randn(20, d, generator=g, dtype=torch.float64) * 3
    clustered = centres[torch.randint(0, 20, (n,), generator=g)] + 0.1 * independent
    result = report.linear_report(clustered)
    assert result["usage_if_axes_whitened"] < 0.2 and result["usage_if_gaussian_same_covariance"] > 0.7


def test_stage_switch_at_the_configured_step_and_after_resume(tmp_path):
    stages = "stages=[{until_step: 3, loss: {adversarial: 0, feature: 0, distill: 10}}, {loss: {distill: 1}}]"
    first = Recorder()
    cfg = xy_config("trainer.max_steps=5", "trainer.val_every=3", "trainer.keep_checkpoints=5", stages)
    trainer, module, _ = fit(cfg, tmp_path / "run", callbacks=[first])
    assert [(r["stage"], r["disc_trained"]) for r in first.rows] == [(1, False)] * 3 + [(2, True)] * 2
    assert trainer.global_step == 5 + 2  # Lightning counts the 2 discriminator steps of stage 2
    assert module.current_loss_weights(0)["distill"] == 10.0 and module.current_loss_weights(3)["distill"] == 1.0

    # Resume from the checkpoint written after step 3: the first resumed step is already in stage 2.
    ckpt = tmp_path / "run" / "checkpoints" / "step0000003.ckpt"
    assert ckpt.is_file(), sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    resumed = Recorder()
    trainer2, module2, _ = fit(cfg, tmp_path / "run", ckpt_path=str(ckpt), callbacks=[resumed])
    assert [(r["gen_step"], r["stage"], r["disc_trained"]) for r in resumed.rows] == [(4, 2, True), (5, 2, True)]
    assert int(module2.gen_step) == 5 and trainer2.global_step == 7


class PartRecorder(L.Callback):
    """Per generator step: which codec parts' weights, and which parts' buffers (BatchNorm statistics), changed."""

    def __init__(self) -> None:
        self.moved: list[set[str]] = []
        self.buffers_moved: list[set[str]] = []

    def _state(self, module, kind: str) -> dict[str, torch.Tensor]:
        state = {}
        for name, part in module.codec.named_children():
            tensors = list(part.parameters() if kind == "parameters" else part.buffers())
            if tensors:
                state[name] = torch.cat([t.detach().double().flatten() for t in tensors]).clone()
        return state

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self._before = {kind: self._state(module, kind) for kind in ("parameters", "buffers")}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        for kind, log in (("parameters", self.moved), ("buffers", self.buffers_moved)):
            after = self._state(module, kind)
            log.append({name for name in after if not torch.equal(after[name], self._before[kind][name])})


def test_a_stage_can_freeze_the_tokenizer_and_train_only_the_decoder(tmp_path):
    frozen = "[encoder, quantizer, distill_proj]"
    stages = (f"stages=[{{until_step: 3, loss: {{adversarial: 0, feature: 0}}}}, "
              f"{{freeze: {frozen}, norm_recalibration_steps: 2}}]")
    recorder = PartRecorder()
    cfg = xy_config("trainer.max_steps=7", "trainer.val_every=4", "optim.weight_decay=0.01", stages)
    _, module, _ = fit(cfg, tmp_path / "run", callbacks=[recorder])
    everything = {"encoder", "quantizer", "decoder", "distill_proj"}
    assert recorder.moved[:3] == [everything] * 3, recorder.moved  # stage 1 trains every part
    # Stage 2 (including the step after a validation, which puts Lightning's module back in train mode):
    # neither weights, Adam momentum and weight decay move the frozen parts.
    assert recorder.moved[3:] == [{"decoder"}] * 4, recorder.moved
    assert all(p.grad is None for p in module.codec.encoder.parameters())
    # The encoder's BatchNorm statistics are re-estimated over stage 2's first 2 batches, then held.
    assert [b & {"encoder"} for b in recorder.buffers_moved[3:]] == [{"encoder"}] * 2 + [set()] * 2
    norm = module.codec.encoder.norm
    assert int(norm.num_batches_tracked) == 2 and norm.momentum == 0.1 and not norm.training
    assert not module.codec.encoder.training and not module.codec.quantizer.training

    raw = load_config("xy_single", "tiny")
    raw["stages"] = [{"until_step": 3}, {"freeze": ["encoder", "vocoder"]}]
    with pytest.raises(ConfigError, match="vocoder, which this codec does not have; its parts: decoder, distill_proj"):
        fit(parse_train_config(raw), tmp_path / "bad")
    for stage, message in (({"freeze": "encoder"}, "list of codec module names"),
                           ({"norm_recalibration_steps": 5}, "freeze is empty"),
                           ({"freeze": ["encoder"], "norm_recalibration_steps": -1}, "integer >= 0"),
                           ({"freeze": ["encoder"], "balance_code_frames": 100}, "must freeze encoder and quantizer"),
                           ({"freeze": ["encoder", "quantizer"], "balance_code_frames": 1.5}, "integer >= 0")):
        raw["stages"] = [stage]
        with pytest.raises(ConfigError, match=message):
            parse_train_config(raw)


def test_a_frozen_stage_fits_balanced_code_thresholds_once_after_the_norms(tmp_path):
    frozen = "[encoder, quantizer, distill_proj]"
    stages = (f"stages=[{{until_step: 3, loss: {{adversarial: 0, feature: 0}}}}, "
              f"{{freeze: {frozen}, norm_recalibration_steps: 2, balance_code_frames: 3000}}]")
    recorder = PartRecorder()
    cfg = xy_config("trainer.max_steps=7", "trainer.val_every=4", stages)
    _, module, export = fit(cfg, tmp_path / "run", callbacks=[recorder])
    # Steps 3-4 re-estimate the encoder's norms; step 5 (the stage's third) fits the thresholds; then both hold.
    assert [b & {"encoder", "quantizer"} for b in recorder.buffers_moved[3:]] == \
        [{"encoder"}, {"encoder"}, {"quantizer"}, set()], recorder.buffers_moved
    quantizer = module.codec.quantizer
    assert bool(quantizer.thresholds_fitted) and quantizer.thresholds.abs().sum() > 0
    # Saved in the checkpoint (so a resume keeps them) and exported with the codec.
    saved = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert torch.equal(saved["state_dict"]["codec.quantizer.thresholds"], quantizer.thresholds)
    codec = load_codec(str(export.codec_path))
    assert torch.allclose(codec.quantizer.thresholds.float(), quantizer.thresholds)
    # Inference reads the thresholds, not the signs: the codes of a real clip are those of the fitted tree.
    utt = read_manifest(str(DEMO), split="test")[0]
    wav = codec.pad_to_frames(load_audio(utt.path, codec.sample_rate).unsqueeze(0))
    with torch.no_grad():
        axes = codec.quantizer.impl.project_in(codec.encode_latent(wav).transpose(1, 2))[0]
    codes = codec.encode(wav).flatten()
    assert torch.equal(codes, lfq_entries(axes, codec.quantizer.thresholds)) and not torch.equal(codes, lfq_entries(axes))

    # The fit draws its crops from its own seeded RNG: the same thresholds again, and training's RNG untouched.
    fitted, rng = quantizer.thresholds.clone(), torch.get_rng_state()
    module.stage_work.fit_code_thresholds(module, 3000, seed=5)
    assert torch.equal(quantizer.thresholds, fitted) and torch.equal(torch.get_rng_state(), rng)

    # A stage that asks for thresholds from a quantizer that keeps none is a config error before training.
    cfg = xy_config("model.quantizer.balanced_thresholds=false", stages)
    with pytest.raises(ConfigError, match="balanced_thresholds: true"):
        fit(cfg, tmp_path / "bad")


def test_stage_config_is_validated_and_counts_discriminator_steps():
    raw = load_config("xy_single", "tiny")
    raw["stages"] = [{"until_step": 10, "loss": {"adversarial": 0, "feature": 0}}, {"until_step": 20, "discriminator": False},
                     {"loss": {"distill": 2}}]
    raw["optim"]["disc_start_step"] = 5
    cfg = parse_train_config(raw)
    assert isinstance(cfg.stages[0], StageConfig)
    on = [discriminator_on_at(cfg, s) for s in range(40)]
    assert on == [False] * 20 + [True] * 20
    for max_steps in (1, 10, 15, 20, 33):
        expected = max_steps + sum(on[:max_steps])
        assert lightning_max_steps(max_steps, 5, True, cfg) == expected
    # the saved (resolved) config reads back the same
    assert parse_train_config(dataclasses.asdict(cfg)).stages == cfg.stages

    bad = [({"loss": {"mell": 1.0}}, "unknown loss weight"), ({"loss": {"mel": -1}}, ">= 0"),
           ({"until_step": 0}, "positive"), ({"colour": 1}, "unknown option")]
    for stage, message in bad:
        raw["stages"] = [stage]
        with pytest.raises(ConfigError, match=message):
            parse_train_config(raw)
    raw["stages"] = [{"until_step": 10}, {"until_step": 5}, {}]
    with pytest.raises(ConfigError, match="increase"):
        parse_train_config(raw)
    raw["stages"] = [{}, {"until_step": 5}]
    with pytest.raises(ConfigError, match="only the last stage"):
        parse_train_config(raw)


def test_model_config_errors_are_one_line():
    model = load_config("xy_single", "tiny")["model"]
    model["xy_single"]["semantic"]["strides"] = [4, 5, 8]  # hop 160, not 640
    with pytest.raises(ConfigError, match="same hop"):
        build_codec(model)
    model = load_config("xy_single", "tiny")["model"]
    model["xy_single"]["semantic_dim"] = 3
    with pytest.raises(ConfigError, match="unknown option"):
        build_codec(model)
    model = load_config("xy_single", "tiny")["model"]
    model["quantizer"] = {"kind": "rvq", "num_quantizers": 2}
    with pytest.raises(ConfigError, match="ONE codebook"):
        build_codec(model)
    # a teacher of another width than the projection
    assert cli(["info", "--model", MODEL]) == 0
    cfg = xy_config("model.xy_single.teacher_dim=48")
    with pytest.raises(ConfigError, match="teacher_dim"):
        fit(cfg, Path("/nonexistent-run-dir"))


# -- streaming == offline ------------------------------------------------------------------------------------
def _check_streaming(codec, wav: torch.Tensor, chunks, frame_chunks) -> None:
    codes = codec.encode(wav)
    assert codes.shape == (wav.shape[0], 1, codec.num_frames(wav.shape[-1]))
    assert len(codes.unique()) > codes.shape[-1] // 3  # varied codes: the comparison means something
    for chunk in chunks:
        streamed = torch.cat([encode_streaming(codec, wav[i: i + 1], chunk) for i in range(wav.shape[0])])
        assert torch.equal(streamed, codes), f"chunks of {chunk} samples"
    audio = codec.decode(codes)
    for n in frame_chunks:
        streamed = decode_streaming(codec, codes, n)
        assert (streamed - audio).abs().max() < 1e-5, f"{n} frames per step"


def test_streaming_equals_offline_25hz(clip):
    codec = load_codec(MODEL)
    assert codec.frame_size == 640 and codec.frame_rate == 25.0
    wav = torch.cat([clip, 0.5 * clip.flip(-1)])
    _check_streaming(codec, wav, chunks=(37, 640, 1001, 4480), frame_chunks=(1, 4))


def test_streaming_equals_offline_with_fitted_code_thresholds(clip):
    codec = load_codec(MODEL)
    wav = torch.cat([clip, 0.5 * clip.flip(-1), 2.0 * clip])
    with torch.no_grad():
        latent = codec.encode_latent(wav)
    codec.quantizer.fit_thresholds(latent.transpose(1, 2).reshape(-1, latent.shape[1]))
    frames = 3 * codec.num_frames(wav.shape[-1])
    assert len(codec.encode(wav).unique()) > 0.9 * frames  # fitted on these frames: nearly all distinct
    _check_streaming(codec, wav, chunks=(37, 640, 1001, 4480), frame_chunks=(1, 4))


def test_streaming_equals_offline_12hz_with_exec_mask(clip):
    # The `12hz` geometry with the FSQ alternative of the config's LFQ (also one codebook of 16384 entries).
    raw = load_config("xy_single", "tiny", ["model.seanet.strides=[2,4,5,8,4]", "model.quantizer.kind=fsq",
                                            "model.quantizer.levels=[8,8,8,8,4]", "model.quantizer.decorrelation_weight=0",
                                            "model.quantizer.code_balance_weight=0",
                                            "model.quantizer.balanced_thresholds=false",
                                            "model.xy_single.semantic.strides=[4,5,8,8]"])
    codec = build_codec(raw["model"], name="xy_single:tiny-12hz")
    warm_start_codebooks(codec)
    prepare_for_inference(codec)
    assert codec.frame_size == 1280 and codec.cardinality == [16384] and codec.bitrate == 175.0
    _check_streaming(codec, clip, chunks=(333, 1280, 2000), frame_chunks=(1, 3))
    # Two sessions in one batch; session 1 pauses for a step (exec mask) and still gets its own codes.
    wav = torch.cat([clip, 0.7 * clip])[..., : 4 * 1280]
    expected = codec.encode(wav)
    f = codec.frame_size
    with codec.encoder.streaming(2):
        got0 = [codec.encode_step(wav[:, :, :f])[:, :, :]]
        codec.encoder.set_exec_mask(torch.tensor([True, False]))
        step = codec.encode_step(wav[:, :, f: 2 * f])
        first_session = [got0[0][0], step[0]]
        codec.encoder.set_exec_mask(torch.tensor([True, True]))
        rest = codec.encode_step(torch.cat([wav[:1, :, 2 * f: 4 * f], wav[1:, :, f: 3 * f]]))
    assert torch.equal(torch.cat([*first_session, rest[0]], dim=-1), expected[0])
    assert torch.equal(torch.cat([got0[0][1], rest[1]], dim=-1), expected[1, :, :3])


# -- served and exported like every codec ----------------------------------------------------------------------
def test_serves_through_grpc(clip):
    from neurocodec.serve.client import CodecClient
    from neurocodec.serve.server import ServerOptions, ServerThread

    torch.set_grad_enabled(False)
    try:
        codec = load_codec(MODEL)
        audio = clip[0, 0].numpy()
        expected = codec.encode(clip)[0].numpy()
        srv = ServerThread(ServerOptions(models=[MODEL], port=0, max_streams=4, grace_s=1.0), preloaded={MODEL: codec})
        srv.start()
        try:
            with CodecClient(f"127.0.0.1:{srv.port}") as client:
                info = client.model_info(MODEL)
                assert (info.family, info.frame_size, list(info.cardinalities)) == ("xy_single", 640, [8192])
                for ms in (25, 100):
                    n = SR * ms // 1000
                    frames = list(client.stream_encode([audio[i: i + n] for i in range(0, len(audio), n)],
                                                       sample_rate=SR, fmt="float32", model=MODEL))
                    assert [f.index for f in frames] == list(range(expected.shape[-1]))
                    assert np.array_equal(np.stack([f.tokens for f in frames], axis=1), expected), f"{ms} ms chunks"
                decoded = np.concatenate(list(client.stream_decode([expected[:, :5], expected[:, 5:]],
                                                                   frames_per_message=2, num_codebooks=1, model=MODEL)))
                reference = codec.decode(torch.from_numpy(expected).unsqueeze(0))[0, 0].numpy()
                np.testing.assert_allclose(decoded, reference, atol=1e-4, rtol=0)
        finally:
            srv.stop()
    finally:
        torch.set_grad_enabled(True)


def test_exports_token_dataset(tmp_path):
    utts = read_manifest(DEMO, split="test")[:4]
    manifest = write_manifest(tmp_path / "m.jsonl", [Utterance(id=u.id, path=u.path, text=u.text, speaker=u.speaker)
                                                    for u in utts])
    out = tmp_path / "tokens"
    assert cli(["export", "--model", MODEL, "--manifest", str(manifest), "--out", str(out), "--workers", "1"]) == 0
    card = json.loads((out / "dataset.json").read_text())
    rows = [r for name in card["files"] for r in pq.read_table(out / name).to_pylist()]
    assert len(rows) == 4
    codec = load_codec(MODEL)
    for row in rows:
        utt = next(u for u in utts if u.id == row["id"])
        expected = codec.encode(load_audio(utt.path, SR).unsqueeze(0))[0].numpy()
        assert np.array_equal(np.asarray(row["codes"]), expected)
    assert "lfq" in json.dumps(card)
