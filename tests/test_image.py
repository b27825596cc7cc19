"""The image codec family: shapes and bpp, training, CLI (PNG/JPEG in, PNG out, one-line errors), eval vs
JPEG/WebP, export of image folders, the sample-photo builder. Tiny models and small images throughout."""

from __future__ import annotations

import io
import json
import math
import zipfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from neurocodec.cli import main
from neurocodec.codecs.checkpoint import build_codec, load_codec
from neurocodec.config import ConfigError
from neurocodec.errors import CodesError, UserError

TINY_NET = {"channels": 8, "ch_mult": [1, 2, 2, 2], "num_res_blocks": 1, "latent_dim": 8, "mid_attention": True}
QUANTIZERS = {
    "rfsq": ({"kind": "rfsq", "levels": [8, 5, 5, 5], "num_quantizers": 3, "quantize_dropout": True}, [1000] * 3),
    "fsq": ({"kind": "fsq", "levels": [8, 8, 8, 5, 5, 5]}, [64000]),
    "grvq": ({"kind": "grvq", "codebook_size": 64, "groups": 2, "num_quantizers": 2, "kmeans_iters": 2}, [64] * 4),
    "vq": ({"kind": "vq", "codebook_size": 128, "codebook_dim": 4, "kmeans_iters": 2}, [128]),
    "lfq": ({"kind": "lfq", "codebook_size": 256}, [256]),
}


def model_section(kind: str = "rfsq", **net) -> dict:
    return {"family": "image", "seed": 0, "image": {**TINY_NET, **net}, "quantizer": QUANTIZERS[kind][0]}


