"""The image family's entry in the codec registry (pyproject.toml, entry point `neurocodec.families:image`).

Image codecs train with their own data, losses and module (`train.py`), and the commands that take audio
elsewhere take images here: the hooks below replace their audio paths (see codecs/registry.py).
"""

from __future__ import annotations

from ..codecs.registry import Family
from .io import IMAGE_SUFFIXES
from .model import ImageCodec

FAMILY = Family(
    name="image", modality="image", codec_class=ImageCodec, training="neurocodec.image.train:main",
    commands={
        "encode": "neurocodec.image.commands:encode_image",
        "decode": "neurocodec.image.commands:decode_image",
        "info": "neurocodec.image.commands:print_info",
        "eval": "neurocodec.image.evaluate:cmd_eval_image",
        "export": "neurocodec.image.export:export_image_tokens",
    },
    input_suffixes=IMAGE_SUFFIXES)
