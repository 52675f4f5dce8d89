"""RoIAlign (Mask R-CNN): bilinear samples of a box, pooled per bin.

For one box and one channel, the bilinear samples form ``S = B_y X B_x^T``, where
``B_y`` (samples x touched rows) and ``B_x`` (samples x touched columns) hold the 1-D
interpolation weights from :func:`roilib.geometry.interpolation_matrix`. Average pooling
sums the samples of each bin, so ``avg`` RoIAlign is ``A_y X A_x^T / count`` with
``A = bin-summed B``: linear, separable, and its backward is the transpose.

The forward average builds every box's ``A_y / count`` and ``A_x`` at once
(:class:`_AxisWeights`) and writes each box's ``(C, PH, PW)`` result straight into the
output. Many boxes on a wide map (:func:`._layout.reads_in_groups`) read a channels-last
copy of one channel group at a time (the copy costs a quarter of the map, not all of it);
few boxes read their blocks of the ``(N, C, H, W)`` map in place, with no copy at all,
bin by bin where the bins are large, except a tall box at a fixed sampling ratio, which
copies only the rows its samples read (:data:`SAMPLE_ROWS_SHARE`). They apply the same
weights and agree to rounding. All multiply runs of pixels some of which no sample
reads, with weight 0: a non-finite value there makes the output NaN, where torchvision
would not read it. The backward, ``max`` and the box gradient apply the per-sample
matrices of :class:`_BoxSampling` to channels-last blocks.

``max`` takes the largest sample of each bin (mmcv's definition: samples outside the
map count as 0) and routes the gradient through the winning sample's four corners.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .. import _validate as v
from ..geometry import AlignBoxes, axis_samples, box_axis_samples, interpolation_matrix, roi_align_boxes
from ._layout import (
    GradBlocks, MapBlocks, cells_read, channel_groups, channels_last, reads_in_groups, take_block,
)


class _BoxSampling:
    """The interpolation matrices of one box (see the module docstring)."""

    def __init__(self, ys, xs, count, output_size: Tuple[int, int], height: int, width: int, slopes: bool):
        self.ys, self.xs = ys, xs
        self.rows, self.by, *dy = interpolation_matrix(ys, height, slopes)
        self.cols, self.bx, *dx = interpolation_matrix(xs, width, slopes)
        if slopes:
            self.dy, self.dx = dy[0], dx[0]
        self.count = ys.coord.dtype.type(count)
        self.output_size = output_size

    @property
    def empty(self) -> bool:
        """No sample touches the map: output 0, no gradient."""
        return self.rows.size == 0 or self.cols.size == 0

    def bin_sum(self, m: np.ndarray, axis: int) -> np.ndarray:
        """Sum the rows of a per-sample matrix within each bin: ``(P*g, T) -> (P, T)``."""
        grid = self.ys.grid if axis == 0 else self.xs.grid
        return m.reshape(self.output_size[axis], grid, -1).sum(axis=1)

    def samples(self, block: np.ndarray, row_matrix=None, col_matrix=None) -> np.ndarray:
        """``R block C^T`` for a ``(rows, cols, C)`` block -> ``(R.shape[0], C.shape[0], C)``."""
        row_matrix = self.by if row_matrix is None else row_matrix
        col_matrix = self.bx if col_matrix is None else col_matrix
        t = col_matrix @ block  # (rows, n_col_samples, C)
        return (row_matrix @ t.reshape(t.shape[0], -1)).reshape(row_matrix.shape[0], col_matrix.shape[0], -1)

    def samples_adjoint(self, g: np.ndarray, row_matrix=None, col_matrix=None) -> np.ndarray:
        """Transpose of :meth:`samples`: ``R^T g C`` -> ``(rows, cols, C)``."""
        row_matrix = self.by if row_matrix is None else row_matrix
        col_matrix = self.bx if col_matrix is None else col_matrix
        t = (row_matrix.T @ g.reshape(g.shape[0], -1)).reshape(row_matrix.shape[1], g.shape[1], -1)
        return col_matrix.T @ t

    def winners(self, s: np.ndarray) -> np.ndarray:
        """Index (``iy * g_w + ix``) of each bin's largest sample, shape ``(PH, PW, C)``.

        The first maximal sample in ``iy``-major order wins, like a strict ``>`` loop.
        """
        (ph, pw), gh, gw = self.output_size, self.ys.grid, self.xs.grid
        per_bin = s.reshape(ph, gh, pw, gw, -1).transpose(0, 2, 4, 1, 3).reshape(ph, pw, s.shape[-1], gh * gw)
        return per_bin.argmax(axis=-1), per_bin

    def winner_mask(self, g: np.ndarray, win: np.ndarray) -> np.ndarray:
        """Scatter ``g`` (PH, PW, C) onto the sample grid at the winning samples."""
        (ph, pw), gh, gw = self.output_size, self.ys.grid, self.xs.grid
        c = g.shape[-1]
        grid = np.zeros((ph, pw, c, gh * gw), dtype=g.dtype)
        np.put_along_axis(grid, win[..., None], g[..., None], axis=-1)
        return grid.reshape(ph, pw, c, gh, gw).transpose(0, 3, 1, 4, 2).reshape(ph * gh, pw * gw, c)

    def coord_derivatives(self, boxes: AlignBoxes, k: int, spatial_scale, axis: int):
        """``d coord / d (low corner)`` and ``d coord / d (high corner)`` per sample."""
        samples = self.ys if axis == 0 else self.xs
        clamped = (boxes.clamped_h if axis == 0 else boxes.clamped_w)[k]
        s = samples.coord.dtype.type(spatial_scale)
        if clamped:
            # roi size was raised to 1: the bins no longer follow the far corner
            return np.full_like(samples.coord, s), np.zeros_like(samples.coord)
        f = samples.fraction.astype(samples.coord.dtype)
        return s * (1 - f), s * f


def _check(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    v.check_input(input)
    return (
        v.check_rois(rois, input),
        v.check_output_size(output_size),
        v.check_spatial_scale(spatial_scale),
        v.check_sampling_ratio(sampling_ratio),
        v.check_aligned(aligned),
        v.check_mode(mode),
    )


def _sampled(height, width, dtype, rois, output_size, spatial_scale, sampling_ratio, aligned, slopes=False):
    """Yield ``(k, image, sampling, geometry)`` for every box that touches a
    ``height x width`` map, computing in ``dtype``."""
    ph, pw = output_size
    geo = roi_align_boxes(rois, output_size, spatial_scale, sampling_ratio, aligned, dtype)
    ys = box_axis_samples(geo.start_y, geo.bin_h, geo.grid_h, ph, height, dtype)
    xs = box_axis_samples(geo.start_x, geo.bin_w, geo.grid_w, pw, width, dtype)
    count = geo.count
    for k in range(rois.shape[0]):
        box = _BoxSampling(ys[k], xs[k], count[k], output_size, height, width, slopes)
        if not box.empty:
            yield k, int(rois[k, 0]), box, geo


def _boxes(x_hwc, rois, output_size, spatial_scale, sampling_ratio, aligned, slopes=False):
    """:func:`_sampled` for a channels-last map ``x_hwc`` (its shape and dtype)."""
    _, h, w, _ = x_hwc.shape
    return _sampled(h, w, x_hwc.dtype, rois, output_size, spatial_scale, sampling_ratio, aligned, slopes)


#: read channels-last, a box's rows (or columns) are read as one run, the pixels no
#: sample touches weighted 0, when the run is at most this many times the touched pixels;
#: beyond, only the touched ones are gathered (a fixed sampling ratio on a large box)
SPAN_SLACK = 1.25
#: A bin's samples read a window of a box's rows (or columns), about a bin wide, and the
#: bin's row of ``A`` is zero outside it. Read in place, a box is multiplied bin by bin,
#: each product over its own window, when its windows are this many pixels on average,
#: in two products (each over the windows of half the bins) from :data:`HALVES_WINDOW`,
#: and in one over the whole run below: many small products cost more than one that
#: multiplies zeros (the thresholds were the fastest on the benchmark's boxes)
BAND_WINDOW = 6
HALVES_WINDOW = 3.5
#: read in place, a box whose row windows average this many rows is reduced along its
#: rows first (one product per channel), else along its columns first (one product per
#: row over all channels)
ROWS_FIRST_WINDOW = 4
#: read in place, a box whose samples read rows (each bin's two per sample, counted with
#: repeats) at most this share of its run's rows copies only those rows and weighs
#: each bin's own (a fixed sampling ratio on a tall box: most of the run is never read)
SAMPLE_ROWS_SHARE = 1.0


@dataclass(frozen=True)
class _AxisWeights:
    """Every box's bin-summed interpolation weights along one axis (the average's ``A``).

    Box ``k``'s valid samples touch pixels in ``first[k] .. first[k] + span[k] - 1``
    (``span[k] == 0``: none). Its ``(P, span)`` matrix (row ``p``: the summed weights of
    bin ``p``'s samples on each of these pixels) and which of the pixels are touched are
    stored one box after another, so large boxes cost no padding of small ones.

    Attributes
    ----------
    n_bins : int
        ``P``.
    first, span : list of int, length K
    at : list of int, length K + 1
        Box ``k``'s pixels are entries ``at[k] .. at[k + 1] - 1`` of :attr:`touched`, its
        matrix entries ``P * at[k] ..`` of :attr:`weights` (row-major).
    weights : ndarray, shape (P * sum(span),)
    touched : ndarray of bool, shape (sum(span),), or None
        The pixels some valid sample reads (the others weigh 0 in every bin); None when
        not asked for (then :meth:`block` reads whole runs only).
    runs : list of bool, length K, or None
        Read box ``k``'s pixels as one run (:data:`SPAN_SLACK`).
    low, high : list of K lists of P ints
        Bin ``p`` of box ``k`` reads pixels ``first + low[k][p] .. first + high[k][p] - 1``
        (``low == high``: no valid sample).
    window : list of float, length K
        The mean ``high - low`` of box ``k``'s bins that have valid samples.
    pairs : list of ``(boxes, index, weights)``, or None
        The boxes' samples (:meth:`pair`), a grid size at a time, for the grid sizes with
        a box whose samples read fewer rows than its run (:data:`SAMPLE_ROWS_SHARE`);
        None when not asked for.
    """

    n_bins: int
    first: list
    span: list
    at: list
    weights: np.ndarray
    touched: np.ndarray
    runs: list
    low: list
    high: list
    window: list
    pairs: list = None

    def pair(self, k: int):
        """Box ``k``'s samples one bin after another, each as its two pixels: ``index``
        ``(P * 2g,)`` (on the map) and ``weights`` ``(P, 1, 2g)`` (divided like
        :attr:`weights`; 0 for a sample off the map); None for a box without samples."""
        for boxes, index, weights in self.pairs:
            row = np.searchsorted(boxes, k)
            if row < boxes.size and boxes[row] == k:
                return index[row], weights[row]
        return None

    def block(self, k: int, run: bool = False):
        """Box ``k``'s pixels (a slice, or the touched ones' sorted indices) and its
        ``(P, R)`` matrix; ``run``: always the whole run."""
        first, span, at, n_bins = self.first[k], self.span[k], self.at[k], self.n_bins
        matrix = self.weights[at * n_bins : (at + span) * n_bins].reshape(n_bins, span)
        if run or self.runs is None or self.runs[k]:
            return slice(first, first + span), matrix
        touched = self.touched[at : at + span]
        return first + np.flatnonzero(touched), matrix[:, touched]

    def bands(self, k: int, per: int) -> list:
        """Box ``k``'s bins ``per`` at a time: ``(p0, p1, lo, hi)`` for bins ``p0 .. p1 - 1``,
        whose samples read pixels ``lo .. hi - 1`` of the run (``block(k, run=True)``'s
        columns); bins without samples are left out."""
        low, high, bands = self.low[k], self.high[k], []
        if per == 1:
            return [(p, p + 1, lo, hi) for p, (lo, hi) in enumerate(zip(low, high)) if hi > lo]
        if per >= self.n_bins:  # the run starts at the lowest pixel and ends at the highest
            return [(0, self.n_bins, 0, self.span[k])] if self.span[k] else []
        for p0 in range(0, self.n_bins, per):
            p1 = min(p0 + per, self.n_bins)
            read = [(lo, hi) for lo, hi in zip(low[p0:p1], high[p0:p1]) if hi > lo]
            if read:
                bands.append((p0, p1, min(lo for lo, _ in read), max(hi for _, hi in read)))
        return bands


def _axis_weights(
    start, bin_size, grid, n_bins: int, size: int, dtype, divisor=None, touched=True, pairs=False
):
    """:class:`_AxisWeights` from :func:`roilib.geometry.roi_align_boxes`' fields of one axis
    (``(K,)`` arrays); ``divisor`` ``(K,)`` divides each box's weights (the average's
    sample count); ``touched``: also find the touched pixels (for gathering them);
    ``pairs``: also keep the boxes' samples (:attr:`_AxisWeights.pairs`).

    The samples come from :func:`roilib.geometry.axis_samples`, called once per grid
    size; the weights of each bin's samples are summed in float64 by one ``bincount``
    over all boxes, then rounded to ``dtype``.
    """
    k_boxes = start.shape[0]
    bin_low = np.full((k_boxes, n_bins), size, dtype=np.int64)  # each bin's window, on the map
    bin_high = np.zeros((k_boxes, n_bins), dtype=np.int64)
    # every valid sample of every box, a grid size at a time: its box, its bin, its two
    # pixels and their weights
    fields = [[np.zeros(0, dtype=np.int64)] * 4 + [np.zeros(0, dtype=dtype)] * 2]
    per_grid = [] if pairs else None
    for g in np.unique(grid[grid > 0]).tolist():
        idx = np.flatnonzero(grid == g)
        s = axis_samples(start[idx], bin_size[idx], g, n_bins, size, dtype)
        if pairs:
            per_grid.append((g, idx, s))
        valid, n = s.valid, n_bins * g
        if valid.all():  # the common case, without masks
            low, high = s.low, s.high
            box, bins = np.repeat(idx, n), np.tile(np.arange(n) // g, idx.size)
            fields.append([box, bins, low.ravel(), high.ravel(), s.w_low.ravel(), s.w_high.ravel()])
        else:
            low, high = np.where(valid, s.low, size), np.where(valid, s.high, -1)
            box = np.broadcast_to(idx[:, None], valid.shape)[valid]
            bins = np.broadcast_to(np.arange(n) // g, valid.shape)[valid]
            fields.append([box, bins, s.low[valid], s.high[valid], s.w_low[valid], s.w_high[valid]])
        bin_low[idx] = low.reshape(-1, n_bins, g).min(axis=2)
        bin_high[idx] = high.reshape(-1, n_bins, g).max(axis=2) + 1
    box, bins, low, high, w_low, w_high = (np.concatenate(f) for f in zip(*fields))
    first = bin_low.min(axis=1)
    span = np.maximum(bin_high.max(axis=1) - first, 0)
    first = np.where(span > 0, first, 0)
    at = np.concatenate([[0], np.cumsum(span)])  # box k's pixels: at[k] .. at[k + 1] - 1
    total = int(at[-1])
    # entry (p, t) of box k's matrix sits at n_bins * at[k] + p * span[k] + t
    row = n_bins * at[box] + bins * span[box]
    low, high = low - first[box], high - first[box]
    index = np.concatenate([row + low, row + high])
    weights = np.bincount(index, np.concatenate([w_low, w_high]), minlength=n_bins * total)
    weights = weights.astype(np.float64, copy=False)  # (an empty bincount is int)
    if divisor is not None:
        weights /= np.repeat(np.asarray(divisor, dtype=np.float64), n_bins * span)
    if pairs:  # only the grid sizes whose boxes may be read by their samples' rows
        per_grid = [
            _pairs(idx, s, n_bins, divisor, dtype)
            for g, idx, s in per_grid
            if (2 * g * n_bins <= SAMPLE_ROWS_SHARE * span[idx]).any()
        ]
    hit, runs = None, None
    if touched:
        hit = np.zeros(total, dtype=bool)
        hit[at[box] + low] = True
        hit[at[box] + high] = True
        seen = np.concatenate([[0], np.cumsum(hit)])
        runs = (span <= SPAN_SLACK * (seen[at[1:]] - seen[at[:-1]])).tolist()
    width = np.maximum(bin_high - bin_low, 0)  # 0: a bin without valid samples
    window = width.sum(axis=1) / np.maximum((width > 0).sum(axis=1), 1)
    bin_low = np.where(width > 0, bin_low - first[:, None], 0)
    bin_high = bin_low + width
    return _AxisWeights(
        n_bins, first.tolist(), span.tolist(), at.tolist(), weights.astype(dtype), hit, runs,
        bin_low.tolist(), bin_high.tolist(), window.tolist(), per_grid,
    )


def _pairs(idx, s, n_bins: int, divisor, dtype):
    """The samples ``s`` of boxes ``idx`` (sorted; :func:`roilib.geometry.axis_samples`)
    as an entry of :attr:`_AxisWeights.pairs`; the weights are divided in float64, then
    rounded to ``dtype`` (like :func:`_axis_weights`)."""
    shape = s.low.shape + (2,)  # (boxes, samples, low/high)
    index, weights = np.empty(shape, dtype=np.int64), np.empty(shape, dtype=np.float64)
    index[..., 0], index[..., 1] = s.low, s.high
    weights[..., 0], weights[..., 1] = s.w_low, s.w_high
    if divisor is not None:
        weights /= np.asarray(divisor, dtype=np.float64)[idx, None, None]
    return idx, index.reshape(idx.size, -1), weights.reshape(idx.size, n_bins, 1, -1).astype(dtype)


class _Averages:
    """The average's matrices of every box: ``A_y / count`` (:attr:`y`) and ``A_x``
    (:attr:`x`), and the boxes that touch the map (:attr:`live`); ``touched``: also which
    pixels each box touches (to gather only those)."""

    def __init__(
        self, rois, output_size, spatial_scale, sampling_ratio, aligned, height, width, dtype, touched
    ):
        ph, pw = output_size
        geo = roi_align_boxes(rois, output_size, spatial_scale, sampling_ratio, aligned, dtype)
        self.y = _axis_weights(
            geo.start_y, geo.bin_h, geo.grid_h, ph, height, dtype, geo.count, touched, pairs=not touched
        )
        self.x = _axis_weights(geo.start_x, geo.bin_w, geo.grid_w, pw, width, dtype, None, touched)
        self.images = rois[:, 0].astype(np.int64).tolist()
        self.grid_h = geo.grid_h.tolist()  # samples per bin along y
        self.live = [k for k in range(rois.shape[0]) if self.y.span[k] and self.x.span[k]]


def _in(block: np.ndarray, dtype) -> np.ndarray:
    """``block`` as BLAS can read it: in the compute dtype (a float16 map is converted a
    block at a time) and with contiguous rows (a map that is a strided view is copied a
    block at a time; NumPy would otherwise multiply without BLAS)."""
    if block.dtype == dtype and block.strides[-1] == block.itemsize:
        return block
    return np.ascontiguousarray(block, dtype=dtype)


def _bins_per_product(window: float, n_bins: int) -> int:
    """How many bins to multiply at once, for bins reading ``window`` pixels on average
    (:data:`BAND_WINDOW`)."""
    if window >= BAND_WINDOW:
        return 1
    return (n_bins + 1) // 2 if window >= HALVES_WINDOW else n_bins


def _average_in_place(x: np.ndarray, boxes: _Averages, out: np.ndarray, dest) -> None:
    """Each box's average from its block of the ``(N, C, H, W)`` map, read where it is.

    A box whose samples read fewer rows than its run (:data:`SAMPLE_ROWS_SHARE`) copies
    those rows only (:func:`_sample_rows_first`). Otherwise rows and columns are read as
    runs (views of the map). The first product reduces the rows (``(p, R) @ (R, S)`` per
    channel) or the columns (``(q, S) @ (S, C)`` per row), :data:`ROWS_FIRST_WINDOW`
    decides, over the windows of ``p`` (or ``q``) bins at a time (:data:`BAND_WINDOW`);
    one product over the whole run then reduces the other axis.
    """
    for k in boxes.live:
        rows, ay = boxes.y.block(k, run=True)
        cols, ax = boxes.x.block(k, run=True)
        plane, target = x[boxes.images[k]], out[dest[k]]
        if 2 * boxes.grid_h[k] * ay.shape[0] <= SAMPLE_ROWS_SHARE * ay.shape[1]:
            _sample_rows_first(plane, *boxes.y.pair(k), cols, ax, target)
        elif boxes.y.window[k] >= ROWS_FIRST_WINDOW:
            bands = boxes.y.bands(k, _bins_per_product(boxes.y.window[k], ay.shape[0]))
            _rows_first(plane, rows, cols, ay, ax, bands, target)
        else:
            bands = boxes.x.bands(k, _bins_per_product(boxes.x.window[k], ax.shape[0]))
            _columns_first(plane, rows, cols, ay, ax, bands, target)


def _rows_first(plane, rows: slice, cols: slice, ay, ax, bands, target) -> None:
    """``target`` ``(C, PH, PW)`` ``= ay X ax^T`` per channel of ``X = plane[:, rows, cols]``,
    ``ay`` applied a band of bins at a time (see :meth:`_AxisWeights.bands`)."""
    dtype, c, s = target.dtype, plane.shape[0], cols.stop - cols.start
    u = np.zeros((c, ay.shape[0], s), dtype=dtype)  # a bin without samples stays 0
    for p0, p1, lo, hi in bands:
        block = _in(plane[:, rows.start + lo : rows.start + hi, cols], dtype)  # (C, hi - lo, S)
        np.matmul(ay[p0:p1, lo:hi], block, out=u[:, p0:p1])
    np.matmul(u.reshape(-1, s), ax.T, out=target.reshape(-1, target.shape[-1]))


def _sample_rows_first(plane, index, weights, cols: slice, ax, target) -> None:
    """``target`` ``(C, PH, PW)`` from a copy of only the rows the samples read.

    ``index`` ``(PH * n,)`` and ``weights`` ``(PH, 1, n)``: :attr:`_AxisWeights.pairs`.
    Each bin's ``n`` rows (a row twice where samples share it) are weighted and summed in
    one product per bin, then one product per bin reduces the columns by ``ax``.
    """
    dtype = target.dtype
    block = plane.transpose(1, 0, 2)[index, :, cols]  # (PH * n, C, S), a copy
    if block.dtype != dtype:
        block = block.astype(dtype)
    ph, _, n = weights.shape
    c, s = block.shape[1:]
    u = np.matmul(weights, block.reshape(ph, n, c * s))  # (PH, 1, C * S)
    np.matmul(u.reshape(ph, c, s), ax.T, out=target.transpose(1, 0, 2))


def _columns_first(plane, rows: slice, cols: slice, ay, ax, bands, target) -> None:
    """As :func:`_rows_first`, ``ax`` applied first (a band of bins at a time), per row."""
    dtype, c, r = target.dtype, plane.shape[0], rows.stop - rows.start
    u = np.zeros((r, ax.shape[0], c), dtype=dtype)
    for q0, q1, lo, hi in bands:
        block = _in(plane[:, rows, cols.start + lo : cols.start + hi], dtype)  # (C, R, hi - lo)
        np.matmul(ax[q0:q1, lo:hi], block.transpose(1, 2, 0), out=u[:, q0:q1])
    t = ay @ u.reshape(r, -1)  # (PH, PW * C)
    target[...] = t.reshape(t.shape[0], ax.shape[0], c).transpose(2, 0, 1)


def _average_grouped(x: np.ndarray, boxes: _Averages, out: np.ndarray, dest) -> None:
    """Each box's average from channels-last copies of one channel group at a time
    (:func:`._layout.channel_groups`); a box's matrices serve every group."""
    plan = [(dest[k], boxes.images[k]) + boxes.y.block(k) + boxes.x.block(k) for k in boxes.live]
    for c0, hwc in channel_groups(x):
        _average_group(hwc, c0, plan, out)
        del hwc  # else it lives on while the next group's copy is made


