"""The image codec family: 2-D conv encoder/decoder (VQGAN-style) around the same quantizer adapter as the
audio codecs, trained with L1 + SSIM/MS-SSIM (+ optional perceptual) + PatchGAN losses.

Where things live: `family.py` (its entry in the codec registry: the codec class, the training entry and the
hooks that give `encode`, `decode`, `info`, `eval` and `export` their image paths), `model.py` (the codec and
its config), `io.py` (reading/writing PNG/JPEG with Pillow), `losses.py`, `discriminator.py`, `data.py`
(image folders, random crops), `train.py` (Lightning module and the `train/fit.py` entry), `evaluate.py`
(PSNR/SSIM/MS-SSIM/bpp vs JPEG and WebP, rate-distortion plot), `export.py` (token grids as Parquet),
`sample_data.py` (the real photographs shipped in scikit-image's wheel), `commands.py` (CLI glue).
"""
