"""RoIPool (Fast R-CNN): max over integer bins of a C-rounded box.

Geometry comes from :func:`roilib.geometry.roi_pool_bins`. The maxima alone come from
:func:`._pooling.bin_max` (rows, then columns); with their positions, and the tie rule,
from :func:`._pooling.window_max`. The forward can return where each max came from
(``return_argmax=True``, torchvision's format); the backward accepts it back
(``argmax=``) and then only scatters, as torchvision's backward does with the argmax
its forward saved. Without it the backward finds the maxima again.
"""
from __future__ import annotations

import numpy as np

from .. import _validate as v
from ..geometry import roi_pool_bins
from ._layout import MapBlocks, compute_dtype
from ._pooling import bin_max, first_max_rows, first_max_windows, scratch, window_max


#: outputs scattered per step of the backward (an index array of 512 KiB, in cache)
_CHUNK = 1 << 16
#: boxes reading at least this many maps' worth of cells have the map copied
#: channels-last once for the maxima (every reduction then runs over contiguous
#: channel vectors); fewer boxes read their rows straight from the ``(N, C, H, W)`` map,
#: which costs more per cell but copies nothing. Measured on the benchmark's map.
VALUES_WHOLE_MAP_FRACTION = 2.5
#: the same choice for the argmax search (:func:`_pool`)
ARGMAX_WHOLE_MAP_FRACTION = 2.5
#: boxes turned from int16 keys into int64 flat indices per step at the end of :func:`_pool`
_EXPAND_BOXES = 64


def _check(input, rois, output_size, spatial_scale):
    v.check_input(input)
    return (
        v.check_rois(rois, input),
        v.check_output_size(output_size),
        v.check_spatial_scale(spatial_scale),
    )


def _extents(bins, h: int, w: int):
    """Each box's rows ``[r0, r1)`` and columns ``[c0, c1)`` (the union of its bins) and
    whether it reads the map at all."""
    r0, r1 = bins.hstart.min(axis=1, initial=h), bins.hend.max(axis=1, initial=0)
    c0, c1 = bins.wstart.min(axis=1, initial=w), bins.wend.max(axis=1, initial=0)
    touches = (r1 > r0) & (c1 > c0)
    return r0, r1, c0, c1, touches


def _values(input, rois, output_size, spatial_scale) -> np.ndarray:
    """Maxima ``(K, C, PH, PW)`` in the input's dtype (0 for empty bins), positions not
    tracked: each box's rows are reduced per bin row, then its columns per bin column.

    A max is exact in any dtype and in any order, so this runs in the input's dtype and
    equals :func:`_pool`'s values bit for bit."""
    n, c, h, w = input.shape
    ph, pw = output_size
    bins = roi_pool_bins(rois, output_size, spatial_scale, h, w, compute_dtype(input.dtype))
    r0, r1, c0, c1, touches = _extents(bins, h, w)
    cells = int(np.sum(np.where(touches, (r1 - r0) * (c1 - c0), 0)))
    hwc = None
    if cells >= VALUES_WHOLE_MAP_FRACTION * n * h * w:
        hwc = np.ascontiguousarray(input.transpose(0, 2, 3, 1))
    # bin edges relative to each box's block, as Python ints (read once per bin)
    hs, he = (bins.hstart - r0[:, None]).tolist(), (bins.hend - r0[:, None]).tolist()
    ws, we = (bins.wstart - c0[:, None]).tolist(), (bins.wend - c0[:, None]).tolist()
    image = rois[:, 0].astype(np.int64).tolist()
    r0, r1, c0, c1 = r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist()
    out = np.zeros((rois.shape[0], c) + output_size, dtype=input.dtype)
    touching = np.flatnonzero(touches).tolist()
    widest = max((c1[k] - c0[k] for k in touching), default=0)
    work = [scratch(slot, ph * widest * c, input.dtype) for slot in (0, 1)]
    cols = scratch(2, pw * ph * c, input.dtype).reshape(pw, ph, c)
    for k in touching:
        span = c1[k] - c0[k]
        if hwc is not None:
            block = hwc[image[k], r0[k] : r1[k], c0[k] : c1[k]]  # (R, S, C)
            rows = bin_max(block, hs[k], he[k], work[0][: ph * span * c].reshape(ph, span, c))
        else:
            block = input[image[k], :, r0[k] : r1[k], c0[k] : c1[k]].transpose(1, 0, 2)  # (R, C, S)
            per_row = work[0][: ph * c * span].reshape(ph, c, span)
            bin_max(block, hs[k], he[k], per_row, rowwise=True)
            # columns next: make channels the last axis, so a bin column reduces
            # contiguous channel vectors; turning each bin row's (C, S) plane into (S, C)
            # is twice as fast as moving the columns in front of the bin rows
            rows = work[1][: ph * span * c].reshape(ph, span, c)
            np.copyto(rows, per_row.transpose(0, 2, 1))
        bin_max(rows.transpose(1, 0, 2), ws[k], we[k], cols)  # (S, PH, C) -> (PW, PH, C)
        out[k] = cols.transpose(2, 1, 0)
    return out