def _average_group(hwc: np.ndarray, c0: int, plan, out: np.ndarray) -> None:
    """Channels ``c0 ..`` of every box in ``plan`` from their channels-last copy ``hwc``
    ``(N, H, W, G)``: ``A_y`` over the block's rows, then ``A_x`` over its columns, the
    second product written straight into ``out``."""
    g = hwc.shape[-1]
    for d, image, rows, ay, cols, ax in plan:
        block = take_block(hwc[image], rows, cols)  # (R, S, G)
        r, s = block.shape[:2]
        u = ay @ block.reshape(r, s * g)  # (PH, S * G)
        target = out[d, c0 : c0 + g].transpose(1, 0, 2)  # (PH, G, PW)
        np.matmul(u.reshape(-1, s, g).transpose(0, 2, 1), ax.T, out=target)


def _average_into(out, dest, input, rois, output_size, spatial_scale, sampling_ratio, aligned) -> None:
    """The average of box ``k`` of ``rois`` on ``input`` ``(N, C, H, W)``, written into
    ``out[dest[k]]`` (``out``: ``(K', C, PH, PW)`` in the compute dtype, zeros where no
    sample touches the map; ``dest``: a sequence of ints)."""
    h, w = input.shape[2:]
    grouped = reads_in_groups(cells_read(rois, spatial_scale, h, w), input.shape)
    boxes = _Averages(rois, output_size, spatial_scale, sampling_ratio, aligned, h, w, out.dtype, grouped)
    (_average_grouped if grouped else _average_in_place)(input, boxes, out, dest)


