"""RoIPool (Fast R-CNN): max over integer bins of a C-rounded box.

Geometry comes from :func:`roilib.geometry.roi_pool_bins`. The maxima alone come from
:func:`._pooling.bin_max` (rows, then columns); with their positions and the tie rule,
rows first too, from :func:`._pooling.first_max_rows` and
:func:`._pooling.first_max_windows` (:func:`._pooling.window_max` for NaN maxima). The
forward can return where each max came from (``return_argmax=True``, torchvision's
format); the backward accepts it back (``argmax=``) and then only scatters, as
torchvision's backward does with the argmax its forward saved. Without it the backward
finds the maxima again.
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
ARGMAX_WHOLE_MAP_FRACTION = 3.5
#: a box read from the ``(N, C, H, W)`` map is searched a few channels at a time when all
#: of them would need more work memory than this (:func:`_pool`)
ARGMAX_WORK_BYTES = 4 << 20
#: the backward scatters box after box, reading the argmax and the gradient in their own
#: order, when the input's gradient is at most this many bytes: it stays in cache
#: whatever planes the adds land on. A larger one is scattered a few channels at a time
#: so that the planes written stay in cache, at the cost of reading both arrays strided.
BOX_MAJOR_BYTES = 8 << 20
#: boxes per block of :func:`_pool`'s 16-bit offsets (each block is made int64 flat
#: indices, then freed, at the end)
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
        hwc = _channels_last(input)
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
    relative to its first column (``None`` for the others): a short bin repeats its last
    column, an empty one reads column 0 (its output is emptied afterwards). Boxes whose
    longest bin has the same width are done together."""
    ws, we = bins.wstart - c0[:, None], bins.wend - c0[:, None]
    lengths = np.maximum(we - ws, 0)
    longest = lengths.max(axis=1, initial=1)
    windows = [None] * len(ws)
    for m in np.unique(longest[touches]).tolist():
        boxes = np.flatnonzero(touches & (longest == m))
        start, end = ws[boxes, None, :], we[boxes, None, :]
        j = np.arange(m)[:, None]
        index = np.where(lengths[boxes, None, :] > 0, np.minimum(start + j, end - 1), 0)  # (B, M, PW)
        for i, k in enumerate(boxes.tolist()):
            windows[k] = index[i]
    return windows