def _column_windows(bins, c0: np.ndarray, touches: np.ndarray) -> list:
    """Each touching box's column bins as padded windows ``(M, PW)`` of column indices
    relative to its first column: a short bin repeats its last column, an empty one
    reads column 0 (its output is emptied afterwards)."""
    ws, we = bins.wstart - c0[:, None], bins.wend - c0[:, None]
    lengths = np.maximum(we - ws, 0)
    windows = []
    for k in range(len(ws)):
        if touches[k]:
            j = np.arange(max(int(lengths[k].max()), 1))[:, None]
            windows.append(np.where(lengths[k] > 0, np.minimum(ws[k] + j, we[k] - 1), 0))
        else:
            windows.append(None)
    return windows


def _copy_rows(block: np.ndarray, out: np.ndarray) -> None:
    """``out[r, ch] = block[ch, r]``: a box's rows of an ``(N, C, H, W)`` map, ``(C, R, S)``,
    copied row-major ``(R, C, S)``, so every later pass over them is contiguous.

    Each row segment is copied as one item of ``S`` values (a void view): NumPy then
    moves ``C * R`` segments instead of looping over ``S`` values ``C * R`` times, which
    costs about a third less for segments of a few tens of values."""
    if block.strides[-1] != block.itemsize:
        np.copyto(out, block.transpose(1, 0, 2))
        return
    segment = np.dtype((np.void, block.shape[-1] * block.itemsize))
    np.copyto(out.view(segment)[..., 0], block.view(segment)[..., 0].T)


def _unsigned_or_wider(largest: int):
    """The smallest of uint16, int32, int64 holding ``0..largest``."""
    return np.uint16 if largest < 2**16 else np.int32 if largest < 2**31 else np.int64


class _Boxes:
    """What :func:`_pool` knows of its boxes before reading the map (lists of Python ints
    for the per-box loop, arrays for the vectorised steps)."""

    def __init__(self, rois, bins, h: int, w: int):
        r0, r1, c0, c1, self.touches = _extents(bins, h, w)
        self.bins = bins
        # the tallest bin's rows: row j of a bin ranks top - j (uint8 ranks)
        top = np.maximum(bins.hend - bins.hstart, 0).max(axis=1, initial=1)
        # a key orders a window's candidates: rank * W + (S - 1 - column); the winner
        # sits at (hstart + top) * W + (c1 - 1) - key, stored as end - that position,
        # end = r1 * W + c1 being one past the box's last cell
        self.end = r1 * w + c1
        self.offset = self.end[:, None] - ((bins.hstart + top[:, None]) * w + (c1 - 1)[:, None])  # (K, PH)
        touching = self.touches
        # keys and stored offsets share one dtype; uint16 sums may wrap on the way, the
        # stored offsets (0 < end - position <= R * W + S) do not
        largest = np.maximum((top + 1) * w, (r1 - r0) * w + (c1 - c0))[touching].max(initial=0)
        self.key = _unsigned_or_wider(int(largest))
        self.offset = self.offset.astype(self.key)
        self.cells = int(np.sum(np.where(touching, (r1 - r0) * (c1 - c0), 0)))
        self.windows = _column_windows(bins, c0, touching)
        self.hs = (bins.hstart - r0[:, None]).tolist()
        self.he = (bins.hend - r0[:, None]).tolist()
        image = rois[:, 0].astype(np.int64)
        order = np.flatnonzero(touching)
        # in map order: neighbours share rows, which the previous box left in cache
        self.order = order[np.lexsort((c0[order], r0[order], image[order]))].tolist()
        self.image, self.top = image.tolist(), top.tolist()
        self.r0, self.r1, self.c0, self.c1 = r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist()

    def largest(self, per_box) -> int:
        """``max(per_box(k))`` over the touching boxes (0 if none)."""
        return max((per_box(k) for k in self.order), default=0)