def _max_blocks(x: MapBlocks, rois, output_size, spatial_scale, sampling_ratio, aligned, out):
    """``max`` mode read from ``x``'s blocks, written into ``out`` (``(K, C, PH, PW)``) box by
    box, so no channels-last copy of the whole output is made."""
    h, w = x.shape[2:]
    boxes = _sampled(h, w, x.dtype, rois, output_size, spatial_scale, sampling_ratio, aligned)
    for k, image, box, _ in boxes:
        win, per_bin = box.winners(box.samples(x.take(image, box.rows, box.cols)))
        out[k] = np.take_along_axis(per_bin, win[..., None], axis=-1)[..., 0].transpose(2, 0, 1)
    return out


def _backward_blocks(g, x, grad: GradBlocks, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    """Add the input gradient into ``grad``; ``g`` is channels-last, ``x`` (a
    :class:`MapBlocks`) is read only in ``max`` mode (``avg`` is linear)."""
    _, _, h, w = grad.shape
    for k, image, box, _ in _sampled(h, w, grad.dtype, rois, output_size, spatial_scale, sampling_ratio, aligned):
        if mode == "avg":
            part = box.samples_adjoint(g[k] / box.count, box.bin_sum(box.by, 0), box.bin_sum(box.bx, 1))
        else:
            win, _ = box.winners(box.samples(x.take(image, box.rows, box.cols)))
            part = box.samples_adjoint(box.winner_mask(g[k], win))
        grad.add(image, box.rows, box.cols, part)
    return grad


def _backward(g, x_hwc, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    """Input gradient on a channels-last map ``(N, H, W, C)``, channels-last."""
    x = MapBlocks.of_channels_last(x_hwc)
    grad = GradBlocks.channels_last_like(x_hwc)
    _backward_blocks(g, x, grad, rois, output_size, spatial_scale, sampling_ratio, aligned, mode)
    return grad.grad


def roi_align(
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
) -> np.ndarray:
    """RoIAlign forward (torchvision semantics; ``mode="max"`` as in mmcv).

    Parameters
    ----------
    input : ndarray, shape (N, C, H, W)
        Feature map, float16/32/64 (float16 is computed in float32).
    rois : ndarray (K, 5) or list of (K_i, 4) arrays
        Boxes ``[batch_index, x1, y1, x2, y2]`` in image pixels.
    output_size : int or (int, int)
        ``(PH, PW)``.
    spatial_scale : float
        Feature-map pixels per image pixel (``1 / stride``).
    sampling_ratio : int
        Bilinear samples per bin and axis; ``<= 0`` uses ``ceil(roi_size / output_size)``.
    aligned : bool
        Shift the box by -0.5 feature pixel so that pixel ``i``'s value sits at ``i + 0.5``.
    mode : {"avg", "max"}
        Average the samples of a bin, or take their max.

    Returns
    -------
    ndarray, shape (K, C, PH, PW)
    """
    rois, output_size, spatial_scale, sampling_ratio, aligned, mode = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
    )
    shape = (rois.shape[0], input.shape[1]) + output_size
    if mode == "max":
        x = MapBlocks(input, cells_read(rois, spatial_scale, *input.shape[2:]))
        out = np.zeros(shape, dtype=input.dtype)
        return _max_blocks(x, rois, output_size, spatial_scale, sampling_ratio, aligned, out)
    out = np.zeros(shape, dtype=v.compute_dtype(input.dtype))
    _average_into(out, range(rois.shape[0]), input, rois, output_size, spatial_scale, sampling_ratio, aligned)
    return out.astype(input.dtype, copy=False)


def roi_align_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
) -> np.ndarray:
    """Gradient of :func:`roi_align` with respect to ``input``.

    ``avg``: each output's gradient, divided by the sample count, is spread over the
    four corners of every sample with its bilinear weights (the transpose of the
    forward). ``max``: only the winning sample's corners receive it.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
        As in :func:`roi_align`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale, sampling_ratio, aligned, mode = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
    )
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    g = channels_last(grad_output)
    cells = cells_read(rois, spatial_scale, *input.shape[2:])
    grad = GradBlocks(input.shape, input.dtype, cells)
    x = MapBlocks(input, cells) if mode == "max" else None  # avg never reads the map
    _backward_blocks(g, x, grad, rois, output_size, spatial_scale, sampling_ratio, aligned, mode)
    return grad.result(input.dtype)


def roi_align_rois_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
) -> np.ndarray:
    """Gradient of :func:`roi_align` with respect to the box coordinates.

    Every sample position is an affine function of the box:
    ``y = y1*s - off + (p + (i + 0.5)/g) * (y2 - y1)*s / P``, and the bilinear value
    changes with ``y`` at rate ``(1 - lx)(X[yh, xl] - X[yl, xl]) + lx (X[yh, xh] - X[yl, xh])``.
    The chain rule through both gives the result.

    Where it is not differentiable the result is the one-sided derivative of the
    formula as evaluated: the adaptive grid ``ceil(roi_h / PH)`` and the
    ``max(roi_h, 1)`` clamp (``aligned=False``) are piecewise constant in the box and
    their jumps are ignored; a sample exactly on a whole-number coordinate (a pixel's
    own position, where the interpolant has a kink) gets the right-hand derivative; a
    sample clamped at the map's edge (``y <= 0`` or at/beyond the last pixel) or out of
    range (``y < -1`` or ``y > H``) contributes 0; in ``max`` mode only the winning
    sample moves, and a change of winner is a jump.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
        As in :func:`roi_align`.

    Returns
    -------
    ndarray, shape (K, 5)
        ``d loss / d [batch_index, x1, y1, x2, y2]`` (the batch column is 0), in the
        input's dtype, in image-pixel units.
    """
    rois, output_size, spatial_scale, sampling_ratio, aligned, mode = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
    )
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    x = MapBlocks(input, cells_read(rois, spatial_scale, *input.shape[2:]))
    g = channels_last(grad_output)
    grad = np.zeros((rois.shape[0], 5), dtype=x.dtype)
    h, w = input.shape[2:]
    boxes = _sampled(h, w, x.dtype, rois, output_size, spatial_scale, sampling_ratio, aligned, slopes=True)
    for k, image, box, geo in boxes:
        block = np.ascontiguousarray(x.take(image, box.rows, box.cols))
        if mode == "avg":
            ay, ax = box.bin_sum(box.by, 0), box.bin_sum(box.bx, 1)
            gk = g[k] / box.count
            along_x = ax @ block  # (rows, PW, C)
            along_y = (ay @ block.reshape(block.shape[0], -1)).reshape(ay.shape[0], block.shape[1], -1)
            # weight of each touched row/column against each output bin
            per_row = np.tensordot(along_x, gk, axes=([1, 2], [1, 2]))  # (rows, PH)
            per_col = np.tensordot(along_y, gk, axes=([0, 2], [0, 2]))  # (cols, PW)
            bin_y = np.arange(box.dy.shape[0]) // max(box.ys.grid, 1)
            bin_x = np.arange(box.dx.shape[0]) // max(box.xs.grid, 1)
            dy = (box.dy * per_row.T[bin_y]).sum(axis=1)
            dx = (box.dx * per_col.T[bin_x]).sum(axis=1)
        else:
            win, _ = box.winners(box.samples(block))
            weights = box.winner_mask(g[k], win)  # (PH*gh, PW*gw, C)
            dy = (box.samples(block, row_matrix=box.dy) * weights).sum(axis=(1, 2))
            dx = (box.samples(block, col_matrix=box.dx) * weights).sum(axis=(0, 2))
        y_lo, y_hi = box.coord_derivatives(geo, k, spatial_scale, 0)
        x_lo, x_hi = box.coord_derivatives(geo, k, spatial_scale, 1)
        grad[k, 1:] = [dx @ x_lo, dy @ y_lo, dx @ x_hi, dy @ y_hi]
    return grad.astype(input.dtype)
