"""Position-sensitive RoIPool and RoIAlign (R-FCN, Dai et al. 2016), torchvision's semantics.

The input has ``C_out * PH * PW`` channels; output ``(c, ph, pw)`` pools input channel
``(c * PH + ph) * PW + pw`` (:func:`roilib.family.ps_channel`) over bin ``(ph, pw)``.
Viewed as ``(N, C_out, PH * PW * H * W)`` (no copy), bin ``b = ph * PW + pw`` of output
channel ``c`` reads plane ``b`` of row ``c``: each ``(box, bin)`` pair reads one small
rectangle of one plane, in the same place for all ``C_out`` channels.

* ``ps_roi_pool`` averages integer bins (:func:`roilib.family.ps_roi_pool_bins`): the
  rectangle is the bin, every pixel weighs ``1 / area``.
* ``ps_roi_align`` is RoIAlign with ``aligned=True`` geometry
  (:func:`roilib.geometry.roi_align_boxes`, :func:`roilib.geometry.axis_samples`): the
  rectangle is the run of rows (columns) its bin's valid samples touch, each row (column)
  weighing the sum of its samples' 1-D bilinear weights; the weight of a pixel is the
  product of its row's and its column's, over the sample count.

The ops never copy the map. The rectangles are sorted by (image, rows, columns, position)
(:func:`_plan`): a run of one shape has the same pixel offsets for every rectangle, and
its positions sweep the map in order. The runs are cut into batches of at most
:data:`CHUNK` gathered elements; a batch is one gather ``(C_out, pixels)`` in which each
piece of a run is laid pixel-major ``(rows * cols, rectangles)``, one multiplication by
the pixels' weights (PS-RoIAlign), a sum over each piece's pixels, one pixel after
another (torchvision's order), and one write to the output. The backward is the
transpose: every pixel receives its weight times its rectangle's gradient, added one
channel at a time with ``np.add.at`` (rectangles of different boxes overlap).

With few boxes (:data:`SMALL`) the sort costs more than it orders: :func:`_by_area` lists
every pixel by the area of its rectangle instead, largest first, and the forward adds
pixel position after pixel position over all rectangles at once, which is the same
order of additions, so the same bits.

Two places where roilib returns the mathematically consistent value and torchvision's
CPU op does not (documented in the API page and tested against its fixture):

* ``ps_roi_pool_backward`` is the exact transpose of the forward. torchvision's forward
  clips bins to ``[0, size - 1]`` but its backward clips them to ``[0, size]``, so it
  sends gradient to the last row/column, which its forward never reads.
* ``ps_roi_align`` divides by ``max(gh * gw, 1)``; torchvision divides by ``gh * gw``,
  which is 0 for an adaptive grid on a box of (nearly) zero or inverted size, and returns
  NaN there. roilib returns 0, like RoIAlign.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np

from .. import _validate as v
from ..family import ps_roi_pool_bins
from ..geometry import axis_samples, roi_align_boxes

#: most elements (channels x pixels) one gather handles, and a fourth of the pixels one
#: scatter handles: bounds the temporaries
CHUNK = 1 << 16

#: a sample row no valid sample has (its run is empty)
_NO_SAMPLE = np.iinfo(np.int64).max // 2

#: the forward and backward list the pixels without the plan (:func:`_by_area`) up to
#: this many candidates (rectangles times the largest rectangle's grid): few boxes
SMALL = 1 << 15


def _check(input, rois, output_size, spatial_scale):
    v.check_input(input)
    rois = v.check_rois(rois, input)
    output_size = v.check_output_size(output_size)
    spatial_scale = v.check_spatial_scale(spatial_scale)
    out_channels = v.check_ps_channels(input, output_size)
    return rois, output_size, spatial_scale, out_channels


# -- the rectangles: one per (box, bin) ----------------------------------------------


@dataclass(frozen=True)
class _Rects:
    """The rectangle each ``(box, bin)`` pair reads on plane ``b = ph * PW + pw`` of its image.

    Rows ``[row0, row0 + rows)`` come from the bin row ``(k, ph)``, columns from the bin
    column ``(k, pw)``; a rectangle with no rows or no columns reads nothing (output 0).

    Attributes
    ----------
    image : ndarray of int64, shape (K,)
    row0, rows : ndarray of int64, shape (K, PH)
    col0, cols : ndarray of int64, shape (K, PW)
    height, width : int
        The map's ``H`` and ``W``.
    row_weight : ndarray, shape (R, K * PH) or None
        PS-RoIAlign: ``row_weight[r, k * PH + ph]`` weighs row ``row0 + r`` of bin row
        ``(k, ph)`` (over the box's sample count). None for PS-RoIPool, whose pixels all
        weigh ``1 / area``.
    col_weight : ndarray, shape (S, K * PW) or None
        Likewise for the columns.
    """

    image: np.ndarray
    row0: np.ndarray
    rows: np.ndarray
    col0: np.ndarray
    cols: np.ndarray
    height: int
    width: int
    row_weight: Optional[np.ndarray] = None
    col_weight: Optional[np.ndarray] = None

    @property
    def output_size(self) -> Tuple[int, int]:
        return self.rows.shape[1], self.cols.shape[1]


def _pool_rects(rois, output_size, spatial_scale, height, width, dtype) -> _Rects:
    """PS-RoIPool's bins (:func:`roilib.family.ps_roi_pool_bins`) as rectangles."""
    bins = ps_roi_pool_bins(rois, output_size, spatial_scale, height, width, dtype)
    rows = np.maximum(bins.hend - bins.hstart, 0)
    cols = np.maximum(bins.wend - bins.wstart, 0)
    return _Rects(rois[:, 0].astype(np.int64), bins.hstart, rows, bins.wstart, cols, height, width)


def _spans(start, bin_size, grid, n_bins: int, size, dtype):
    """Each bin's run of pixels touched by its valid samples, with the summed weights.

    Parameters
    ----------
    start, bin_size : ndarray, shape (K,)
        From :func:`roilib.geometry.roi_align_boxes`.
    grid : ndarray of int64, shape (K,)
        Samples per bin along this axis.
    n_bins : int
        Output size along this axis.
    size : int or ndarray of int64, shape (K,)
        Map size along this axis, or each row's (both axes of equal output size in one
        call: rows ``[0, K)`` one axis, ``[K, 2K)`` the other).
    dtype : numpy dtype
        Arithmetic dtype.

    Returns
    -------
    first, length : ndarray of int64, shape (K, n_bins)
        The run ``[first, first + length)``; length 0 when no valid sample.
    weight : ndarray, shape (max length, K * n_bins)
        ``weight[r, k * n_bins + p]``: the 1-D bilinear weights of pixel ``first + r``
        summed over bin ``p``'s samples (a bin-summed ``interpolation_matrix``).
    """
    k = start.shape[0]
    first = np.zeros((k, n_bins), dtype=np.int64)
    length = np.zeros((k, n_bins), dtype=np.int64)
    parts = []
    sizes = np.asarray(size)
    for g in np.unique(grid[grid > 0]).tolist():  # a few distinct grid sizes
        idx = np.flatnonzero(grid == g)
        size_g = sizes if sizes.ndim == 0 else sizes[idx][:, None]  # broadcast over the samples
        s = axis_samples(start[idx], bin_size[idx], g, n_bins, size_g, dtype)

        def by_sample(a):
            # (K_g, n_bins * g) -> (g, K_g * n_bins): reductions over the samples become
            # whole-array operations instead of loops over a tiny last axis
            return np.ascontiguousarray(a.reshape(idx.size * n_bins, g).T)

        low, high, valid = by_sample(s.low), by_sample(s.high), by_sample(s.valid)
        lo = np.where(valid, low, _NO_SAMPLE).min(axis=0)
        n = np.maximum(np.where(valid, high, -1).max(axis=0) - lo + 1, 0)
        first[idx] = np.where(n > 0, lo, 0).reshape(idx.size, n_bins)
        length[idx] = n.reshape(idx.size, n_bins)
        parts.append((idx, low - lo, high - lo, by_sample(s.w_low), by_sample(s.w_high)))
    r = np.arange(int(length.max(initial=0)))[:, None]
    weight = np.zeros((r.size, k, n_bins), dtype=dtype)
    for idx, rel_low, rel_high, w_low, w_high in parts:
        # per sample: w_low on its low pixel plus w_high on its high one (the same pixel at
        # the map's end), then the samples of a bin added in order, as a bin-summed
        # interpolation matrix does; invalid samples have zero weights
        total = 0
        for j in range(rel_low.shape[0]):
            total = total + ((rel_low[j] == r) * w_low[j] + (rel_high[j] == r) * w_high[j])
        weight[:, idx] = np.reshape(total, (r.size, idx.size, n_bins))
    return first, length, weight.reshape(r.size, k * n_bins)


def _align_rects(rois, output_size, spatial_scale, sampling_ratio, height, width, dtype) -> _Rects:
    """PS-RoIAlign's bins (``aligned=True``) as weighted rectangles."""
    ph, pw = output_size
    geo = roi_align_boxes(rois, output_size, spatial_scale, sampling_ratio, True, dtype)
    if ph == pw:  # both axes in one call: its fixed cost weighs when there are few boxes
        k = geo.start_y.shape[0]
        both = _spans(
            np.concatenate([geo.start_y, geo.start_x]), np.concatenate([geo.bin_h, geo.bin_w]),
            np.concatenate([geo.grid_h, geo.grid_w]), ph, np.repeat([height, width], k), dtype,
        )
        (row0, col0), (rows, cols) = np.split(both[0], 2), np.split(both[1], 2)
        row_weight = np.ascontiguousarray(both[2][:, : k * ph])
        col_weight = np.ascontiguousarray(both[2][:, k * ph :])
    else:
        row0, rows, row_weight = _spans(geo.start_y, geo.bin_h, geo.grid_h, ph, height, dtype)
        col0, cols, col_weight = _spans(geo.start_x, geo.bin_w, geo.grid_w, pw, width, dtype)
    row_weight /= np.repeat(geo.count.astype(dtype), ph)  # the average's divisor, once per box
    return _Rects(rois[:, 0].astype(np.int64), row0, rows, col0, cols, height, width, row_weight, col_weight)


# -- the plan: rectangles sorted into runs of one shape ---------------------------------


@dataclass(frozen=True)
class _Run:
    """Sorted rectangles ``[start, end)``: one image, ``rows x cols`` pixels each, whose
    pixel ``p`` lies ``offsets[p]`` after the top-left one (row-major)."""

    start: int
    end: int
    image: int
    rows: int
    cols: int
    offsets: np.ndarray


@dataclass(frozen=True)
class _Plan:
    """The rectangles sorted by (image, rows, cols, position), in runs of one shape.

    Sorting by position makes every gather sweep the map in order (several times faster
    than reading it at random). Empty rectangles sort into no run.

    Attributes
    ----------
    box, bin : ndarray of int64, shape (M,)
        Box ``k`` and bin ``b = ph * PW + pw`` of each sorted rectangle.
    index : ndarray of int64, shape (M,)
        ``k * PH * PW + b``: its place in a ``(K, PH * PW)`` array.
    pos : ndarray of int64, shape (M,)
        Their top-left pixels in an image's ``(C_out, PH * PW * H * W)`` view:
        ``b * H * W + row * W + col``.
    area : ndarray of int64, shape (M,)
        Their pixel counts (0: empty).
    runs : list of _Run
    row_index, col_index : ndarray of int64, shape (M,), or None
        PS-RoIAlign: their columns in ``row_weight`` (``k * PH + ph``) and ``col_weight``.
    """

    box: np.ndarray
    bin: np.ndarray
    index: np.ndarray
    pos: np.ndarray
    area: np.ndarray
    runs: list
    row_index: Optional[np.ndarray] = None
    col_index: Optional[np.ndarray] = None


def _plan(rects: _Rects) -> _Plan:
    """Sort the rectangles (see :class:`_Plan`).

    The keys are built bin-major, ``(PH, PW, K)``: whole-array operations along the boxes
    rather than loops over a last axis of ``PW``; integer divisions are by scalars only.
    """
    (ph, pw), h, w = rects.output_size, rects.height, rects.width
    k = rects.image.size
    span = ph * pw * h * w
    nr, nc = int(rects.rows.max(initial=0)) + 1, int(rects.cols.max(initial=0)) + 1
    row0, rows = np.ascontiguousarray(rects.row0.T), np.ascontiguousarray(rects.rows.T)  # (PH, K)
    col0, cols = np.ascontiguousarray(rects.col0.T), np.ascontiguousarray(rects.cols.T)  # (PW, K)
    plane = (np.arange(ph * pw, dtype=np.int64) * (h * w)).reshape(ph, pw, 1)
    pos = (plane + (row0 * w)[:, None, :] + col0[None, :, :]).ravel()
    shape = ((rects.image * (nr * nc) + rows * nc)[:, None, :] + cols[None, :, :]).ravel()
    order = np.argsort(shape * span + pos)  # bin-major: b * K + k
    shape, pos = shape[order], pos[order]
    area = (rows[:, None, :] * cols[None, :, :]).ravel()[order]
    grid = np.arange(nr)[:, None] * w + np.arange(nc)  # offsets of every shape
    counts = np.bincount(shape)
    keys = np.flatnonzero(counts)
    ends = np.cumsum(counts[keys]).tolist()
    runs = []
    for a, b, key in zip([0] + ends[:-1], ends, keys.tolist()):
        image, r, c = key // (nr * nc), key // nc % nr, key % nc
        if r and c:
            runs.append(_Run(a, b, image, r, c, grid[:r, :c].ravel()))
    bins = order // k
    box = order - bins * k
    index = box * (ph * pw) + bins
    if rects.row_weight is None:
        return _Plan(box, bins, index, pos, area, runs)
    return _Plan(box, bins, index, pos, area, runs, box * ph + bins // pw, box * pw + bins % pw)


@dataclass(frozen=True)
class _Batch:
    """Sorted rectangles ``[start, end)`` of one image, as ``(run, a, b)`` pieces (and
    empty rectangles between runs, which belong to no piece)."""

    image: int
    start: int
    end: int
    pieces: list
    pixels: int


def _batches(plan: _Plan, per_pixel: int, limit: int):
    """Consecutive pieces of runs, one image and at most ``limit`` elements (``per_pixel``
    a pixel) a batch; a run above the limit is split (a rectangle never is)."""
    pieces, size = [], 0
    for run in plan.runs:
        per = run.offsets.size
        step = max(1, limit // (per_pixel * per))
        for a in range(run.start, run.end, step):
            b = min(a + step, run.end)
            if pieces and ((size + per * (b - a)) * per_pixel > limit or pieces[0][0].image != run.image):
                yield _Batch(pieces[0][0].image, pieces[0][1], pieces[-1][2], pieces, size)
                pieces, size = [], 0
            pieces.append((run, a, b))
            size += per * (b - a)
    if pieces:
        yield _Batch(pieces[0][0].image, pieces[0][1], pieces[-1][2], pieces, size)


def _pixels(rects: _Rects, plan: _Plan, batch: _Batch, dtype, rect_of_pixel: bool = False):
    """Every pixel of a batch's rectangles, piece after piece, each piece ``(rows * cols,
    b - a)`` (pixel-major): its position, its weight (PS-RoIAlign; else None) and, if
    asked, its rectangle's ``k * PH * PW + b`` (else None)."""
    where = np.empty(batch.pixels, dtype=np.int64)
    weight = None if rects.row_weight is None else np.empty(batch.pixels, dtype=dtype)
    rect = np.empty(batch.pixels, dtype=np.int64) if rect_of_pixel else None
    at = 0
    for run, a, b in batch.pieces:
        shape, size = (run.offsets.size, b - a), run.offsets.size * (b - a)
        np.add(plan.pos[a:b], run.offsets[:, None], out=where[at : at + size].reshape(shape))
        if weight is not None:
            wy = rects.row_weight[: run.rows, plan.row_index[a:b]]  # (rows, b - a)
            wx = rects.col_weight[: run.cols, plan.col_index[a:b]]  # (cols, b - a)
            dest = weight[at : at + size].reshape(run.rows, run.cols, b - a)
            np.multiply(wy[:, None, :], wx[None, :, :], out=dest)
        if rect is not None:
            rect[at : at + size].reshape(shape)[...] = plan.index[a:b]
        at += size
    return where, weight, rect


# -- forward: gather and sum ---------------------------------------------------------


def _sum_pixels(part: np.ndarray, out: np.ndarray) -> None:
    """``out = part.sum(axis=1)`` for ``(C, pixels, rectangles)``, one pixel after another
    (torchvision's order, whatever the batch)."""
    if part.shape[2] > 1 or part.shape[1] < 3:
        np.add.reduce(part, axis=1, out=out)  # rectangles innermost: a sequence of additions
    else:  # a lone rectangle: NumPy would sum its contiguous pixels pairwise
        out[...] = part[:, 0]
        for p in range(1, part.shape[1]):
            out += part[:, p]


def _forward(input: np.ndarray, rects: _Rects) -> np.ndarray:
    """Every rectangle's weighted sum (PS-RoIPool: mean) -> ``(K, C_out, PH, PW)``.

    A batch is one gather into a reused buffer, one multiplication by the pixels' weights
    (PS-RoIAlign), a sum over each piece's pixels and one write to the output. No
    temporary is as large as the output: fresh arrays of a few MiB cost more in page
    faults than in arithmetic.
    """
    if _few(rects):
        return _few_forward(input, rects)
    n = input.shape[0]
    ph, pw = rects.output_size
    out_channels = input.shape[1] // (ph * pw)
    dtype = v.compute_dtype(input.dtype)
    x = input.reshape(n, out_channels, -1)  # a view: channel c * PH*PW + b is plane b of row c
    plan = _plan(rects)
    out = np.zeros((rects.image.size, out_channels, ph * pw), dtype=input.dtype)
    buffer = np.empty(0, dtype=input.dtype)
    if rects.row_weight is None:
        area = np.maximum(plan.area, 1).astype(dtype)
    for batch in _batches(plan, out_channels, CHUNK):
        where, weight, _ = _pixels(rects, plan, batch, dtype)
        if buffer.size < out_channels * where.size:  # once, or for a rectangle above CHUNK
            buffer = np.empty(max(CHUNK, out_channels * where.size), dtype=input.dtype)
        values = buffer[: out_channels * where.size].reshape(out_channels, where.size)
        # in range by construction: mode "wrap" only selects NumPy's faster loop
        x[batch.image].take(where, axis=1, mode="wrap", out=values)
        values = values.astype(dtype, copy=False)
        if weight is not None:
            values *= weight
        sums = np.zeros((out_channels, batch.end - batch.start), dtype=dtype)  # 0: empty bins
        at = 0
        for run, a, b in batch.pieces:
            size = run.offsets.size * (b - a)
            part = values[:, at : at + size].reshape(out_channels, run.offsets.size, b - a)
            _sum_pixels(part, sums[:, a - batch.start : b - batch.start])
            at += size
        if weight is None:
            sums /= area[batch.start : batch.end]  # PS-RoIPool: then / area, as torchvision
        out[plan.box[batch.start : batch.end], :, plan.bin[batch.start : batch.end]] = sums.T
    return out.reshape(-1, out_channels, ph, pw)


# -- backward: scatter-add -----------------------------------------------------------


@dataclass(frozen=True)
class _ByArea:
    """Every pixel of every rectangle, without the plan's sort (few boxes).

    The rectangles are ordered by area, largest first (ties: ``k * PH * PW + b``), and
    their pixels listed pixel-major: pixel 0 of every non-empty rectangle, then pixel 1 of
    every rectangle with two or more, and so on, each rectangle's pixels in row-major
    order. Pixel ``p`` of all rectangles is then one slice of the first ``counts[p]``
    rectangles, so summing the slices in turn adds each rectangle's pixels one after
    another (torchvision's order) with whole-array operations.

    Attributes
    ----------
    order : ndarray of int64, shape (M,)
        ``k * PH * PW + b`` of each rectangle, largest first (``M = K * PH * PW``).
    area : ndarray of int64, shape (M,)
        Their pixel counts, in that order (non-increasing).
    counts : list of int
        ``counts[p]``: rectangles with more than ``p`` pixels (the slice of pixel ``p``).
    where : ndarray of int64, shape (pixels,)
        ``image * span + b * H * W + row * W + col``: the pixel in channel 0 of the
        ``(N, C_out, PH * PW * H * W)`` view, flattened.
    rect : ndarray of int64, shape (pixels,)
        The pixel's rectangle, as ``k * PH * PW + b``.
    weight : ndarray, shape (pixels,), or None
        Row weight times column weight (PS-RoIAlign), as :func:`_pixels`; None for
        PS-RoIPool.
    """

    order: np.ndarray
    area: np.ndarray
    counts: list
    where: np.ndarray
    rect: np.ndarray
    weight: Optional[np.ndarray]


def _by_area(rects: _Rects, span: int, dtype) -> _ByArea:
    """List the pixels of ``rects`` as :class:`_ByArea` (``span``: one image's elements,
    ``C_out * PH * PW * H * W``; ``dtype``: arithmetic dtype of the weights)."""
    (ph, pw), h, w = rects.output_size, rects.height, rects.width
    k = rects.image.size
    shape = (k, ph, pw)
    area = (rects.rows[:, :, None] * rects.cols[:, None, :]).reshape(-1)
    order = np.argsort(-area, kind="stable")
    largest = int(area[order[0]]) if area.size else 0
    # rectangles with more than p pixels, p = 0 .. largest - 1
    counts = area.size - np.cumsum(np.bincount(area, minlength=largest + 1)[:largest])
    # per rectangle (sorted): its columns, and its top-left pixel in the flat view
    cols = np.broadcast_to(rects.cols[:, None, :], shape).reshape(-1)[order]
    top_left = (rects.image * span)[:, None, None] + (np.arange(ph * pw) * (h * w)).reshape(ph, pw)
    top_left = (top_left + (rects.row0 * w)[:, :, None] + rects.col0[:, None, :]).reshape(-1)[order]
    # per pixel: the p-th pixel of the sorted rectangle i, at row p // cols, column p % cols
    pixel = np.repeat(np.arange(largest), counts)
    i = np.arange(pixel.size) - np.repeat(np.cumsum(counts) - counts, counts)
    c = cols[i]
    row = pixel // c
    where = top_left[i] + pixel + row * (w - c)  # + row * w + (pixel - row * c)
    rect = order[i]
    weight = None
    if rects.row_weight is not None:
        row_index = np.broadcast_to(np.arange(k * ph).reshape(k, ph, 1), shape).reshape(-1)[order]
        col_index = np.broadcast_to(np.arange(k * pw).reshape(k, 1, pw), shape).reshape(-1)[order]
        wy = rects.row_weight.reshape(-1)[row * (k * ph) + row_index[i]]
        wx = rects.col_weight.reshape(-1)[(pixel - row * c) * (k * pw) + col_index[i]]
        weight = (wy * wx).astype(dtype, copy=False)  # as _pixels: product, then cast
    return _ByArea(order, area[order], counts.tolist(), where, rect, weight)


def _few_forward(input: np.ndarray, rects: _Rects) -> np.ndarray:
    """:func:`_forward` for few boxes (see :data:`SMALL`), bit for bit: one gather of
    every pixel (:func:`_by_area`), one multiplication by the weights, and one addition
    per pixel position ``p`` over all rectangles that have it; for a group of channels at
    a time when there are many (the gathered values stay under ``4 * CHUNK``)."""
    ph, pw = rects.output_size
    out_channels = input.shape[1] // (ph * pw)
    span = ph * pw * rects.height * rects.width
    dtype = v.compute_dtype(input.dtype)
    pixels = _by_area(rects, out_channels * span, dtype)
    one_image = input.reshape(out_channels, span) if input.shape[0] == 1 else None
    filled = pixels.counts[0] if pixels.counts else 0  # the non-empty rectangles
    sums = np.zeros((out_channels, pixels.order.size), dtype=dtype)  # 0: empty bins
    group = max(1, 4 * CHUNK // max(pixels.where.size, 1))
    for c0 in range(0, out_channels, group):
        c1 = min(c0 + group, out_channels)
        # in range by construction: mode "wrap" only selects NumPy's faster loop
        if one_image is not None:  # a gather along the rows of a view: no index per channel
            values = one_image[c0:c1].take(pixels.where, axis=1, mode="wrap")
        else:
            index = (np.arange(c0, c1) * span)[:, None] + pixels.where
            values = input.reshape(-1).take(index, mode="wrap")
        values = values.astype(dtype, copy=False)
        if pixels.weight is not None:
            values *= pixels.weight
        part, at = sums[c0:c1], 0
        for m in pixels.counts:
            part[:, :m] += values[:, at : at + m]
            at += m
    if pixels.weight is None:  # PS-RoIPool: then / area, as torchvision
        sums[:, :filled] /= pixels.area[:filled].astype(dtype)
    out = np.empty((out_channels, pixels.order.size), dtype=input.dtype)
    out[:, pixels.order] = sums
    k = rects.image.size
    return np.ascontiguousarray(out.reshape(out_channels, k, ph, pw).transpose(1, 0, 2, 3))


def _few(rects: _Rects) -> bool:
    """Whether the few-box paths (:func:`_by_area`) apply: see :data:`SMALL`."""
    k = rects.image.size
    ph, pw = rects.output_size
    return k * ph * pw * int(rects.rows.max(initial=0)) * int(rects.cols.max(initial=0)) <= SMALL


def _backward(grad_output: np.ndarray, input: np.ndarray, rects: _Rects) -> np.ndarray:
    """The transpose of :func:`_forward`: ``(N, C, H, W)`` gradient of the input.

    Every pixel of every rectangle receives its weight times the rectangle's gradient,
    one channel at a time: ``np.add.at`` on a 1-D plane adds repeated positions
    (overlapping boxes) in turn, and takes NumPy's fast path.
    """
    n = input.shape[0]
    ph, pw = rects.output_size
    k, out_channels = grad_output.shape[:2]
    dtype = v.compute_dtype(input.dtype)
    grad = np.zeros(input.shape, dtype=dtype)  # in the compute dtype (float16: cast at the end)
    target = grad.reshape(n, out_channels, -1)
    # each rectangle's gradient, (C_out, K * PH*PW) (a copy); PS-RoIPool's over its area
    g = np.array(grad_output.reshape(k, out_channels, ph * pw).transpose(1, 0, 2), dtype=dtype, order="C")
    if rects.row_weight is None:
        g /= np.maximum(rects.rows[:, :, None] * rects.cols[:, None, :], 1).reshape(k, ph * pw).astype(dtype)
    g = g.reshape(out_channels, -1)
    if _few(rects):  # the plan's sort and batches cost more than the adds they order
        flat, span = grad.reshape(-1), target.shape[2]
        pixels = _by_area(rects, out_channels * span, dtype)
        group = max(1, 4 * CHUNK // max(pixels.where.size, 1))  # channels a call: bounds the temporaries
        for c0 in range(0, out_channels, group):
            c1 = min(c0 + group, out_channels)
            values = g[c0:c1].take(pixels.rect, axis=1, mode="wrap")  # (c1 - c0, pixels)
            if pixels.weight is not None:
                values *= pixels.weight
            # channel after channel, each pixel's adds in the same order as one call a channel
            np.add.at(flat, ((np.arange(c0, c1) * span)[:, None] + pixels.where).ravel(), values.ravel())
        return grad if grad.dtype == input.dtype else grad.astype(input.dtype)
    plan = _plan(rects)
    for batch in _batches(plan, 1, 4 * CHUNK):
        where, weight, rect = _pixels(rects, plan, batch, dtype, rect_of_pixel=True)
        plane = target[batch.image]
        for channel in range(out_channels):
            values = g[channel].take(rect, mode="wrap")
            if weight is not None:
                values *= weight
            np.add.at(plane[channel], where, values)
    return grad if grad.dtype == input.dtype else grad.astype(input.dtype)


# -- public ops ----------------------------------------------------------------------


def ps_roi_pool(input: np.ndarray, rois, output_size, spatial_scale: float = 1.0) -> np.ndarray:
    """Position-sensitive RoIPool forward (R-FCN; torchvision's ``ps_roi_pool``).

    The box corners are C-rounded on the map; the box is ``end - start`` pixels (at
    least 1); bin ``p`` spans ``[floor(p * len / P), ceil((p + 1) * len / P))`` from the
    start, clipped to ``[0, size - 1]`` (:func:`roilib.family.ps_roi_pool_bins`); the
    output is the bin's mean over its own channel group, 0 for an empty bin.

    Parameters
    ----------
    input : ndarray, shape (N, C_out * PH * PW, H, W)
    rois : ndarray (K, 5) or list of (K_i, 4) arrays
    output_size : int or (int, int)
    spatial_scale : float

    Returns
    -------
    ndarray, shape (K, C_out, PH, PW)
    """
    rois, output_size, spatial_scale, _ = _check(input, rois, output_size, spatial_scale)
    rects = _pool_rects(rois, output_size, spatial_scale, *input.shape[2:], rois.dtype)
    return _forward(input, rects)


def ps_roi_pool_backward(grad_output: np.ndarray, input: np.ndarray, rois, output_size, spatial_scale: float = 1.0) -> np.ndarray:
    """Gradient of :func:`ps_roi_pool` with respect to ``input``.

    Every pixel of a non-empty bin receives the bin's gradient divided by its area, in
    the bin's channel. This is the exact transpose of the forward (torchvision's CPU
    backward differs at the map's last row and column; see the module docstring).

    Parameters
    ----------
    grad_output : ndarray, shape (K, C_out, PH, PW)
    input, rois, output_size, spatial_scale
        As in :func:`ps_roi_pool`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale, c_out = _check(input, rois, output_size, spatial_scale)
    v.check_grad_output(grad_output, (rois.shape[0], c_out) + output_size, input)
    rects = _pool_rects(rois, output_size, spatial_scale, *input.shape[2:], rois.dtype)
    return _backward(grad_output, input, rects)


def ps_roi_align(input: np.ndarray, rois, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1) -> np.ndarray:
    """Position-sensitive RoIAlign forward (torchvision's ``ps_roi_align``).

    RoIAlign's bilinear average with the half-pixel offset always on (``aligned=True``:
    no size clamp), bin ``(ph, pw)`` sampled in its own channel group. A box whose grid
    has no samples outputs 0 (torchvision: NaN; see the module docstring).

    Parameters
    ----------
    input : ndarray, shape (N, C_out * PH * PW, H, W)
    rois : ndarray (K, 5) or list of (K_i, 4) arrays
    output_size : int or (int, int)
    spatial_scale : float
    sampling_ratio : int
        Samples per bin and axis; ``<= 0``: ``ceil(roi_size / output_size)``.

    Returns
    -------
    ndarray, shape (K, C_out, PH, PW)
    """
    rois, output_size, spatial_scale, _ = _check(input, rois, output_size, spatial_scale)
    sampling_ratio = v.check_sampling_ratio(sampling_ratio)
    rects = _align_rects(rois, output_size, spatial_scale, sampling_ratio, *input.shape[2:], rois.dtype)
    return _forward(input, rects)


def ps_roi_align_backward(
    grad_output: np.ndarray, input: np.ndarray, rois, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1
) -> np.ndarray:
    """Gradient of :func:`ps_roi_align` with respect to ``input``.

    Each output's gradient, divided by the sample count, is spread over the four
    corners of each of its samples with their bilinear weights, in its own channel.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C_out, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio
        As in :func:`ps_roi_align`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale, c_out = _check(input, rois, output_size, spatial_scale)
    sampling_ratio = v.check_sampling_ratio(sampling_ratio)
    v.check_grad_output(grad_output, (rois.shape[0], c_out) + output_size, input)
    rects = _align_rects(rois, output_size, spatial_scale, sampling_ratio, *input.shape[2:], rois.dtype)
    return _backward(grad_output, input, rects)
