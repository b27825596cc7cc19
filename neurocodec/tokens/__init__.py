"""Token datasets: `neurocodec export` writes them (export.py), `TokenDataset` reads them (reader.py).

Format: format.py. LM sequence layouts (flat frame-major, MusicGen delay pattern, and their inverses): layout.py.
"""

from .layout import codebook_offsets, delay, delay_mask, flatten, undelay, unflatten
from .reader import TokenDataset, load_hf, load_table, to_sequence

__all__ = ["TokenDataset", "load_table", "load_hf", "to_sequence", "flatten", "unflatten", "delay", "undelay",
           "delay_mask", "codebook_offsets"]
