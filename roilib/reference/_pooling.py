"""Max over integer windows with torchvision's tie rule, shared by RoIPool and SPP."""
from __future__ import annotations

from typing import Tuple

import numpy as np



def _reduce_bins(a: np.ndarray, bins, axis: int, with_arg: bool):
    """Max (and first argmax) of ``a`` over each ``[start, end)`` range along ``axis``.

    Each bin is a view, so nothing is gathered; empty bins give 0 and index 0.
    """
    starts, ends = bins
    shape = list(a.shape)
    shape[axis] = len(starts)
    best = np.zeros(shape, dtype=a.dtype)
    arg = np.zeros(shape, dtype=np.int64) if with_arg else None
    for i, (s, e) in enumerate(zip(starts.tolist(), ends.tolist())):
        if e <= s:
            continue
        window = a[:, s:e] if axis == 1 else a[s:e]
        at = (slice(None), i) if axis == 1 else (i,)
        if with_arg:
            first = window.argmax(axis=axis)
            arg[at] = first + s
            best[at] = np.take_along_axis(window, np.expand_dims(first, axis), axis=axis).squeeze(axis)
        else:
            best[at] = window.max(axis=axis)
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
    arg_col = None
    if with_arg:
        arg_col = np.take_along_axis(row_arg, arg_row, axis=0)
    return values, arg_row, arg_col, empty


def scatter_argmax(shape, flat_index: np.ndarray, weights: np.ndarray, dtype) -> np.ndarray:
    """Sum ``weights`` into a zero array of ``shape`` at ``flat_index`` (repeats add up).

    ``np.bincount`` adds in index order, so the result is deterministic.
    """
    total = int(np.prod(shape))
    out = np.bincount(flat_index, weights=weights, minlength=total)
    return out.reshape(shape).astype(dtype)