def smooth_image(h: int, w: int, seed: int) -> np.ndarray:
    """A photo-like uint8 RGB image: smooth colour field + edges + a little texture."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, 4, 5))).float()
    img = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False)[0]
    yy, xx = np.mgrid[0:h, 0:w]
    img += torch.from_numpy(((xx + 2 * yy) % 23 < 5) * 0.25).float()
    img += 0.03 * torch.from_numpy(rng.standard_normal((3, h, w))).float()
    return (img.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()


@pytest.fixture
def image_folder(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(smooth_image(48, 64, 1)).save(folder / "a.png")
    Image.fromarray(smooth_image(40, 56, 2)).save(folder / "b.jpg", quality=92)
    return folder


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "image_tiny.yaml"
    path.write_text(yaml.safe_dump({"name": "image_tiny", "model": model_section("rfsq")}))
    return str(path)


# -- model: shapes, bpp, codes -----------------------------------------------------------------------------
@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_token_grid_shapes_and_bpp(kind):
    codec = build_codec(model_section(kind)).eval()
    codec.set_exact_encoding(True)
    cards = QUANTIZERS[kind][1]
    assert codec.quantizer.cardinalities == cards
    img = torch.rand(2, 3, 37, 50)  # not multiples of f = 8: padded to 40 x 56
    codes = codec.encode(img)
    assert codes.shape == (2, len(cards), 5, 7)
    assert int(codes.min()) >= 0 and all(int(codes[:, k].max()) < cards[k] for k in range(len(cards)))
    out = codec.decode(codes)
    assert out.shape == (2, 3, 40, 56) and float(out.min()) >= 0 and float(out.max()) <= 1
    # bits = sum_k log2(card_k) * grid cells, over the pixels of the (unpadded) image
    expected = sum(math.log2(c) for c in cards) * 5 * 7 / (37 * 50)
    assert codec.bpp(37, 50) == pytest.approx(expected)
    assert codec.bits_per_token == pytest.approx(sum(math.log2(c) for c in cards))
    # each image is coded independently of the batch it is in
    assert torch.equal(codec.encode(img[1:]), codes[1:])


@pytest.mark.parametrize("name,grid", [("image_fsq", 8), ("image_vq", 4)])
def test_shipped_image_configs_load_at_tiny_size(name, grid):
    codec = load_codec(f"{name}:tiny")  # seeded weights, codebook warm start on photo-like noise
    codes = codec.encode(torch.rand(1, 3, 64, 64))
    assert codes.shape == (1, codec.num_codebooks, 64 // codec.downsample, 64 // codec.downsample)
    assert codec.downsample * grid == 64 and codec.decode(codes).shape == (1, 3, 64, 64)
    assert torch.equal(load_codec(f"{name}:tiny").encode(torch.ones(1, 3, 64, 64) / 2), codec.encode(torch.ones(1, 3, 64, 64) / 2))


def test_fewer_codebooks_truncates_and_lowers_bpp():
    codec = build_codec(model_section("rfsq")).eval()
    img = torch.rand(1, 3, 32, 32)
    full = codec.encode(img)
    codec.set_num_codebooks(1)
    one = codec.encode(img)
    assert one.shape == (1, 1, 4, 4) and torch.equal(one, full[:, :1])
    assert codec.bpp(32, 32) == pytest.approx(math.log2(1000) * 16 / 1024)
    assert codec.decode(one).shape == (1, 3, 32, 32)
    with pytest.raises(CodesError):
        codec.set_num_codebooks(5)


def test_bad_codes_and_config_are_user_errors():
    codec = build_codec(model_section("rfsq")).eval()
    codes = torch.zeros(1, 3, 2, 2, dtype=torch.long)
    codes[0, 1, 1, 0] = 1000
    with pytest.raises(CodesError, match="out of range"):
        codec.decode(codes)
    with pytest.raises(CodesError):
        codec.decode(torch.zeros(1, 3, 4, dtype=torch.long))  # audio-shaped codes
    with pytest.raises(ConfigError, match="model.image.chanels"):
        build_codec({**model_section("rfsq"), "image": {"chanels": 8}})


# -- training ----------------------------------------------------------------------------------------------
def test_tiny_image_codec_trains_and_lowers_its_loss(tmp_path, image_folder):
    from neurocodec.image.losses import reconstruction_losses
    from neurocodec.image.train import parse_image_train_config, run_image_training

    # a user-supplied perceptual network (TorchScript), as the perceptual loss expects
    feat = torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU()))
    feat_path = tmp_path / "features.pt"
    feat.save(str(feat_path))
    raw = {
        "name": "image_test", "model": model_section("rfsq"),
        "data": {"train": str(image_folder), "valid": str(image_folder), "crop": 32, "valid_crop": 32,
                 "batch_size": 4, "valid_batch_size": 4, "epoch_length": 16, "valid_crops_per_image": 1},
        "loss": {"l1": 1.0, "ms_ssim": 0.5, "perceptual": 0.1, "perceptual_model": str(feat_path),
                 "adversarial": 0.1, "feature": 1.0},
        "optim": {"lr": 3e-3, "disc_lr": 1e-3, "disc_start_step": 45, "ema_decay": 0.0},
        "disc": {"channels": 8, "layers": 2},
        "trainer": {"max_steps": 50, "val_every": 50, "log_every": 5, "accelerator": "cpu",
                    "enable_progress_bar": False, "root_dir": str(tmp_path / "runs")},
    }
    config = parse_image_train_config(raw)
    from neurocodec.image.data import FixedCrops, read_folder

    fixed = torch.stack(list(FixedCrops(read_folder(image_folder)[0], 32, 1)))  # the centre crop of each image

    def loss_of(codec) -> float:
        with torch.no_grad():
            out = codec.eval()(fixed)
        return float(reconstruction_losses(out.image, fixed, config.loss, None)["l1"])

    before = loss_of(build_codec(config.model))
    trainer, module, export = run_image_training(config, tmp_path / "runs" / "t", loggers=False)
    assert int(module.gen_step) == 50
    assert trainer.global_step == 50 + 5  # 5 discriminator steps after disc_start_step
    after = loss_of(module.codec)
    assert after < 0.8 * before, (before, after)
    assert "valid/psnr" in export.summary["metrics"] and "valid/usage_mean" in export.summary["metrics"]
    codec = load_codec(export.codec_path)  # the exported checkpoint loads through the normal path
    assert codec.encode(fixed).shape == (2, 3, 4, 4)
    with pytest.raises(ConfigError, match="data.crop"):
        parse_image_train_config({**raw, "data": {**raw["data"], "crop": "big"}})



def test_image_fine_tuning_counts_the_steps_of_the_model_it_started_from(tmp_path, image_folder):
    """--init_from for image codecs: the exported codec's total_steps counts the parent's steps, resume keeps it."""
    from neurocodec.codecs.checkpoint import lineage_steps, read_metadata
    from neurocodec.image.train import parse_image_train_config, run_image_training

    def config(max_steps: int):
        return parse_image_train_config({
            "name": "image_ft", "model": model_section("rfsq"),
            "data": {"train": str(image_folder), "valid": str(image_folder), "crop": 32, "valid_crop": 32,
                     "batch_size": 2, "valid_batch_size": 2, "epoch_length": 4, "valid_crops_per_image": 1},
            "loss": {"adversarial": 0.0, "feature": 0.0}, "optim": {"disc_start_step": 100},
            "trainer": {"max_steps": max_steps, "val_every": 100, "accelerator": "cpu", "enable_progress_bar": False}})

    _, _, parent = run_image_training(config(3), tmp_path / "parent", loggers=False)
    assert lineage_steps(read_metadata(parent.codec_path)) == 3
    _, _, export = run_image_training(config(2), tmp_path / "child", loggers=False,
                                      init_from=str(parent.codec_path))
    meta = read_metadata(export.codec_path)
    assert (int(meta["gen_step"]), int(meta["steps_before"]), int(meta["total_steps"])) == (2, 3, 5)
    _, resumed, export = run_image_training(config(4), tmp_path / "child", loggers=False,
                                            ckpt_path=str(tmp_path / "child" / "checkpoints" / "last.ckpt"))
    assert (int(resumed.gen_step), resumed.steps_before) == (4, 3)
    assert lineage_steps(read_metadata(export.codec_path)) == 7
    with pytest.raises(UserError, match="the default model is an audio codec"):
        run_image_training(config(1), tmp_path / "x", loggers=False, init_from="default")

def test_fit_dispatches_image_configs(image_folder, tmp_path, capsys):
    from neurocodec.train.fit import main as fit_main

    assert fit_main(["--config", "image_fsq", "--preset", "tiny", "--print_config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["family"] == "image" and printed["data"]["crop"] == 64
    with pytest.raises(ConfigError, match="loss.msssim"):
        fit_main(["--config", "image_fsq", "--preset", "tiny", "--loss.msssim", "1", "--print_config"])


# -- CLI ---------------------------------------------------------------------------------------------------
def test_cli_png_and_jpeg_in_png_out(image_folder, tmp_path, tiny_config, capsys):
    for name in ("a.png", "b.jpg"):
        src = image_folder / name
        w, h = Image.open(src).size
        codes_path, out = tmp_path / f"{name}.npy", tmp_path / f"{name}.png"
        assert main(["encode", str(src), "-o", str(codes_path), "--model", tiny_config]) == 0
        codes = np.load(codes_path)
        assert codes.dtype == np.int32 and codes.shape == (3, -(-h // 8), -(-w // 8))
        assert main(["decode", str(codes_path), "-o", str(out), "--model", tiny_config, "--size", f"{w}x{h}"]) == 0
        assert Image.open(out).size == (w, h) and Image.open(out).mode == "RGB"
    assert main(["encode", str(image_folder / "a.png"), "-o", str(tmp_path / "k1.npy"), "--model", tiny_config,
                 "--num-codebooks", "1"]) == 0
    assert np.load(tmp_path / "k1.npy").shape[0] == 1
    assert main(["info", "--model", tiny_config]) == 0
    assert "bits per pixel" in capsys.readouterr().out


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_cli_bad_inputs_are_one_line_errors(image_folder, tmp_path, tiny_config, speech_wav, capsys):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    assert main(["encode", str(corrupt), "-o", str(tmp_path / "c.npy"), "--model", tiny_config]) == 2
    assert "not a readable image" in one_line_error(capsys)
    # an image given to an audio model, audio given to an image model
    assert main(["encode", str(image_folder / "a.png"), "-o", str(tmp_path / "c.npy"), "--model", "grvq_4cb:tiny"]) == 2
    assert "audio codec" in one_line_error(capsys)
    assert main(["encode", str(speech_wav), "-o", str(tmp_path / "c.npy"), "--model", tiny_config]) == 2
    assert "image codec" in one_line_error(capsys)
    # out-of-range tokens, audio-shaped codes, a non-image output name
    bad = np.zeros((3, 2, 2), dtype=np.int32)
    bad[2, 1, 1] = 5000
    np.save(tmp_path / "bad.npy", bad)
    assert main(["decode", str(tmp_path / "bad.npy"), "-o", str(tmp_path / "o.png"), "--model", tiny_config]) == 2
    assert "out of range" in one_line_error(capsys)
    np.save(tmp_path / "flat.npy", np.zeros((3, 10), dtype=np.int32))
    assert main(["decode", str(tmp_path / "flat.npy"), "-o", str(tmp_path / "o.png"), "--model", tiny_config]) == 2
    assert "[K, h, w]" in one_line_error(capsys)
    np.save(tmp_path / "ok.npy", np.zeros((3, 2, 2), dtype=np.int32))
    assert main(["decode", str(tmp_path / "ok.npy"), "-o", str(tmp_path / "o.wav"), "--model", tiny_config]) == 2
    assert "image file" in one_line_error(capsys)


# -- eval against JPEG / WebP ---------------------------------------------------------------------------
def test_eval_compares_with_jpeg_and_webp_at_matched_bpp(image_folder, tmp_path, tiny_config, capsys):
    report = tmp_path / "report"
    assert main(["eval", "--model", tiny_config, "--data", str(image_folder), "--num-codebooks", "1", "3",
                 "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "jpeg @ours K=3" in out and "webp @ours K=1" in out
    payload = json.loads((report / "results.json").read_text())
    systems = {s["system"]: s for s in payload["systems"]}
    assert set(systems) == {f"{c} K={k}" if c == "ours" else f"{c} @ours K={k}"
                            for c in ("ours", "jpeg", "webp") for k in (1, 3)}
    for k in (1, 3):
        ours = systems[f"ours K={k}"]
        assert ours["bpp"]["n"] == 2
        for b in ("jpeg", "webp"):
            base = systems[f"{b} @ours K={k}"]
            for row, q in zip(base["per_image"], base["quality"]):  # matched: not above our rate unless q = 1
                our_row = next(r for r in ours["per_image"] if r["image"] == row["image"])
                assert row["bpp"] <= our_row["bpp"] + 1e-12 or q == 1
            assert 0 < base["psnr"]["mean"] < 100 and 0 < base["ms_ssim"]["mean"] <= 1
    assert systems["ours K=3"]["bpp"]["mean"] == pytest.approx(3 * systems["ours K=1"]["bpp"]["mean"])
    assert len(payload["curves"]["jpeg"]) >= 5 and (report / "rd.png").stat().st_size > 10000
    assert (report / "report.md").read_text().count("ours K=") >= 2


def test_psnr_and_ssim_of_identical_and_noisy_images():
    from neurocodec.image.metrics import ms_ssim, ms_ssim_scales, psnr, ssim

    x = torch.from_numpy(smooth_image(64, 64, 3)).permute(2, 0, 1).float().unsqueeze(0) / 255
    noisy = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    assert float(psnr(noisy, x)[0]) == pytest.approx(-10 * math.log10(float((noisy - x).pow(2).mean())), rel=1e-5)
    assert float(ssim(x, x)) == pytest.approx(1.0, abs=1e-4) and float(ssim(noisy, x)) < 0.9
    assert ms_ssim_scales(64, 64) == 3 and ms_ssim_scales(161, 400) == 5
    assert float(ms_ssim(x, x)) == pytest.approx(1.0, abs=1e-4) and float(ms_ssim(noisy, x)) < 0.95


# -- export ------------------------------------------------------------------------------------------------
def test_export_image_folder_to_parquet(image_folder, tmp_path, tiny_config, capsys):
    (image_folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "tokens"
    args = ["export", "--model", tiny_config, "--manifest", str(image_folder), "--out", str(out), "--shard-size", "1"]
    assert main(args) == 0
    info = json.loads((out / "dataset.json").read_text())
    assert info["rows"] == 2 and info["num_bad"] == 1 and len(info["files"]) == 3  # the broken file's shard is empty
    rows = {}
    for f in sorted(out.glob("shard-*.parquet")):
        for row in pq.read_table(f).to_pylist():
            rows[row["id"]] = row
    assert set(rows) == {"a", "b"}
    codec = load_codec(tiny_config)
    from neurocodec.image.io import load_image

    for name, file in (("a", "a.png"), ("b", "b.jpg")):
        expected = codec.encode(load_image(image_folder / file).unsqueeze(0))[0].numpy()
        assert np.array_equal(np.asarray(rows[name]["codes"]), expected)  # same tokens as `neurocodec encode`
        assert rows[name]["bpp"] == pytest.approx(codec.bpp(rows[name]["height"], rows[name]["width"]))
    mtimes = {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*.parquet")}
    assert main(args) == 0  # resume: finished shards are kept
    assert mtimes == {f.name: f.stat().st_mtime_ns for f in out.glob("shard-*.parquet")}
    capsys.readouterr()
    assert main(args[:-2] + ["--shard-size", "2"]) == 2  # another export into the same folder is refused
    assert "different export" in one_line_error(capsys)


# -- sample photographs ------------------------------------------------------------------------------------
def test_sample_photos_from_a_wheel(tmp_path):
    from neurocodec.image.sample_data import PHOTOS, build_image_folder

    wheel = tmp_path / "scikit_image-0.26.0-cp311-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        for i, photo in enumerate(PHOTOS):
            buf = io.BytesIO()
            fmt = "JPEG" if photo.file.endswith(".jpg") else "PNG"
            Image.fromarray(smooth_image(24, 32, i)).save(buf, format=fmt)
            zf.writestr(f"skimage/data/{photo.file}", buf.getvalue())
    out = tmp_path / "images"
    info = build_image_folder(out, wheel=wheel)
    assert info == {"reused": False, "train": 9, "valid": 1, "test": 2}
    assert sorted(p.name for p in (out / "test").iterdir()) == ["chelsea.png", "coffee.png"]
    assert "CC0" in (out / "SOURCES.md").read_text()
    assert build_image_folder(out, wheel=wheel)["reused"] is True
    with pytest.raises(UserError):
        build_image_folder(tmp_path / "x", wheel=tmp_path / "missing.whl")


def test_the_audio_service_refuses_an_image_model():
    from neurocodec.serve.server import ServerOptions, load_models

    with pytest.raises(UserError, match="image codec; the service streams audio codecs only"):
        load_models(ServerOptions(models=["image_fsq:tiny"], port=0))