def _channels_last(x: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` -> contiguous ``(N, H, W, C)``, copied in tiles of a few rows and
    64 channels: each tile's reads and writes stay in cache, which makes the copy about
    a third cheaper than one transposing copy of the whole map."""
    n, c, h, w = x.shape
    out = np.empty((n, h, w, c), x.dtype)
    for r in range(0, h, 4):
        for g in range(0, c, 64):
            np.copyto(out[:, r : r + 4, :, g : g + 64], x[:, g : g + 64, r : r + 4].transpose(0, 2, 3, 1))
    return out


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
    """What :func:`_pool` knows of its boxes before reading the map: lists of Python ints
    for the per-box loop, arrays for the steps over all boxes.

    Where a max sits is carried as a key, then as an offset:

    * in a bin row, row ``j`` of the bin ranks ``top - j`` (``top``: the box's tallest
      bin), and a window of columns picks, among its columns holding the max, the
      largest key ``rank * W + (S - 1 - column)``: the earliest row, then the smallest
      column, so the first max in row-major order;
    * that max sits at ``(hstart + top) * W + (c1 - 1) - key``, which is stored as the
      offset ``end - position`` (``end = r1 * W + c1``, one past the box's last cell):
      ``0 < offset <= R * W + S``, 16 bits on the benchmark's map.
    """

    def __init__(self, rois, bins, h: int, w: int):
        r0, r1, c0, c1, touching = _extents(bins, h, w)
        self.bins, self.touches = bins, touching
        top = np.maximum(bins.hend - bins.hstart, 0).max(axis=1, initial=1)
        self.end = r1 * w + c1
        # keys and offsets share one dtype; in uint16 a key plus its bin row's offset
        # may wrap on the way, the offset it makes cannot
        largest = np.maximum((top + 1) * w, (r1 - r0) * w + (c1 - c0))[touching].max(initial=0)
        self.key = _unsigned_or_wider(int(largest))
        row_offset = self.end[:, None] - (bins.hstart + top[:, None]) * w - (c1 - 1)[:, None]
        self.row_offset = row_offset.astype(self.key)  # (K, PH): key + this = offset
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

    Positions are kept as 16-bit offsets (:class:`_Boxes`) until every box is done and
    the channels-last copy of the map is freed, then made int64 flat indices, so the
    two are never alive at once. Boxes with a NaN max (and bins of 256+ rows) have their
    argmax found the previous way, :func:`._pooling.window_max`, which defines where a
    NaN max sits.
    """
    n, c, h, w = input.shape
    bins = roi_pool_bins(rois, output_size, spatial_scale, h, w, compute_dtype(input.dtype))
    boxes = _Boxes(rois, bins, h, w)
    out = np.zeros((rois.shape[0], c) + output_size, dtype=input.dtype)
    # a block per _EXPAND_BOXES boxes, each freed once made int64: the offsets and the
    # argmax are not alive whole at once either
    blocks = range(0, len(out), _EXPAND_BOXES)
    offsets = [np.empty(out[k : k + _EXPAND_BOXES].shape, boxes.key) for k in blocks]
    hwc = None
    if boxes.cells >= ARGMAX_WHOLE_MAP_FRACTION * n * h * w:
        hwc = _channels_last(input)
    step = _channels_per_step(boxes, input.dtype.itemsize, c, output_size, hwc is None)
    work = _Work(boxes, step, input.dtype, output_size, hwc is None)
    others = []  # boxes whose argmax window_max finds: NaN maxima, bins of 256+ rows
    for k in boxes.order:
        if boxes.top[k] > 255:
            others.append(k)
            continue
        image, r0, r1, c0, c1 = boxes.image[k], boxes.r0[k], boxes.r1[k], boxes.c0[k], boxes.c1[k]
        for ch0 in range(0, c, step[k]):
            ch1 = min(ch0 + step[k], c)
            if hwc is not None:
                best, key = _box_first_max(hwc[image, r0:r1, c0:c1], True, boxes, k, work, w)
            else:
                best, key = _box_first_max(input[image, ch0:ch1, r0:r1, c0:c1], False, boxes, k, work, w)
            out[k, ch0:ch1] = best.transpose(2, 0, 1)
            if key.min() == 0:  # a window whose max is NaN: no column compared equal to it
                others.append(k)
            np.add(key, boxes.row_offset[k, :, None, None], out=key)
            offsets[k // _EXPAND_BOXES][k % _EXPAND_BOXES, ch0:ch1] = key.transpose(2, 0, 1)
    del hwc, work
    arg = np.empty(out.shape, np.int64)
    for i, k in enumerate(blocks):
        end = boxes.end[k : k + _EXPAND_BOXES, None, None, None]
        np.subtract(end, offsets[i], out=arg[k : k + _EXPAND_BOXES])
        offsets[i] = None
    empty = (bins.hend <= bins.hstart)[:, :, None] | (bins.wend <= bins.wstart)[:, None, :]  # (K, PH, PW)
    if empty.any():  # boxes partly or wholly off the map
        out.transpose(0, 2, 3, 1)[empty] = 0
        arg.transpose(0, 2, 3, 1)[empty] = -1
    for k in dict.fromkeys(others):
        _pool_by_windows(input, boxes, k, out, arg)
    return out, arg


def _channels_per_step(boxes: _Boxes, itemsize: int, c: int, output_size, copy_rows: bool) -> dict:
    """Channels per step of each box: all of them, but for a large box read from the
    ``(N, C, H, W)`` map only as many as keep its work buffers (its rows' copy above all)
    under :data:`ARGMAX_WORK_BYTES`."""
    if not copy_rows:
        return dict.fromkeys(boxes.order, c)
    ph, pw = output_size
    step = {}
    for k in boxes.order:
        s, m = boxes.c1[k] - boxes.c0[k], len(boxes.windows[k])
        values = (boxes.r1[k] - boxes.r0[k]) * s + 2 * ph * s + ph * m * pw  # per channel
        small = (ph * s + ph * m * pw) * 3 + min(boxes.top[k], 255) * s  # ranks, keys, hits, scores
        step[k] = int(min(c, max(1, ARGMAX_WORK_BYTES // (values * itemsize + small))))
    return step


class _Work:
    """Flat work buffers for :func:`_box_first_max`, sized once for the largest step (the
    per-step arrays are views of them)."""

    def __init__(self, boxes: _Boxes, step: dict, dtype, output_size, copy_rows: bool):
        ph, pw = output_size
        key = boxes.key
        largest = boxes.largest
        span = {k: boxes.c1[k] - boxes.c0[k] for k in boxes.order}
        rows = largest(lambda k: ph * span[k] * step[k])
        window = largest(lambda k: ph * len(boxes.windows[k]) * pw * step[k])
        self.values, self.ranks = scratch(3, rows, dtype), scratch(4, rows, np.uint8)
        self.keys = scratch(5, rows, key)
        self.block = self.moved = None
        if copy_rows:
            self.block = scratch(6, largest(lambda k: (boxes.r1[k] - boxes.r0[k]) * span[k] * step[k]), dtype)
            self.moved = scratch(7, rows, dtype)
        self.scores = scratch(8, largest(lambda k: min(boxes.top[k], 255) * span[k] * step[k]), np.uint8)
        self.windows = (scratch(9, window, dtype), scratch(10, window, np.bool_), scratch(11, window, key))
        outputs = ph * pw * largest(lambda k: step[k])
        self.best, self.key = scratch(12, outputs, dtype), scratch(13, outputs, key)
        self._reversed = np.arange(largest(lambda k: span[k]) - 1, -1, -1, dtype=key)[:, None]

    def columns_reversed(self, s: int) -> np.ndarray:
        """``S - 1 - column`` for the columns of a box ``S`` wide, ``(S, 1)``."""
        return self._reversed[len(self._reversed) - s :]


def _box_first_max(block, channels_last: bool, boxes: _Boxes, k: int, work: _Work, w: int):
    """Box ``k``'s maxima and their keys (:class:`_Boxes`) over some channels, both
    ``(PH, PW, C)`` (views of ``work``), from its block of the map: ``(R, S, C)`` (a
    view of the channels-last copy) or ``(C, R, S)`` (a view of the map)."""
    if channels_last:
        rows, s, c = block.shape
    else:
        c, rows, s = block.shape
    ph, pw = len(boxes.hs[k]), boxes.windows[k].shape[1]
    values = work.values[: ph * s * c].reshape(ph, s * c)
    ranks = work.ranks[: ph * s * c].reshape(ph, s * c)
    keys = work.keys[: ph * s * c].reshape(ph, s, c)
    starts, ends, top = boxes.hs[k], boxes.he[k], boxes.top[k]
    if channels_last:
        first_max_rows(block.reshape(rows, s * c), starts, ends, top, values, ranks, work.scores)
        values = values.reshape(ph, s, c)
        np.multiply(ranks.reshape(ph, s, c), keys.dtype.type(w), out=keys)
    else:
        copy = work.block[: rows * c * s].reshape(rows, c, s)
        _copy_rows(block, copy)
        first_max_rows(copy.reshape(rows, c * s), starts, ends, top, values, ranks, work.scores)
        # channels last for the columns: a window then reduces contiguous channels
        moved = work.moved[: ph * s * c].reshape(ph, s, c)
        np.copyto(moved, values.reshape(ph, c, s).transpose(0, 2, 1))
        values = moved
        np.multiply(ranks.reshape(ph, c, s).transpose(0, 2, 1), keys.dtype.type(w), out=keys)
    np.add(keys, work.columns_reversed(s), out=keys)
    best = work.best[: ph * pw * c].reshape(ph, pw, c)
    key = work.key[: ph * pw * c].reshape(ph, pw, c)
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


def _scatter(grad, values, argmax, planes, hw: int) -> None:
    """``grad[planes + argmax] += values``, a few entries of the first axis at a time, in
    the order of the arrays' axes (see :func:`roi_pool_backward`).

    ``values`` and ``argmax`` are ``(A, B, PH, PW)`` and ``planes`` ``(A, B)``, in either
    order: ``A`` boxes and ``B`` channels, or views the other way round. Each step's
    indices are made one contiguous int64 array (its range checked there, in cache), and
    its values too unless they already are: ``np.add.at``'s fast path wants that.
    """
    n = argmax.shape[0]
    per_entry = argmax[0].size if n else 1
    step = max(1, _CHUNK // max(1, per_entry))
    size = min(step, n) * per_entry
    index_buffer, value_buffer = scratch(0, size, np.int64), scratch(1, size, grad.dtype)
    ready = values.dtype == grad.dtype and values.flags.c_contiguous
    for i0 in range(0, n, step):
        arg = argmax[i0 : i0 + step]
        flat = index_buffer[: arg.size].reshape(arg.shape)
        np.copyto(flat, arg, casting="unsafe")  # range checked next, before any use
        routes_all = _check_argmax_range(flat, hw)
        flat += planes[i0 : i0 + step, :, None, None]
        part = values[i0 : i0 + step]
        if not ready:
            part = value_buffer[: arg.size].reshape(arg.shape)
            np.copyto(part, values[i0 : i0 + step])
        if not routes_all:  # empty bins (-1) route nothing
            routed = arg >= 0
            flat, part = flat[routed], part[routed]
        # add.at adds repeated indices one by one in array order
        np.add.at(grad, flat.ravel(), part.ravel())


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
    # the channels do; so the scatter may go box by box (a few at a time, in the arrays'
    # own order) or channel by channel (which keeps the written planes of a large map in
    # cache), and stays exact either way.
    if grad.nbytes <= BOX_MAJOR_BYTES:
        _scatter(grad, grad_output, argmax, planes, h * w)
    else:
        _scatter(grad, grad_output.transpose(1, 0, 2, 3), argmax.transpose(1, 0, 2, 3), planes.T, h * w)
    return grad.reshape(input.shape).astype(input.dtype, copy=False)
