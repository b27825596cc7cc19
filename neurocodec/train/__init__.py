"""Codec training: Lightning module, losses, discriminators, data module, EMA, export (see fit.py)."""
