"""Spatial pyramid pooling (SPP-net): fixed-length features from maps of any size."""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .. import _validate as v
from ..geometry import spp_bins
from ._layout import channels_first, channels_last, compute_dtype
from ._pooling import _first_hit


def _bin_average_matrix(length: int, n: int, dtype) -> np.ndarray:
    """``(n, length)`` matrix averaging each SPP bin."""
    start, end = spp_bins(length, n)
    pos = np.arange(length)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return (inside / (end - start)[:, None]).astype(dtype)


def _check(input, levels, mode):
    v.check_input(input)
    return v.check_levels(levels), v.check_mode(mode)


def spp(input: np.ndarray, levels=(4, 2, 1), mode: str = "max") -> np.ndarray:
    """Spatial pyramid pooling over the whole map.

    Level ``n`` splits each axis of length ``a`` into bins
    ``[floor(i*a/n), ceil((i+1)*a/n))`` (:func:`roilib.geometry.spp_bins`) and pools each
    of the ``n*n`` cells. Levels are concatenated in the given order, each flattened
    channel-major (``C, n, n``).

    Parameters
    ----------
    input : ndarray, shape (N, C, H, W)
    levels : sequence of int
        Bins per side for each pyramid level.
    mode : {"max", "avg"}
        Pooling inside a cell.

    Returns
    -------
    ndarray, shape (N, C * sum(n * n for n in levels))
    """
    levels, mode = _check(input, levels, mode)
    if mode == "max":
        return np.concatenate([pooled.reshape(len(input), -1) for pooled, _ in _max_levels(input, levels)], axis=1)
    x = channels_last(input)
    n_img, h, w, c = x.shape
    parts = []
    for n in levels:
        ay, ax = _bin_average_matrix(h, n, x.dtype), _bin_average_matrix(w, n, x.dtype)
        pooled = np.einsum("ph,nhwc,qw->npqc", ay, x, ax)
        parts.append(channels_first(pooled, x.dtype).reshape(n_img, -1))
    return np.concatenate(parts, axis=1).astype(input.dtype)


