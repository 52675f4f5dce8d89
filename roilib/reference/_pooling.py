"""Max over integer windows with torchvision's tie rule, shared by RoIPool and SPP.

Works channels-last, ``(R, S, C)``: reducing a window over rows or columns is then an
elementwise max of contiguous channel vectors, which NumPy vectorises well. Finding
*where* the max sits uses the same elementwise machinery (see :func:`_reduce_bins`)
instead of ``argmax`` along a strided axis, which is an order of magnitude slower.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np


def _first_hit(window: np.ndarray, best: np.ndarray, axis: int) -> np.ndarray:
    """Index of the first entry of ``window`` along ``axis`` equal to ``best``.

    Entry ``j`` of ``n`` is ranked ``n - j``; the largest rank among the hits is the
    first hit. A NaN max has no hit and falls back to the last index.
    """
    n = window.shape[axis]
    shape = [1] * window.ndim
    shape[axis] = n
    rank = np.arange(n, 0, -1, dtype=np.uint8 if n < 256 else np.uint32).reshape(shape)
    hit = window == np.expand_dims(best, axis)
    return np.minimum(n - (hit.view(np.uint8) * rank).max(axis=axis).astype(np.int64), n - 1)


def _reduce_bins(a: np.ndarray, bins, axis: int, with_arg: bool):
    """Max (and first argmax) of ``a`` over each ``[start, end)`` range along ``axis`` (0 or 1).

    The bins become ``axis``; empty bins give 0 and index 0.
    """
    starts, ends = bins
    shape = list(a.shape)
    shape[axis] = len(starts)
    best = np.zeros(shape, dtype=a.dtype)
    arg = np.zeros(shape, dtype=np.int64) if with_arg else None
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        if e <= s:
            continue
        window, at = (a[s:e], (i,)) if axis == 0 else (a[:, s:e], (slice(None), i))
        best[at] = window.max(axis=axis)
        if with_arg:
            arg[at] = _first_hit(window, best[at], axis) + s
    return best, arg


def window_max(
    region: np.ndarray,
    row_bins: Tuple[np.ndarray, np.ndarray],
    col_bins: Tuple[np.ndarray, np.ndarray],
    with_arg: bool = False,
):
    """Max of each ``row bin x column bin`` window of a channels-last block.

    Ties go to the first pixel in row-major order (smallest row, then smallest column),
    which is what a C loop ``for h: for w: if (v > best)`` picks. Reducing columns first
    and then rows keeps that order: the winning row is the first row holding the max, and
    within it the first column.

    Parameters
    ----------
    region : ndarray, shape (R, S, C)
        The block of the map the bins index into.
    row_bins, col_bins : (start, end) pairs of int arrays, shapes (P,) and (Q,)
        Bin ranges relative to ``region``; bins may overlap or be empty.
    with_arg : bool
        Also locate the maxima (for the backward pass).

    Returns
    -------
    values : ndarray, shape (P, Q, C)
        Window maxima; 0 for empty windows.
    arg_row, arg_col : ndarray of int64, shape (P, Q, C), or None
        Where each max sits in ``region`` (only with ``with_arg``).
    empty : ndarray of bool, shape (P, Q)
    """
    row_max, row_arg = _reduce_bins(region, col_bins, 1, with_arg)  # (R, Q, C)
    values, arg_row = _reduce_bins(row_max, row_bins, 0, with_arg)  # (P, Q, C)
    empty = (row_bins[1] <= row_bins[0])[:, None] | (col_bins[1] <= col_bins[0])[None, :]
    values[empty] = 0
    arg_col = np.take_along_axis(row_arg, arg_row, axis=0) if with_arg else None
    return values, arg_row, arg_col, empty
