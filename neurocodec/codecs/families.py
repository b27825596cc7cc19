"""The registry of codec families: `model.family` in a config -> the class that builds it.

`checkpoint.build_codec` (and so `load_codec`, training, serving and export) look families up here, so a new
family is one module plus one line below. Each class takes `(config: CodecConfig, sync_codebook: bool)` and
implements the codec interface described in `model.py`.
"""

from __future__ import annotations

from torch import nn

from ..image.model import ImageCodec
from .model import Codec
from .semanticodec import SemantiCodec
from .xy_single import XYSingleCodec

FAMILIES: dict[str, type[nn.Module]] = {
    "seanet": Codec,
    "semanticodec": SemantiCodec,  # codecs/semanticodec.py: k-means semantic tokens + acoustic RVQ
    "xy_single": XYSingleCodec,  # codecs/xy_single.py: semantic + acoustic branches, one codebook
    "image": ImageCodec,  # neurocodec/image: 2-D token grids, same quantizer adapter
}