def _pool(input, rois, output_size, spatial_scale):
    """Maxima ``(K, C, PH, PW)`` in the input's dtype and torchvision's argmax (int64).

    The maxima are :func:`_values`' (the same reductions, so the same bits). Where they
    sit is found on the way: each bin row's rows are compared with their max (the first
    row holding it, :func:`._pooling.first_max_rows`), then each window of columns takes,
    among its columns holding the max, the one with the earliest row and then the
    smallest column (:func:`._pooling.first_max_windows`): the first in row-major order.

    Each box's positions are kept as small unsigned offsets from the end of its block,
    ``(K, C, PH, PW)`` uint16 on the benchmark's map, and made int64 flat indices at the
    end, so the int64 result and a channels-last copy of the map are never alive at once.
    Boxes with a NaN max (and bins of 256+ rows) have their argmax found the previous way,
    :func:`._pooling.window_max`, which defines where a NaN max sits.
    """
    n, c, h, w = input.shape
    ph, pw = output_size
    bins = roi_pool_bins(rois, output_size, spatial_scale, h, w, compute_dtype(input.dtype))
    boxes = _Boxes(rois, bins, h, w)
    out = np.zeros((rois.shape[0], c) + output_size, dtype=input.dtype)
    stored = np.empty(out.shape, boxes.key)
    hwc = None
    if boxes.cells >= ARGMAX_WHOLE_MAP_FRACTION * n * h * w:
        hwc = np.ascontiguousarray(input.transpose(0, 2, 3, 1))
    work = _Work(boxes, input.dtype, c, output_size, hwc is None)
    others = []  # boxes whose argmax window_max finds: NaN maxima, bins of 256+ rows
    for k in boxes.order:
        if boxes.top[k] > 255:
            others.append(k)
            continue
        best, key = _first_max_box(input, hwc, boxes, k, work)
        out[k] = best.transpose(2, 0, 1)
        if key.min() == 0:  # a window whose max is NaN: no column compared equal to it
            others.append(k)
        # key -> end - position: add end - (hstart + top) * W - (c1 - 1), per bin row
        np.add(key, boxes.offset[k, :, None, None], out=key)
        stored[k] = key.transpose(2, 0, 1)
    del hwc, work
    arg = np.empty(out.shape, np.int64)
    for k0 in range(0, len(arg), _EXPAND_BOXES):
        k1 = k0 + _EXPAND_BOXES
        np.subtract(boxes.end[k0:k1, None, None, None], stored[k0:k1], out=arg[k0:k1])
    del stored
    empty = (bins.hend <= bins.hstart)[:, :, None] | (bins.wend <= bins.wstart)[:, None, :]  # (K, PH, PW)
    if empty.any():  # boxes partly or wholly off the map
        out.transpose(0, 2, 3, 1)[empty] = 0
        arg.transpose(0, 2, 3, 1)[empty] = -1
    for k in others:
        _pool_by_windows(input, boxes, k, out, arg)
    return out, arg


class _Work:
    """Flat work buffers for :func:`_first_max_box`, sized once for the largest box (the
    per-box arrays are views of them)."""

    def __init__(self, boxes: _Boxes, dtype, c: int, output_size, copy_rows: bool):
        ph, pw = output_size
        span = lambda k: boxes.c1[k] - boxes.c0[k]  # noqa: E731
        rows = boxes.largest(lambda k: ph * span(k) * c)
        window = boxes.largest(lambda k: ph * len(boxes.windows[k]) * pw * c)
        self.block = scratch(6, boxes.largest(lambda k: (boxes.r1[k] - boxes.r0[k]) * span(k) * c), dtype) if copy_rows else None
        self.values, self.moved = scratch(3, rows, dtype), scratch(7, rows, dtype) if copy_rows else None
        self.ranks, self.keys = scratch(4, rows, np.uint8), scratch(5, rows, boxes.key)
        self.scores = scratch(8, boxes.largest(lambda k: min(boxes.top[k], 255) * span(k) * c), np.uint8)
        self.windows = (scratch(9, window, dtype), scratch(10, window, np.bool_), scratch(11, window, boxes.key))
        self.best, self.key = scratch(12, ph * pw * c, dtype), scratch(13, ph * pw * c, boxes.key)