def spp_backward(grad_output: np.ndarray, input: np.ndarray, levels=(4, 2, 1), mode: str = "max") -> np.ndarray:
    """Gradient of :func:`spp` with respect to ``input``.

    ``max`` routes each cell's gradient to its argmax pixel (first in row-major order on
    ties); ``avg`` spreads it evenly over the cell.

    Parameters
    ----------
    grad_output : ndarray, shape (N, C * sum(n * n))
    input, levels, mode
        As in :func:`spp`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    levels, mode = _check(input, levels, mode)
    n_img, c, h, w = input.shape
    v.check_grad_output(grad_output, (n_img, c * sum(n * n for n in levels)), input)
    dtype = compute_dtype(input.dtype)
    g = grad_output.astype(dtype, copy=False)
    if mode == "max":
        grad = np.zeros(input.shape, dtype=dtype)
        img, ch = np.arange(n_img)[:, None], np.arange(c)[None, :]
        offset = 0
        for n, (_, where) in zip(levels, _max_levels(input, levels, with_arg=True)):
            gl = g[:, offset : offset + c * n * n].reshape(n_img, c, n, n)
            offset += c * n * n
            # level by level, bin by bin in row-major order: the order in which a pixel
            # of one channel receives its adds; within a bin every (image, channel) has
            # its own pixel, so a buffered += is exact
            for p in range(n):
                for q in range(n):
                    rows, cols = where[0][..., p, q], where[1][..., p, q]
                    grad[img, ch, rows, cols] += gl[:, :, p, q]
        return grad.astype(input.dtype, copy=False)
    x = channels_last(input)
    grad = np.zeros(x.shape, dtype=x.dtype)
    offset = 0
    for n in levels:
        gl = g[:, offset : offset + c * n * n].reshape(n_img, c, n, n).transpose(0, 2, 3, 1)
        offset += c * n * n
        ay, ax = _bin_average_matrix(h, n, x.dtype), _bin_average_matrix(w, n, x.dtype)
        grad += np.einsum("ph,npqc,qw->nhwc", ay, gl, ax)
    return channels_first(grad, input.dtype)


def _segments(length: int, levels) -> Tuple[np.ndarray, list]:
    """Cut an axis at every bin edge of every level.

    Returns the segments' starts and, per level, each bin's ``[first, last)`` segment
    range: a bin is a run of whole segments, so its max is the max of theirs.
    """
    bins = [spp_bins(length, n) for n in levels]
    edges = np.unique(np.concatenate([np.concatenate(b) for b in bins] + [np.array([0, length])]))
    starts = edges[:-1]
    return starts, [(np.searchsorted(starts, s), np.searchsorted(starts, e)) for s, e in bins]


#: bytes of the map streamed into cache, then reduced, per step of the backward
_STREAM_BYTES = 1 << 19


def _column_segment_max(input: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """``np.maximum.reduceat(input, starts, axis=3)``, a few channel planes at a time.

    Each step's planes are first read once front to back (a plain max, thrown away):
    short column runs of a map that is not in cache are read at memory latency, not
    bandwidth, and the sequential pass brings the planes into cache at full speed
    first. On the benchmark's map (53 MB) that is several times faster than one
    ``reduceat``; steps of :data:`_STREAM_BYTES` keep small planes from costing a
    Python step each.
    """
    n_img, c, h, w = input.shape
    seg = np.empty((n_img, c, h, len(starts)), dtype=input.dtype)
    step = max(1, _STREAM_BYTES // max(1, h * w * input.itemsize))
    for i in range(n_img):
        for c0 in range(0, c, step):
            planes = input[i, c0 : c0 + step]
            planes.max()  # read them into cache, in order
            np.maximum.reduceat(planes, starts, axis=2, out=seg[i, c0 : c0 + step])
    return seg


def _max_levels(input: np.ndarray, levels, with_arg: bool = False):
    """Yield, per level, the max of every cell ``(N, C, n, n)`` and, with ``with_arg``,
    where it sits (``(rows, cols)``, each ``(N, C, n, n)``; None otherwise).

    The map is read once for all levels, in its own ``(N, C, H, W)`` layout: the max of
    each row over every column segment (:func:`_segments`), with ``maximum.reduceat``.
    That small array is then made channels-last, ``(N, segments, H, C)``, so that every
    later reduction (segments into bins, rows into cells) and every comparison with a
    max is an elementwise pass over contiguous channel vectors, not a reduction over a
    short strided axis. The maxima and the tie rule are :func:`._pooling.window_max`'s:
    reduce each row over the cell's columns, take the first row holding the max, then
    the first column of that row holding it (a NaN max: the last row, then the last
    column).
    """
    n_img, c, h, w = input.shape
    col_starts, col_ranges = _segments(w, levels)
    seg = _column_segment_max(input, col_starts)  # (N, C, H, segments)
    seg = np.ascontiguousarray(seg.transpose(0, 3, 2, 1))  # (N, segments, H, C)
    img, ch = np.arange(n_img)[:, None], np.arange(c)[None, :]
    for n, (first, last) in zip(levels, col_ranges):
        rs, re = spp_bins(h, n)
        cs, ce = spp_bins(w, n)
        # each row's max over each column bin: (N, n, H, C)
        row_max = np.empty((n_img, n, h, c), dtype=input.dtype)
        for q, (a, b) in enumerate(zip(first.tolist(), last.tolist())):
            np.maximum.reduce(seg[:, a:b], axis=1, out=row_max[:, q])
        pooled = np.empty((n_img, c, n, n), dtype=input.dtype)
        where = (np.empty(pooled.shape, np.int64), np.empty(pooled.shape, np.int64)) if with_arg else None
        for p, (r0, r1) in enumerate(zip(rs.tolist(), re.tolist())):
            window = row_max[:, :, r0:r1]  # (N, n, R, C)
            best = np.maximum.reduce(window, axis=2)  # (N, n, C)
            pooled[:, :, p, :] = best.transpose(0, 2, 1)
            if not with_arg:
                continue
            rows = r0 + _first_hit(window, best, 2)  # (N, n, C)
            for q, (c0, c1) in enumerate(zip(cs.tolist(), ce.tolist())):
                r = rows[:, q]  # (N, C)
                line = input[img[..., None], ch[..., None], r[..., None], np.arange(c0, c1)]  # (N, C, S)
                where[0][:, :, p, q] = r
                where[1][:, :, p, q] = c0 + _first_hit(line, row_max[img, q, r, ch], 2)
        yield pooled, where
