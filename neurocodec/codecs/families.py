"""The registry of codec families: `model.family` in a config -> the class that builds it.

`checkpoint.build_codec` (and so `load_codec`, training, serving and export) look families up here, so a new
family is one module plus one line below. Each class takes `(config: CodecConfig, sync_codebook: bool)` and
implements the codec interface described in `model.py`.
"""

from __future__ import annotations

from torch import nn

from .model import Codec

FAMILIES: dict[str, type[nn.Module]] = {
    "seanet": Codec,
}