def _first_max_box(input, hwc, boxes: _Boxes, k: int, work: _Work):
    """One box's maxima and their keys, both ``(PH, PW, C)`` (views of ``work``)."""
    c = input.shape[1]
    w = input.shape[3]
    ph, pw = len(boxes.hs[k]), boxes.windows[k].shape[1]
    r0, r1, c0, c1 = boxes.r0[k], boxes.r1[k], boxes.c0[k], boxes.c1[k]
    rows, s = r1 - r0, c1 - c0
    values = work.values[: ph * s * c].reshape(ph, s * c)
    ranks = work.ranks[: ph * s * c].reshape(ph, s * c)
    keys = work.keys[: ph * s * c].reshape(ph, s, c)
    if hwc is not None:
        block = hwc[boxes.image[k], r0:r1, c0:c1].reshape(rows, s * c)  # (R, S * C)
        first_max_rows(block, boxes.hs[k], boxes.he[k], boxes.top[k], values, ranks, work.scores)
        values = values.reshape(ph, s, c)
        np.multiply(ranks.reshape(ph, s, c), keys.dtype.type(w), out=keys)
    else:
        block = work.block[: rows * c * s].reshape(rows, c, s)
        _copy_rows(input[boxes.image[k], :, r0:r1, c0:c1], block)
        first_max_rows(block.reshape(rows, c * s), boxes.hs[k], boxes.he[k], boxes.top[k], values, ranks, work.scores)
        # channels last for the columns: a window then reduces contiguous channels
        moved = work.moved[: ph * s * c].reshape(ph, s, c)
        np.copyto(moved, values.reshape(ph, c, s).transpose(0, 2, 1))
        values = moved
        np.multiply(ranks.reshape(ph, c, s).transpose(0, 2, 1), keys.dtype.type(w), out=keys)
    np.add(keys, np.arange(s - 1, -1, -1, dtype=keys.dtype)[:, None], out=keys)
    best = work.best.reshape(ph, pw, c)
    key = work.key.reshape(ph, pw, c)
    first_max_windows(values, keys, boxes.windows[k], best, key, work.windows)
    return best, key


def _pool_by_windows(input, boxes: _Boxes, k: int, out: np.ndarray, arg: np.ndarray) -> None:
    """Box ``k``'s argmax by :func:`._pooling.window_max`, the search that was there before
    the rows-first one: it stays the definition for NaN maxima. Bins of 256+ rows, which
    the rows-first search does not take, get their maxima from it too."""
    r0, c0, w = boxes.r0[k], boxes.c0[k], input.shape[3]
    region = MapBlocks(input, 0).block(boxes.image[k], r0, boxes.r1[k], c0, boxes.c1[k])
    row_bins = (boxes.bins.hstart[k] - r0, boxes.bins.hend[k] - r0)
    col_bins = (boxes.bins.wstart[k] - c0, boxes.bins.wend[k] - c0)
    values, ar, ac, empty = window_max(region, row_bins, col_bins, True)
    arg[k] = np.where(empty[..., None], -1, (ar + r0) * w + ac + c0).transpose(2, 0, 1)
    if boxes.top[k] > 255:
        out[k] = values.transpose(2, 0, 1)


def roi_pool(
    input: np.ndarray, rois, output_size, spatial_scale: float = 1.0, return_argmax: bool = False
):
    """RoIPool forward.

    Parameters
    ----------
    input : ndarray, shape (N, C, H, W)
        Feature map, float16/32/64.
    rois : ndarray (K, 5) or list of (K_i, 4) arrays
        Boxes ``[batch_index, x1, y1, x2, y2]`` in image pixels.
    output_size : int or (int, int)
        ``(PH, PW)``.
    spatial_scale : float
        Feature-map pixels per image pixel (``1 / stride``).
    return_argmax : bool
        Also return where each max sits, for :func:`roi_pool_backward`'s ``argmax``
        (NumPy arrays; the CUDA backend does not take it yet).

    Returns
    -------
    ndarray, shape (K, C, PH, PW)
        Max of each bin (0 for empty bins), in the input's dtype.
    argmax : ndarray of int64, shape (K, C, PH, PW)
        Only with ``return_argmax``: the flat index ``h * W + w`` of each max in its
        image's map (the first in row-major order on ties), -1 for an empty bin; the
        layout of torchvision's ``roi_pool`` argmax.
    """
    rois, output_size, spatial_scale = _check(input, rois, output_size, spatial_scale)
    if not return_argmax:
        return _values(input, rois, output_size, spatial_scale)
    return _pool(input, rois, output_size, spatial_scale)


