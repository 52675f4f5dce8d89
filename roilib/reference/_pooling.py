"""Max over integer windows, shared by RoIPool, RoIWarp and SPP.

:func:`window_max` finds the maxima *and where they sit*, with torchvision's tie rule.
It works channels-last, ``(R, S, C)``: reducing a window over rows or columns is then an
elementwise max of contiguous channel vectors, which NumPy vectorises well. Finding
*where* the max sits uses the same elementwise machinery (see :func:`_reduce_bins`)
instead of ``argmax`` along a strided axis, which is an order of magnitude slower.

:func:`bin_max` only takes maxima. A max does not depend on the order it is taken in
(NaN included: ``np.maximum`` propagates it), so it reduces rows first, the direction
in which a map's memory is contiguous in either layout, and needs no channels-last copy.

:func:`first_max_rows` and :func:`first_max_windows` find the maxima rows first too,
and where they sit with the same tie rule: the first row of a range holding its max
(compared after the max, a contiguous pass), then, among a window's columns holding
the max, the one whose key (earliest row, then smallest column) is largest. Their
maxima are taken in :func:`bin_max`'s order, so even the sign of a zero max agrees.
"""
from __future__ import annotations

import threading
from typing import Tuple

import numpy as np

#: work buffers up to this many bytes are kept between calls (one set per thread)
SCRATCH_KEEP = 16 << 20
_scratch = threading.local()


def scratch(slot: int, size: int, dtype) -> np.ndarray:
    """A 1-D work array of ``size`` elements, uninitialised, reused between calls.

    A fresh array of a megabyte or so is a fresh ``mmap`` whose pages fault in on first
    touch, which costs as much as the maxima of a few boxes; so the per-box temporaries
    of the pooling loops come from a buffer kept per thread and per ``slot`` (one slot
    per array alive at the same time). The caller must be done with an array before it
    asks for the same slot again.
    """
    dtype = np.dtype(dtype)
    nbytes = size * dtype.itemsize
    if nbytes > SCRATCH_KEEP:
        return np.empty(size, dtype)
    buffers = getattr(_scratch, "buffers", None)
    if buffers is None:
        buffers = _scratch.buffers = {}
    buf = buffers.get(slot)
    if buf is None or buf.size < nbytes:
        buf = buffers[slot] = np.empty(nbytes, np.uint8)
    return buf[:nbytes].view(dtype)


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


def bin_max(a: np.ndarray, starts, ends, out: np.ndarray, rowwise: bool = False) -> np.ndarray:
    """``out[i] = a[starts[i]:ends[i]].max(axis=0)``, 0 where the range is empty.

    Parameters
    ----------
    a : ndarray, shape (L, ...)
        Reduced along its first axis.
    starts, ends : sequences of int, length P
        The ranges ``[start, end)`` (Python ints: this runs once per bin).
    out : ndarray, shape (P, ...)
        Written in place and returned.
    rowwise : bool
        Take the max one ``np.maximum`` per row of ``a`` instead of one reduce per
        range. For a channels-first block (``a`` of shape ``(R, C, S)``, each row ``C``
        runs of ``S`` contiguous values) NumPy's reduce over the strided first axis
        is several times slower than this loop; for contiguous rows it is faster.
    """
    rows = None
    for i, (s, e) in enumerate(zip(starts, ends)):
        if e <= s:
            out[i] = 0
        elif e - s == 1:
            out[i] = a[s]
        elif e - s == 2:  # a binary max costs less than a reduce
            np.maximum(a[s], a[s + 1], out=out[i])
        elif not rowwise:
            np.maximum.reduce(a[s:e], axis=0, out=out[i])
        else:
            rows = list(a) if rows is None else rows  # the row views, made once
            acc = np.maximum(rows[s], rows[s + 1], out=out[i])
            for r in range(s + 2, e):
                np.maximum(acc, rows[r], out=acc)
    return out


#: ranks 255, 254, ..., 1: row ``j`` of a range scores ``top - j`` (a slice of this)
_DESCENDING = np.arange(255, 0, -1, dtype=np.uint8)


