"""Training: each shipped config learns, exact resume, DDP codebook sync, skipped files, export, CLI.

Everything runs the real code path (config parsing -> codec -> Lightning module -> Trainer) with the tiny
presets shrunk further (short crops, batch 2, small discriminators) so the file stays fast on 2 CPU cores.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from neurocodec.codecs.checkpoint import load_codec, read_metadata
from neurocodec.config import ConfigError
from neurocodec.data.dataset import AudioSegmentDataset
from neurocodec.errors import UserError
from neurocodec.eval.metrics import stream_start_overshoot_db
from neurocodec.train.datamodule import CodecDataModule
from neurocodec.train.fit import FitArgs, choose_run_dir, main, resolve_config, run_training

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "data" / "demo" / "manifest.jsonl"

# Small enough for a few seconds per step on a loaded 2-core machine, big enough to exercise every part.
FAST = [
    "data.segment_seconds=0.32", "data.valid_segment_seconds=0.32", "data.batch_size=2", "data.valid_batch_size=2",
    "data.num_workers=0", "data.valid_items=2", "disc.channels=4", "disc.max_channels=16",
    "disc.periods=[2,3]", "disc.stft_n_ffts=[256,128]", "disc.mrd_n_ffts=[256]",
    "loss.mel_windows=[64,256,1024]", "loss.mel_bins=[10,40,80]", "loss.stft_n_ffts=[256,512]",
    "optim.disc_start_step=0", "trainer.enable_progress_bar=false", "trainer.pesq_items=1",
    "trainer.audio_examples=1", "trainer.val_every=1000",
]


def config(name: str, *overrides: str):
    return resolve_config(FitArgs(config=name, preset="tiny", overrides=[*FAST, f"data.manifest={DEMO}", *overrides]))


class _Repeat(torch.utils.data.Dataset):
    def __init__(self, batch: torch.Tensor, n: int = 10_000) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.batch


class FixedBatchData(CodecDataModule):
    """The same two validation crops as every training batch: deterministic, so runs can be compared."""

    def train_dataloader(self):
        ds = AudioSegmentDataset(DEMO, self.sample_rate, self.config.segment_seconds, split="valid", train=False,
                                 frame_size=self.frame_size, length=self.config.batch_size)
        batch = torch.stack([ds[i] for i in range(len(ds))])
        return torch.utils.data.DataLoader(_Repeat(batch), batch_size=None, shuffle=False, num_workers=0)


class MetricRecorder(L.Callback):
    """One logged training metric after every step (None where the step did not log it)."""

    def __init__(self, name: str) -> None:
        self.name, self.values = name, []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.values.append(trainer.callback_metrics.get(self.name))


class MelRecorder(MetricRecorder):
    def __init__(self) -> None:
        super().__init__("train/mel")

    @property
    def mel(self) -> list[float]:
        return [float(v) for v in self.values]


def fit(cfg, run_dir, ckpt_path=None, loggers=False, callbacks=(), init_from=None):
    data = FixedBatchData(cfg.data, cfg.model.sample_rate, cfg.model.seanet.hop_length, seed=0)
    return run_training(cfg, run_dir, ckpt_path=ckpt_path, datamodule=data, extra_callbacks=callbacks, loggers=loggers,
                        init_from=init_from)


@pytest.mark.parametrize("name", ["grvq_4cb", "rvq_8cb", "fsq"])
def test_each_config_lowers_mel_loss(name, tmp_path):
    steps = 8
    cfg = config(name, f"trainer.max_steps={steps}", "optim.lr=3e-3")
    recorder = MelRecorder()
    trainer, module, _ = fit(cfg, tmp_path / name, callbacks=[recorder])
    assert int(module.gen_step) == steps
    # Lightning counts discriminator steps too; max_steps is converted so that G steps == max_steps.
    assert trainer.global_step == 2 * steps
    assert len(recorder.mel) == steps
    assert np.mean(recorder.mel[-2:]) < 0.9 * recorder.mel[0], recorder.mel


def _state(ckpt: Path) -> dict:
    return torch.load(ckpt, map_location="cpu", weights_only=False)


def _assert_same(a, b, where="") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_resume_is_exact(tmp_path):
    # 4 steps straight vs 2 steps + resume + 2 steps: the same weights, EMA, optimiser and scheduler state.
    # The GAN starts at step 1, so the resumed half runs both optimisers from restored state.
    common = ("optim.disc_start_step=1", "trainer.log_every=1")
    _, straight, _ = fit(config("grvq_4cb", "trainer.max_steps=4", *common), tmp_path / "straight")
    fit(config("grvq_4cb", "trainer.max_steps=2", *common), tmp_path / "half", loggers=True)
    ckpt = tmp_path / "half" / "checkpoints" / "last.ckpt"
    assert _state(ckpt)["neurocodec"]["gen_step"] == 2
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer, resumed, _ = fit(config("grvq_4cb", "trainer.max_steps=4", *common), tmp_path / "half",
                                  ckpt_path=str(ckpt), loggers=True)
    assert not [w for w in caught if "will be deleted" in str(w.message)]  # they are kept, so no such warning
    assert int(resumed.gen_step) == 4
    # The resumed session overwrites last.ckpt (no last-v1.ckpt beside it) and appends to the run's CSV log:
    # the curves of the first session are kept.
    with open(tmp_path / "half" / "csv" / "metrics.csv", newline="") as f:
        logged = sorted({int(float(r["gen_step"])) for r in csv.DictReader(f) if r.get("gen_step")})
    assert logged == [1, 2, 3, 4]
    assert not [p.name for p in ckpt.parent.iterdir() if "-v" in p.name], sorted(p.name for p in ckpt.parent.iterdir())
    a = _state(tmp_path / "straight" / "checkpoints" / "last.ckpt")
    b = _state(tmp_path / "half" / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 2 * 4 - 1
    _assert_same(a["state_dict"], b["state_dict"], "state_dict")
    _assert_same(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    _assert_same(a["lr_schedulers"], b["lr_schedulers"], "lr_schedulers")
    assert any(k.startswith("ema.") for k in a["state_dict"])


def test_resume_with_other_loss_resolutions(tmp_path):
    """Fine-tuning a run with a finer mel loss: the loss filterbanks come from the new config, the learnt
    weights and optimiser state from the checkpoint (the filterbanks' shapes used to make loading fail)."""
    fit(config("grvq_4cb", "trainer.max_steps=2"), tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    before = _state(ckpt)["state_dict"]
    finer = ("loss.mel_windows=[64,256,1024,2048]", "loss.mel_bins=[10,40,80,320]", "loss.stft_n_ffts=[1024]")
    _, resumed, _ = fit(config("grvq_4cb", "trainer.max_steps=3", *finer), tmp_path / "run", ckpt_path=str(ckpt))
    assert int(resumed.gen_step) == 3
    assert len(resumed.mel_loss.mels) == 4 and resumed.mel_loss.mels[3].mel_scale.fb.shape[1] == 320
    after = _state(ckpt)["state_dict"]
    assert after["mel_loss.mels.3.mel_scale.fb"].shape[1] == 320
    assert "mel_loss.mels.3.mel_scale.fb" not in before
    # it trained on from the checkpoint, not from scratch: one step moves the weights only a little
    name = "codec.decoder.model.0.conv.parametrizations.weight.original1"
    moved = (after[name] - before[name]).norm() / before[name].norm()
    assert 0 < moved < 0.5, float(moved)


def test_pesq_loss_switches_on_and_off_across_resumes(tmp_path):
    """loss.pesq > 0 (or a stage's pesq weight) adds the differentiable PESQ term to the generator's loss; a run
    resumes with it switched on or off, since its filter constants come from the config like the mel loss's."""
    run = tmp_path / "run"
    crops = ("data.segment_seconds=0.4", "data.valid_segment_seconds=0.4")  # PESQ averages over 0.34 s at least
    _, plain, _ = fit(config("grvq_4cb", "trainer.max_steps=2", *crops), run)
    assert plain.pesq_loss is None
    ckpt = str(run / "checkpoints" / "last.ckpt")
    recorder = MetricRecorder("train/pesq")
    _, with_pesq, _ = fit(config("grvq_4cb", "trainer.max_steps=4", "loss.pesq=1.0", *crops), run, ckpt_path=ckpt,
                          callbacks=[recorder])
    assert int(with_pesq.gen_step) == 4 and len(recorder.values) == 2
    # a tiny untrained codec is far from its input: PESQ's disturbance is large and finite
    assert all(v is not None and 1.0 < float(v) < 50.0 for v in recorder.values), recorder.values
    assert any(k.startswith("pesq_loss.") for k in _state(Path(ckpt))["state_dict"])
    _, off_again, _ = fit(config("grvq_4cb", "trainer.max_steps=5", *crops), run, ckpt_path=ckpt)
    assert int(off_again.gen_step) == 5 and off_again.pesq_loss is None
    # a stage that asks for it builds it, and the loss is only computed in that stage
    staged = config("grvq_4cb", "trainer.max_steps=2", "stages=[{until_step: 1}, {loss: {pesq: 2.0}}]", *crops)
    recorder = MetricRecorder("train/pesq")
    _, module, _ = fit(staged, tmp_path / "staged", callbacks=[recorder])
    assert module.pesq_loss is not None
    assert recorder.values[0] is None and recorder.values[1] is not None
    with pytest.raises(ConfigError, match="loss.pesq needs training crops of at least 0.34 s"):
        config("grvq_4cb", "loss.pesq=1.0")  # FAST's 0.32 s crops


def test_pesq_loss_leaves_out_the_stream_start_which_pesq_rewards_a_burst_in():
    """loss.pesq_skip_ms (60 by default): the PESQ loss does not see a crop's first 60 ms. Without the skip, a loud
    600 Hz burst in them LOWERS the loss (PESQ aligns each signal's level over the whole clip, so the burst turns the
    rest of the output down), which is what the day 24-26 PESQ-loss runs learnt. The same burst just after the skip
    raises it, as a defect should."""
    from neurocodec.audio import load_audio
    from neurocodec.codecs.checkpoint import build_codec
    from neurocodec.train.module import CodecTrainingModule

    clip = sorted((DEMO.parent / "audio" / "fr_CA_f_June").glob("*.flac"), key=lambda p: -p.stat().st_size)[0]
    real = load_audio(clip, 16000).reshape(1, 1, -1)[..., 8000:8000 + 6400]  # 0.4 s of speech
    noise = torch.randn(real.shape, generator=torch.Generator().manual_seed(0))
    fake = real + 0.01 * real.abs().max() * noise
    burst = 0.9 * torch.sin(2 * torch.pi * 600 * torch.arange(960) / 16000)  # 60 ms
    at_start, after_skip = fake.clone(), fake.clone()
    at_start[..., :960] += burst
    after_skip[..., 960:1920] += burst

    def pesq_losses(skip_ms: int) -> list[float]:
        cfg = config("grvq_4cb", "loss.pesq=1.0", "data.segment_seconds=0.4", f"loss.pesq_skip_ms={skip_ms}")
        module = CodecTrainingModule(cfg, build_codec(cfg.model))
        return [float(module.generator_losses(real, f, torch.zeros(()), use_gan=False)["pesq"])
                for f in (fake, at_start, after_skip)]

    plain, burst_at_start, burst_after_skip = pesq_losses(60)
    assert burst_at_start == plain
    assert burst_after_skip > plain + 0.5
    plain, burst_at_start, _ = pesq_losses(0)
    assert burst_at_start < plain - 0.1, (burst_at_start, plain)
    with pytest.raises(ConfigError, match="after its loss.pesq_skip_ms"):
        config("grvq_4cb", "loss.pesq=1.0", "data.segment_seconds=0.4", "loss.pesq_skip_ms=100")


def test_fine_tune_from_the_default_model(tmp_path):
    """--init_from default: a new run (step 0) whose codec, and its weight EMA, start from the shipped weights."""
    import yaml
    from safetensors.torch import load_file

    from neurocodec.codecs.checkpoint import (DEFAULT_MODEL_PATH, build_codec, lineage_steps, load_weights_for_training,
                                              read_metadata, save_codec)

    shipped = load_file(str(DEFAULT_MODEL_PATH))
    cfg = config("grvq_4cb", "trainer.max_steps=1")  # the default model's network: grvq_4cb, preset tiny
    _, module, export = fit(cfg, tmp_path / "ft", init_from="default")
    assert int(module.gen_step) == 1
    assert yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())["initialised_from"] == "default"
    name = "decoder.model.0.conv.parametrizations.weight.original1"
    fresh = build_codec(cfg.model).state_dict()[name]

    def distance(w):
        return float((w - shipped[name]).norm() / shipped[name].norm())

    # one step with EMA decay 0.99 moves the exported (EMA) weights ~1% of a step; a fresh model is far off
    assert distance(load_file(str(export.codec_path))[name]) < 0.05 < 0.5 < distance(fresh)
    assert torch.equal(module.codec.quantizer.state_dict()["impl.rvqs.0.layers.0._codebook.initted"], torch.tensor(True))

    # the exported codec counts the shipped model's steps too (the lineage the default model's curve follows)
    shipped_steps = lineage_steps(read_metadata(DEFAULT_MODEL_PATH))
    assert shipped_steps > 0
    meta = read_metadata(export.codec_path)
    assert (int(meta["gen_step"]), int(meta["steps_before"]), int(meta["total_steps"])) == (1, shipped_steps, shipped_steps + 1)

    # resuming the fine-tuning run keeps the record of where it started, and its step count
    _, resumed, export = fit(config("grvq_4cb", "trainer.max_steps=2"), tmp_path / "ft",
                             ckpt_path=str(tmp_path / "ft" / "checkpoints" / "last.ckpt"))
    saved = yaml.safe_load((tmp_path / "ft" / "config.yaml").read_text())
    assert saved["initialised_from"] == "default" and saved["resumed_from"].endswith("last.ckpt")
    assert resumed.steps_before == shipped_steps
    assert lineage_steps(read_metadata(export.codec_path)) == shipped_steps + 2

    with pytest.raises(UserError, match="network differs"):  # narrower: widening only goes one way
        fit(config("grvq_4cb", "trainer.max_steps=1", "model.seanet.channels=4"), tmp_path / "narrow",
            init_from="default")
    with pytest.raises(UserError, match="model.sample_rate = 16000, this config has 24000"):
        fit(config("grvq_4cb", "trainer.max_steps=1", "model.sample_rate=24000"), tmp_path / "24k", init_from="default")
    # A network that adds a bottleneck to the file's starts from the file's function (the blocks as identity): how
    # the default model got its LSTMs. The file here: the tiny network without a bottleneck, as training saves it.
    plain = build_codec(config("grvq_4cb", "model.seanet.bottleneck.kind=none").model)
    plain_file = save_codec(plain, tmp_path / "no_bottleneck.safetensors")
    for kind in ("lstm", "transformer"):
        grown = build_codec(config("grvq_4cb", f"model.seanet.bottleneck.kind={kind}").model)
        load_weights_for_training(grown, str(plain_file))
        wav = torch.randn(1, 1, 3200) * 0.1
        with torch.no_grad():
            plain.eval(), grown.eval()
            assert torch.equal(grown.encode(wav), plain.encode(wav)), kind
            torch.testing.assert_close(grown.decode(grown.encode(wav)), plain.decode(plain.encode(wav)), atol=1e-6, rtol=0)
    with pytest.raises(UserError, match="network differs"):  # the other way round drops weights: refused
        load_weights_for_training(plain, str(save_codec(grown, tmp_path / "grown.safetensors")))
    folded = save_codec(load_codec("default"), tmp_path / "folded.safetensors")
    with pytest.raises(UserError, match="saved for inference"):
        fit(cfg, tmp_path / "f", init_from=str(folded))
    with pytest.raises(ConfigError, match="give one"):
        main(["--config", "grvq_4cb", "--init_from", "default", "--ckpt_path", str(tmp_path / "x.ckpt")])


def test_fine_tune_into_a_wider_network_starts_from_the_files_function(tmp_path):
    """More `seanet.channels` than the file's (codecs/widen.py): copied channels, input weights split between the
    copies, so the wider codec gives the file's codes and audio; weight norm's directions keep their trained norms;
    the copies are not twins (their split weights differ), and training runs from there."""
    from neurocodec.audio import load_audio
    from neurocodec.codecs.checkpoint import build_codec, load_weights_for_training, save_codec

    torch.manual_seed(5)
    narrow = build_codec(config("grvq_4cb", "model.seanet.decoder_snake=true").model)  # LSTMs, Snake, weight norm
    with torch.no_grad():  # a model unlike a fresh one: biases, gates and LSTMs all carry something
        for p in narrow.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    saved = save_codec(narrow, tmp_path / "narrow.safetensors")
    wide = build_codec(config("grvq_4cb", "model.seanet.decoder_snake=true", "model.seanet.channels=12").model)
    load_weights_for_training(wide, str(saved))
    assert sum(p.numel() for p in wide.parameters()) > 2 * sum(p.numel() for p in narrow.parameters())

    clip = sorted((DEMO.parent / "audio" / "fr_CA_f_June").glob("*.flac"))[0]
    wav = load_audio(clip, 16000).reshape(1, 1, -1)[..., :16000]
    narrow.eval(), wide.eval()
    with torch.no_grad():
        codes = narrow.encode(wav)
        assert torch.equal(wide.encode(wav), codes)
        torch.testing.assert_close(wide.decode(codes), narrow.decode(codes), atol=1e-5, rtol=0)

    # the first residual block's 1x1 conv: input 4 -> 6 hidden channels (copies of 0 and 1), output 8 -> 12
    name = "encoder.model.1.block.3.conv"
    old_w, new_w = narrow.get_submodule(name).weight, wide.get_submodule(name).weight
    torch.testing.assert_close(new_w[:8, 0] + new_w[:8, 4], old_w[:, 0])  # the split adds up to the weight
    assert not torch.allclose(new_w[:8, 0], new_w[:8, 4])  # but not in equal halves: the copies can part
    torch.testing.assert_close(new_w[8:, 2:4], old_w[:4, 2:4])  # copied output rows (channels 8-11 = 0-3)
    old_v = narrow.get_submodule(name).parametrizations.weight.original1
    new_v = wide.get_submodule(name).parametrizations.weight.original1
    torch.testing.assert_close(new_v.flatten(1).norm(dim=1)[:8], old_v.flatten(1).norm(dim=1))

    _, module, _ = fit(config("grvq_4cb", "trainer.max_steps=2", "model.seanet.decoder_snake=true",
                              "model.seanet.channels=12"), tmp_path / "wide", init_from=str(saved))
    assert int(module.gen_step) == 2
    with pytest.raises(UserError, match="transformer bottleneck"):
        narrow_t = build_codec(config("grvq_4cb", "model.seanet.bottleneck.kind=transformer").model)
        load_weights_for_training(build_codec(config("grvq_4cb", "model.seanet.bottleneck.kind=transformer",
                                                     "model.seanet.channels=12").model),
                                  str(save_codec(narrow_t, tmp_path / "t.safetensors")))


def test_fine_tune_into_a_deeper_decoder_starts_from_the_files_function(tmp_path):
    """A decoder with more residual blocks per stage than the file's (`seanet.decoder_residual_layers`): the saved
    layers move to their new positions, the added blocks start as the identity and still learn; the encoder is
    untouched, so the codes are the file's too."""
    from safetensors.torch import load_file

    from neurocodec.codecs.checkpoint import build_codec, load_weights_for_training, save_codec

    shallow = build_codec(config("grvq_4cb", "model.seanet.decoder_residual_layers=1").model)
    torch.manual_seed(3)
    with torch.no_grad():  # a model unlike a fresh one: what the names must carry over
        for p in shallow.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    saved = save_codec(shallow, tmp_path / "shallow.safetensors")
    deep = build_codec(config("grvq_4cb", "model.seanet.decoder_residual_layers=3", "model.seanet.dilation_base=3").model)
    n_blocks = 4 * 3  # four decoder stages
    assert sum(type(m).__name__ == "ResidualBlock" for m in deep.decoder.modules()) == n_blocks
    load_weights_for_training(deep, str(saved))
    # decoder layers: conv, LSTM, then per stage ELU, upsampling conv, residual blocks; a final ELU and conv.
    # Shallow: one block per stage at 4, 7, 10, 13; deep: three, the added ones at 5-6, 10-11, 15-16, 20-21.
    moved = {0: 0, 1: 1, 3: 3, 4: 4, 6: 8, 7: 9, 9: 13, 10: 14, 12: 18, 13: 19, 15: 23}
    deep_weights = deep.state_dict()
    decoder_keys = [k for k in load_file(str(saved)) if k.startswith("decoder.model.")]
    assert {int(k.split(".")[2]) for k in decoder_keys} == set(moved)
    for key, value in load_file(str(saved)).items():
        if key.startswith("decoder.model."):
            _, _, index, rest = key.split(".", 3)
            assert torch.equal(deep_weights[f"decoder.model.{moved[int(index)]}.{rest}"], value), key
        else:
            assert torch.equal(deep_weights[key], value), key
    wav = torch.randn(1, 1, 3200) * 0.1
    shallow.eval(), deep.eval()
    with torch.no_grad():
        codes = shallow.encode(wav)
        assert torch.equal(deep.encode(wav), codes)
        torch.testing.assert_close(deep.decode(codes), shallow.decode(codes), atol=1e-6, rtol=0)
    deep.train()
    deep.decoder(torch.randn(1, deep.config.seanet.dimension, 10)).pow(2).sum().backward()
    added = deep.decoder.model[5].block[-1].conv.parametrizations.weight.original0
    assert float(added.grad.abs().max()) > 0  # the new block is not a dead end
    deep_file = save_codec(deep, tmp_path / "deep.safetensors")
    with pytest.raises(UserError, match="model.seanet.dilation_base = 3, this config has 2"):  # same shapes, other dilations
        load_weights_for_training(build_codec(config("grvq_4cb", "model.seanet.decoder_residual_layers=3",
                                                     "model.seanet.dilation_base=2").model), str(deep_file))
    with pytest.raises(UserError, match="network differs"):  # fewer blocks than the file would drop weights
        load_weights_for_training(build_codec(config("grvq_4cb", "model.seanet.decoder_residual_layers=1",
                                                     "model.seanet.dilation_base=3").model), str(deep_file))


def test_fine_tune_into_a_snake_decoder_starts_from_the_files_function(tmp_path):
    """Snake activations grown into a trained ELU decoder (`seanet.decoder_snake`) take the ELUs' places, so every
    saved weight keeps its name; their gates start shut (the file's function, to the sample) and still learn."""
    from neurocodec.codecs.checkpoint import build_codec, load_weights_for_training, save_codec
    from neurocodec.codecs.seanet import ELUSnake

    plain = build_codec(config("grvq_4cb").model)
    torch.manual_seed(4)
    with torch.no_grad():
        for p in plain.decoder.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    saved = save_codec(plain, tmp_path / "plain.safetensors")
    snake = build_codec(config("grvq_4cb", "model.seanet.decoder_snake=true").model)
    snakes = [m for m in snake.decoder.modules() if isinstance(m, ELUSnake)]
    assert snakes and all(bool((m.gate == 1).all()) for m in snakes)  # a fresh network has them open
    load_weights_for_training(snake, str(saved))
    assert all(bool((m.gate == 0).all()) for m in snakes)
    wav = torch.randn(1, 1, 3200) * 0.1
    plain.eval(), snake.eval()
    with torch.no_grad():
        codes = plain.encode(wav)
        assert torch.equal(snake.encode(wav), codes)
        torch.testing.assert_close(snake.decode(codes), plain.decode(codes), atol=0, rtol=0)
    snake.train()
    snake.decoder(torch.randn(1, snake.config.seanet.dimension, 10)).pow(2).sum().backward()
    assert all(float(m.gate.grad.abs().max()) > 0 for m in snakes)
    # A snake file fine-tunes into a snake network as it is (nothing new: the gates keep their values).
    with torch.no_grad():
        for m in snakes:
            m.gate.fill_(0.25)
    again = build_codec(config("grvq_4cb", "model.seanet.decoder_snake=true").model)
    load_weights_for_training(again, str(save_codec(snake, tmp_path / "snake.safetensors")))
    assert all(bool((m.gate == 0.25).all()) for m in again.decoder.modules() if isinstance(m, ELUSnake))
    with pytest.raises(UserError, match="network differs"):  # the other way would drop the Snakes' weights
        load_weights_for_training(build_codec(config("grvq_4cb").model), str(tmp_path / "snake.safetensors"))


def test_export_loads_and_encodes_with_validation_metrics(tmp_path):
    cfg = config("grvq_4cb", "trainer.max_steps=4", "trainer.val_every=2", "trainer.log_every=1",
                 "data.speaker_balance=1.0", "data.speed_perturb=[0.9, 1.0, 1.1]", "trainer.keep_exports=true")
    _, module, export = fit(cfg, tmp_path / "run", loggers=True)
    path = tmp_path / "run" / "codec.safetensors"
    assert export.codec_path == path and path.is_file()
    assert read_metadata(path)["gen_step"] == "4"
    kept = sorted((tmp_path / "run" / "exports").iterdir())  # trainer.keep_exports: one file per export step
    assert [p.name for p in kept] == ["codec_step0000002.safetensors", "codec_step0000004.safetensors"]
    assert read_metadata(kept[0])["gen_step"] == "2" and kept[1].read_bytes() == path.read_bytes()
    codec = load_codec(str(path))
    # The export is the EMA generator: averaged decoder, live encoder (which the live codebooks track).
    names, exported, live = module.ema._names, dict(codec.named_parameters()), dict(module.codec.named_parameters())
    dec, enc = "decoder.model.0.conv.bias", "encoder.model.0.conv.bias"
    averaged_decoder = getattr(module.ema, f"p{names.index(dec)}")
    assert torch.equal(exported[dec], averaged_decoder)
    assert not torch.equal(live[dec].detach(), averaged_decoder)
    assert torch.equal(exported[enc].float(), live[enc].detach())
    codes = codec.encode(torch.randn(1, 1, 8000) * 0.1)
    assert codes.shape == (1, 4, 25)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    metrics = summary["metrics"]
    for key in ("valid/mel", "valid/pesq", "valid/stoi", "valid/codebook0/usage", "valid/codebook3/perplexity"):
        assert key in metrics
    assert metrics["valid/stream_start_overshoot_db"] == pytest.approx(stream_start_overshoot_db(codec, -30.0), abs=0.05)
    shares = summary["train_crops_per_speaker"]  # speaker_balance 1: every demo speaker equally often
    assert len(shares) >= 3 and sum(shares.values()) == pytest.approx(1.0, abs=1e-4)
    assert max(shares.values()) == pytest.approx(min(shares.values()), abs=1e-5)
    csv_header = (tmp_path / "run" / "csv" / "metrics.csv").read_text().splitlines()[0]
    assert "valid/pesq" in csv_header and "train/mel" in csv_header
    assert list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert (tmp_path / "run" / "config.yaml").is_file()


def test_corrupt_file_is_skipped_and_counted(tmp_path):
    rows = [json.loads(line) for line in DEMO.read_text().splitlines() if line.strip()]
    good = [r for r in rows if r.get("split") == "train"][:2]
    for r in good:
        r["path"] = str((DEMO.parent / r["path"]).resolve())
    (tmp_path / "broken.flac").write_bytes(b"not audio at all" * 64)
    extra = [{"id": "broken", "path": "broken.flac", "split": "train"},
             {"id": "valid0", "path": good[0]["path"], "split": "valid"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in good + extra) + "\n")
    cfg = config("grvq_4cb", f"data.manifest={manifest}")
    data = CodecDataModule(cfg.data, 16000, 320)
    data.setup("fit")
    assert len(data.skipped) == 1 and data.skipped[0][0].endswith("broken.flac")
    batch = next(iter(data.train_dataloader()))
    assert batch.shape == (2, 1, 5120) and torch.isfinite(batch).all()


def test_ddp_two_cpu_processes_keep_codebooks_identical(tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, str(REPO / "train" / "fit.py"), "--config", "grvq_4cb", "--preset", "tiny",
           *[f"--{o}" for o in FAST], "--data.manifest", str(DEMO), "--trainer.max_steps", "3",
           "--trainer.accelerator", "cpu", "--trainer.devices", "2", "--trainer.strategy", "ddp",
           "--trainer.root_dir", str(tmp_path), "--trainer.run_name", "ddp", "--trainer.val_every", "3"]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["gen_step"] == 3
    assert len(summary["codebook_sha256_per_rank"]) == 2 and summary["codebooks_in_sync"]
    assert 0 < summary["metrics"]["valid/codebook0/usage"] <= 1  # histograms summed over both ranks
    # The codec was built with sync_codebook: its quantizer all-reduces EMA statistics across ranks.
    assert "codebooks identical on all 2 processes: True" in done.stdout
    assert done.stdout.count("Trained 3 generator steps") == 1  # the summary comes from rank 0 only
    assert load_codec(str(tmp_path / "ddp" / "codec.safetensors")).encode(torch.zeros(1, 1, 640)).shape == (1, 4, 2)


def test_resuming_a_copied_run_folder_continues_in_that_folder(tmp_path):
    """`--ckpt_path COPY/checkpoints/last.ckpt` without --config: the run is COPY, not the folder named by the
    run_name saved in COPY/config.yaml (that mixed two runs' checkpoints and logs in one folder)."""
    import yaml
    from neurocodec.config import load_config

    copy = tmp_path / "copy"
    (copy / "checkpoints").mkdir(parents=True)
    saved = load_config("grvq_4cb", "tiny", [f"trainer.root_dir={tmp_path}", "trainer.run_name=original"])
    (copy / "config.yaml").write_text(yaml.safe_dump(saved))
    ckpt = str(copy / "checkpoints" / "last.ckpt")
    assert choose_run_dir(resolve_config(FitArgs(ckpt_path=ckpt)), ckpt) == copy.resolve()
    # naming a run on the command line still wins
    named = resolve_config(FitArgs(ckpt_path=ckpt, overrides=["trainer.run_name=elsewhere"]))
    assert choose_run_dir(named, ckpt) == tmp_path / "elsewhere"


def test_cli_rejects_unknown_and_mistyped_options(capsys):
    with pytest.raises(ConfigError, match=r"--trainer\.max_stepz"):
        main(["--config", "grvq_4cb", "--trainer.max_stepz", "5"])
    with pytest.raises(ConfigError, match=r"data\.batch_size must be int"):
        main(["--config", "grvq_4cb", "--data.batch_size", "eight"])
    with pytest.raises(ConfigError, match=r"speed_perturb factors must be between 0\.5 and 2\.0"):
        main(["--config", "grvq_4cb", "--data.speed_perturb", "[0.9, 3.0]"])
    assert main(["--config", "fsq", "--preset", "tiny", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--trainer.max_steps", "--optim.disc_start_step", "--disc.kinds", "--loss.mel",
                   "--data.manifest", "--model.quantizer.kind", "--trainer.precision"):
        assert option in out


def test_any_lightning_trainer_argument_passes_through(tmp_path):
    """--trainer.NAME for a Lightning Trainer argument that neurocodec has no option for reaches the Trainer
    (as in Lightning's CLI); default_root_dir is our root_dir; arguments we set say what to use instead."""
    from neurocodec.train.fit import build_trainer

    cfg = config("grvq_4cb", f"trainer.default_root_dir={tmp_path}", "trainer.limit_val_batches=1",
                 "trainer.detect_anomaly=false", "trainer.max_steps=2", "trainer.run_name=through")
    assert cfg.trainer.root_dir == str(tmp_path)
    assert cfg.trainer.lightning_args == {"limit_val_batches": 1, "detect_anomaly": False}
    trainer, _ = build_trainer(cfg, tmp_path / "through", world=1, loggers=False)
    assert trainer.limit_val_batches == 1
    with pytest.raises(ConfigError, match=r"trainer\.val_check_interval is set by neurocodec; use --trainer\.val_every"):
        config("grvq_4cb", "trainer.val_check_interval=5")
    with pytest.raises(ConfigError, match=r"trainer\.limit_val_batchez"):  # not a Trainer argument: still a typo
        config("grvq_4cb", "trainer.limit_val_batchez=1")
    # the command line, end to end: a real two-step run lands under --trainer.default_root_dir
    argv = ["--config", "grvq_4cb", "--preset", "tiny", "--data.manifest", str(DEMO), "--trainer.max_steps", "2",
            "--trainer.default_root_dir", str(tmp_path), "--trainer.run_name", "cli", "--trainer.limit_val_batches", "1"]
    argv += [token for o in FAST for token in ("--" + o.partition("=")[0], o.partition("=")[2])]
    assert main(argv) == 0
    assert (tmp_path / "cli" / "codec.safetensors").is_file()
    saved = yaml.safe_load((tmp_path / "cli" / "config.yaml").read_text())
    assert saved["trainer"]["lightning_args"] == {"limit_val_batches": 1}  # and so a resume keeps it


def test_progress_bar_of_a_resumed_run_rates_only_its_own_steps():
    """Resuming at step 5,000 and taking 10 steps in 2 s shows 5 it/s, not 5,010 / 2."""
    import re
    from types import SimpleNamespace

    from neurocodec.train.progress import GeneratorStepBar

    bar = GeneratorStepBar(max_steps=10_000)
    bar.on_train_start(trainer=None, pl_module=SimpleNamespace(gen_step=torch.tensor(5_000)))
    tqdm_bar = bar.train_progress_bar
    assert (tqdm_bar.n, tqdm_bar.total) == (5_000, 10_000)
    tqdm_bar.start_t -= 2.0  # as if training had started 2 s ago
    tqdm_bar.n = 5_010
    shown = tqdm_bar.format_meter(**tqdm_bar.format_dict)
    tqdm_bar.close()
    assert "5010/10000" in shown
    rate = float(re.search(r"([0-9.]+)it/s", shown).group(1))
    assert 4.0 < rate < 5.1, shown


def test_resume_hint_after_a_time_limit_asks_for_more_time():
    """A run stopped by max_time resumes only with a larger max_time (Lightning restores the timer's count)."""
    from neurocodec.train.config import TrainerConfig
    from neurocodec.train.fit import resume_hint

    timed = TrainerConfig(max_steps=200_000, max_time="00:03:40:00")
    hint = resume_hint(Path("runs/x"), timed, gen_step=32_386)
    assert hint.startswith("python train/fit.py --ckpt_path runs/x/checkpoints/last.ckpt --trainer.max_time 00:07:20:00 ")
    assert hint.endswith("  # the time already trained counts towards it")  # pastes as one command
    assert resume_hint(Path("runs/x"), TrainerConfig(max_time="01:20:00:30"), gen_step=5).split()[5] == "03:16:01:00"
    # reached max_steps (or no time limit): more steps
    finished = TrainerConfig(max_steps=100, max_time="00:01:00:00")
    assert resume_hint(Path("runs/x"), finished, 100).endswith("--trainer.max_steps 200")
    assert resume_hint(Path("runs/x"), TrainerConfig(max_steps=100), 40).endswith("--trainer.max_steps 200")
    # Lightning's one format, checked with the config (before, "01:00:00" passed here and failed in Lightning)
    with pytest.raises(ValueError, match="DD:HH:MM:SS"):
        TrainerConfig(max_time="01:00:00")