def _check_argmax(argmax, shape, hw: int) -> np.ndarray:
    """Type and shape of a saved argmax. Its range is checked chunk by chunk as it is
    scattered, on the int64 copy in cache (:func:`_check_argmax_range`); only uint64,
    whose large values would wrap in that copy, is range-checked here."""
    if not isinstance(argmax, np.ndarray) or argmax.dtype.kind not in "iu":
        raise TypeError(f"argmax must be an integer NumPy array from roi_pool(..., return_argmax=True), got {type(argmax).__name__}")
    if argmax.shape != shape:
        raise ValueError(f"argmax must have shape {shape} (the forward's output), got {argmax.shape}")
    if argmax.dtype == np.uint64 and argmax.size and argmax.max() >= hw:
        _check_argmax_range(np.array([hw]), hw)
    return argmax


def _check_argmax_range(part: np.ndarray, hw: int) -> bool:
    """Raise unless every entry of ``part`` is -1 or in ``[0, hw)``; whether all are >= 0."""
    if part.size == 0:
        return True
    low = part.min()
    if low < -1 or part.max() >= hw:
        raise ValueError(f"argmax entries must be -1 or a flat index into the H*W = {hw} map")
    return bool(low >= 0)


def roi_pool_backward(
    grad_output: np.ndarray, input: np.ndarray, rois, output_size, spatial_scale: float = 1.0, argmax=None
) -> np.ndarray:
    """Gradient of :func:`roi_pool` with respect to ``input``.

    Each output's gradient goes to the pixel its max came from (the first such pixel in
    row-major order on ties); empty bins route nothing. Contributions are added in the
    order box, channel, bin (torchvision's loop order), so the result is deterministic
    and bitwise the same with or without ``argmax``.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale
        As in :func:`roi_pool`.
    argmax : ndarray of int, shape (K, C, PH, PW), optional
        The forward's argmax (``roi_pool(..., return_argmax=True)``) for these
        arguments. Saves finding the maxima again; it is trusted, not re-derived
        (only its shape, dtype and range are checked). NumPy arrays; the CUDA backend
        does not take it yet.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale = _check(input, rois, output_size, spatial_scale)
    out_shape = (rois.shape[0], input.shape[1]) + output_size
    v.check_grad_output(grad_output, out_shape, input)
    n, c, h, w = input.shape
    if argmax is None:
        _, argmax = _pool(input, rois, output_size, spatial_scale)
    else:
        argmax = _check_argmax(argmax, out_shape, h * w)
    dtype = compute_dtype(input.dtype)
    grad = np.zeros(input.size, dtype=dtype)
    # flat NCHW index of each output's pixel: (image * C + channel) * H*W + argmax
    planes = (rois[:, 0].astype(np.int64)[:, None] * c + np.arange(c)[None, :]) * (h * w)
    # A pixel of one channel receives its adds in box order, then bin order, whatever
    # the channels do; so the scatter may go channel by channel (a few at a time), which
    # keeps the written planes and the index array in cache, and stays exact.
    per_channel = argmax.size // max(c, 1)
    step = max(1, _CHUNK // max(1, per_channel))
    arg_c = argmax.transpose(1, 0, 2, 3)
    values = grad_output.transpose(1, 0, 2, 3)
    planes_c = planes.T[:, :, None, None]
    size = min(step, c) * per_channel
    index_buffer, value_buffer = scratch(0, size, np.int64), scratch(1, size, dtype)
    for c0 in range(0, c, step):
        arg = arg_c[c0 : c0 + step]
        flat = index_buffer[: arg.size].reshape(arg.shape)
        part = value_buffer[: arg.size].reshape(arg.shape)
        np.copyto(flat, arg)  # gathered once, contiguous: add.at's fast path wants that
        routes_all = _check_argmax_range(flat, h * w)
        flat += planes_c[c0 : c0 + step]
        np.copyto(part, values[c0 : c0 + step])
        if not routes_all:  # empty bins (-1) route nothing
            routed = arg >= 0
            flat, part = flat[routed], part[routed]
        # add.at adds repeated indices one by one in array order (box, then bin)
        np.add.at(grad, flat.ravel(), part.ravel())
    return grad.reshape(input.shape).astype(input.dtype, copy=False)
