"""Memory layout helpers shared by the reference ops.

The reference works channels-last, ``(N, H, W, C)``: a box then touches a small block
of rows and columns whose channels are contiguous, so each box costs a couple of BLAS
calls over all channels at once instead of a Python loop over channels.
"""
from __future__ import annotations

import numpy as np

from .._validate import compute_dtype


def channels_last(x: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` -> contiguous ``(N, H, W, C)`` in the compute dtype."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=compute_dtype(x.dtype))


def channels_first(x: np.ndarray, dtype) -> np.ndarray:
    """``(..., H, W, C)`` -> contiguous ``(..., C, H, W)`` cast to ``dtype``."""
    axes = tuple(range(x.ndim - 3)) + (x.ndim - 1, x.ndim - 3, x.ndim - 2)
    return np.ascontiguousarray(x.transpose(axes), dtype=dtype)


def block(index: np.ndarray):
    """A slice when ``index`` (sorted, unique) is a contiguous run, else the index itself.

    Slicing keeps the gathered block a view; fancy indexing would copy it.
    """
    if index.size and index[-1] - index[0] + 1 == index.size:
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _block_index(rows: np.ndarray, cols: np.ndarray):
    """Index of ``plane[rows][:, cols]``: slices for contiguous runs, ``ix_`` if neither is."""
    r, c = block(rows), block(cols)
    if isinstance(r, slice) or isinstance(c, slice):
        return r, c  # at most one advanced index: NumPy keeps the (rows, cols) layout
    return np.ix_(r, c)


def take_block(plane: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``plane[rows][:, cols]`` for a ``(H, W, C)`` plane, as a view where possible."""
    return plane[_block_index(rows, cols)]


def add_block(plane: np.ndarray, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
    """``plane[rows][:, cols] += values`` in place (rows and cols are unique)."""
    plane[_block_index(rows, cols)] += values
