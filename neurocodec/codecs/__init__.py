"""Codecs: streaming modules, encoders/decoders, the quantizer adapter and the codec families."""
