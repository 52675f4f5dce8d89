"""Max over integer windows with torchvision's tie rule, shared by RoIPool and SPP."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from ..geometry import bin_membership


def window_max(
    region: np.ndarray,
    row_bins: Tuple[np.ndarray, np.ndarray],
    col_bins: Tuple[np.ndarray, np.ndarray],
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

    Returns
    -------
    values : ndarray, shape (P, Q, C)
        Window maxima; 0 for empty windows.
    arg_row, arg_col : ndarray of int64, shape (P, Q, C)
        Where each max sits in ``region``.
    empty : ndarray of bool, shape (P, Q)
    """
    col_index, col_empty = bin_membership(*col_bins)
    row_index, row_empty = bin_membership(*row_bins)
    n_q, n_c = col_index.shape[0], region.shape[2]
    q = np.arange(n_q)[None, :, None]
    ch = np.arange(n_c)
    by_col = region[:, col_index, :]  # (R, Q, Lc, C)
    first_col = by_col.argmax(axis=2)  # (R, Q, C)
    row_max = np.take_along_axis(by_col, first_col[:, :, None, :], axis=2)[:, :, 0, :]
    row_arg = col_index[q, first_col]  # (R, Q, C)
    by_row = row_max[row_index]  # (P, Lr, Q, C)
    first_row = by_row.argmax(axis=1)  # (P, Q, C)
    values = np.take_along_axis(by_row, first_row[:, None], axis=1)[:, 0]
    arg_row = row_index[np.arange(row_index.shape[0])[:, None, None], first_row]
    arg_col = row_arg[arg_row, q, ch]
    empty = row_empty[:, None] | col_empty[None, :]
    values[empty] = 0
    return values, arg_row, arg_col, empty


def scatter_argmax(shape, flat_index: np.ndarray, weights: np.ndarray, dtype) -> np.ndarray:
    """Sum ``weights`` into a zero array of ``shape`` at ``flat_index`` (repeats add up).

    ``np.bincount`` adds in index order, so the result is deterministic.
    """
    total = int(np.prod(shape))
    out = np.bincount(flat_index, weights=weights, minlength=total)
    return out.reshape(shape).astype(dtype)
