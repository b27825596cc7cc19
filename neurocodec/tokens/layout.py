"""Turning codes [K, T] into one token sequence for a language model, and back.

Two layouts, both exactly invertible:

* **flat** (frame-major): `seq[t * K + k] = codes[k, t]`, length `K * T`. With `offset=True` codebook k's
  ids are shifted by the sum of the cardinalities of codebooks 0..k-1, so all codebooks share one
  vocabulary without collisions (vocabulary size = sum of cardinalities).
* **delay** (MusicGen's delay pattern): codebook k is shifted right by k frames,
  `delayed[k, t] = codes[k, t - k]`, giving [K, T + K - 1]; the cells before a codebook starts and after it
  ends hold `pad_id` (default: the largest cardinality, i.e. one id past every real code). An LM then
  predicts all K codebooks of a step in parallel, codebook k conditioned on the coarser codebooks' earlier
  frames. `undelay` is the exact inverse.

Functions take numpy arrays (or anything `np.asarray` accepts, e.g. a CPU torch tensor) with codebooks in
the second-to-last axis, so batches [..., K, T] work too.
"""

from __future__ import annotations

import numpy as np

from ..errors import CodesError


def _as_codes(codes) -> np.ndarray:
    arr = np.asarray(codes)
    if arr.ndim < 2:
        raise CodesError(f"codes must have shape [..., K, T], got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise CodesError(f"codes must be integers, got {arr.dtype}")
    return arr


def codebook_offsets(cardinalities: list[int]) -> np.ndarray:
    """Start of each codebook's id range in the shared vocabulary of `flatten(..., offset=True)`."""
    return np.concatenate([[0], np.cumsum(cardinalities)[:-1]]).astype(np.int64)


def flatten(codes, cardinalities: list[int] | None = None) -> np.ndarray:
    """[..., K, T] -> [..., T*K], frame-major. With `cardinalities`, ids are offset per codebook."""
    arr = _as_codes(codes).astype(np.int64)
    if cardinalities is not None:
        if len(cardinalities) != arr.shape[-2]:
            raise CodesError(f"{len(cardinalities)} cardinalities for {arr.shape[-2]} codebooks")
        arr = arr + codebook_offsets(cardinalities)[:, None]
    return np.swapaxes(arr, -1, -2).reshape(*arr.shape[:-2], -1)


def unflatten(seq, num_codebooks: int, cardinalities: list[int] | None = None) -> np.ndarray:
    """Inverse of `flatten`: [..., T*K] -> [..., K, T]."""
    arr = np.asarray(seq).astype(np.int64)
    if arr.shape[-1] % num_codebooks:
        raise CodesError(f"sequence length {arr.shape[-1]} is not a multiple of {num_codebooks} codebooks")
    out = np.swapaxes(arr.reshape(*arr.shape[:-1], -1, num_codebooks), -1, -2)
    if cardinalities is not None:
        out = out - codebook_offsets(cardinalities)[:, None]
    return np.ascontiguousarray(out)


def delay(codes, pad_id: int) -> np.ndarray:
    """MusicGen delay pattern: [..., K, T] -> [..., K, T + K - 1], codebook k shifted right by k."""
    arr = _as_codes(codes).astype(np.int64)
    k, t = arr.shape[-2], arr.shape[-1]
    out = np.full((*arr.shape[:-2], k, t + k - 1), pad_id, dtype=np.int64)
    for i in range(k):
        out[..., i, i:i + t] = arr[..., i, :]
    return out


def undelay(delayed, num_frames: int | None = None) -> np.ndarray:
    """Inverse of `delay`: [..., K, S] -> [..., K, S - K + 1] (or `num_frames` if given and shorter)."""
    arr = _as_codes(delayed).astype(np.int64)
    k, s = arr.shape[-2], arr.shape[-1]
    t = s - k + 1
    if t < 0:
        raise CodesError(f"a delayed sequence of {s} steps cannot hold {k} codebooks")
    if num_frames is not None:
        t = min(t, num_frames)
    out = np.stack([arr[..., i, i:i + t] for i in range(k)], axis=-2)
    return np.ascontiguousarray(out)


def delay_mask(num_codebooks: int, num_frames: int) -> np.ndarray:
    """Bool [K, T + K - 1]: True where `delay` put a real code (False: pad cells, no loss there)."""
    mask = np.zeros((num_codebooks, num_frames + num_codebooks - 1), dtype=bool)
    for i in range(num_codebooks):
        mask[i, i:i + num_frames] = True
    return mask