def first_max_rows(
    a: np.ndarray, starts, ends, top: int, values: np.ndarray, ranks: np.ndarray, work=None
) -> None:
    """Max of each range of rows and which row holds it first.

    ``values[i] = a[starts[i]:ends[i]].max(axis=0)``, taken as :func:`bin_max` takes
    it (so the bits agree), and ``ranks[i] = top - j`` where row ``starts[i] + j`` is
    the first row of the range equal to that max. Ranks grow toward the first row, so
    a caller can break ties between columns with a plain maximum.

    The first row is found after the max: the rows but the last are compared with it
    (one pass), each hit scored with its rank and the scores max-reduced; the last row
    scores its rank without a comparison (if no other row holds the max, it does). A
    NaN max equals nothing, so its rank is the last row's: a caller that cares finds
    NaN maxima again.

    Parameters
    ----------
    a : ndarray, shape (L, X)
        Rows, each contiguous (``X`` = columns x channels, in either order).
    starts, ends : sequences of int, length P
        The ranges ``[start, end)`` (Python ints: this runs once per range).
    top : int
        At least the longest range, and at most 255.
    values : ndarray, shape (P, X), ``a``'s dtype
    ranks : ndarray of uint8, shape (P, X)
        Written in place. An empty range gives value 0 and rank ``top`` (a placeholder
        for bins the caller empties).
    work : ndarray of uint8, at least ``top * X`` elements, optional
        Room for the scores (a :func:`scratch` buffer if not given).
    """
    x = a.shape[1]
    scores = (scratch(8, top * x, np.uint8) if work is None else work[: top * x]).reshape(top, x)
    for i, (s, e) in enumerate(zip(starts, ends)):
        n = e - s
        if n <= 1:
            values[i] = a[s] if n == 1 else 0
            ranks[i] = top
            continue
        if n == 2:
            np.maximum(a[s], a[s + 1], out=values[i])
            # rank top if the first row holds the max, else top - 1
            np.equal(a[s], values[i], out=ranks[i].view(np.bool_))
            ranks[i] += top - 1
            continue
        np.maximum.reduce(a[s:e], axis=0, out=values[i])
        np.equal(a[s : e - 1], values[i], out=scores[: n - 1].view(np.bool_))
        scores[n - 1] = 1  # a memset: cheaper than comparing the last row, or a maximum with a scalar
        np.multiply(scores[:n], _DESCENDING[255 - top : 255 - top + n, None], out=scores[:n])
        np.maximum.reduce(scores[:n], axis=0, out=ranks[i])


def first_max_windows(
    values: np.ndarray, keys: np.ndarray, windows: np.ndarray, best: np.ndarray, key: np.ndarray, work=None
) -> None:
    """Max over windows of columns, and the largest key among the columns holding it.

    Parameters
    ----------
    values : ndarray, shape (P, S, C)
        Channels-last rows (one per bin row).
    keys : ndarray of int, shape (P, S, C)
        Positive tie-breakers: among the columns of a window equal to its max, the one
        with the largest key wins.
    windows : ndarray of int, shape (M, Q)
        Column ``j`` of window ``q`` is ``windows[j, q]``; a window shorter than ``M``
        repeats its last column (a repeat changes neither the max, nor its bits, nor
        the winning key).
    best : ndarray, shape (P, Q, C), ``values``' dtype
        The window maxima, taken in column order as :func:`bin_max` takes them.
    key : ndarray, shape (P, Q, C), ``keys``' dtype
        The winning keys; 0 where no column equals the max (a NaN max).
    work : three flat ndarrays, optional
        Room for ``P * M * Q * C`` values, bools and keys (:func:`scratch` if not given).
    """
    p, _, c = values.shape
    m, q = windows.shape
    size = p * m * q * c
    if work is None:
        work = (scratch(9, size, values.dtype), scratch(10, size, np.bool_), scratch(11, size, keys.dtype))
    gathered, scores = work[0][:size].reshape(p, m * q, c), work[2][:size].reshape(p, m * q, c)
    flat = windows.reshape(-1)
    np.take(values, flat, axis=1, out=gathered, mode="clip")  # mode="raise" would buffer out
    np.take(keys, flat, axis=1, out=scores, mode="clip")
    gathered, scores = gathered.reshape(p, m, q * c), scores.reshape(p, m, q * c)
    hits = work[1][:size].reshape(p, m, q * c)
    best = best.reshape(p, q * c)
    np.maximum.reduce(gathered, axis=1, out=best)
    np.equal(gathered, best[:, None], out=hits)
    np.multiply(scores, hits, out=scores)
    np.maximum.reduce(scores, axis=1, out=key.reshape(p, q * c))
