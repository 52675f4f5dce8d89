"""RoIWarp: the RoI warping layer of MNC (Dai, He and Sun, 2016), forward and backward.

The layer as MNC's own Caffe code defines it (``daijifeng001/caffe-mnc``,
``src/caffe/layers/roi_warping_layer.cu``; rules in :func:`roilib.geometry.warp_axis`):

* box corners scaled and C-rounded, like RoIPool, but no ``+ 1`` on the width;
* in every bin, bilinear samples from the bin's start to its end *inclusive*, in steps
  of ``1 / ceil(roi / P)``;
* a sample beyond half a cell outside the map (``y < -0.5`` or ``y > H - 0.5``) is
  skipped, not read as 0; inside, the reading follows RoIAlign's clamp rule;
* the output is the largest sample (a sample must beat ``-FLT_MAX``), 0 when none.

The input gradient flows through the winning sample's four corners. MNC also
differentiates the output with respect to the box; the rounding has derivative 0
almost everywhere, so, like MNC, :func:`roi_warp_rois_backward` treats it as the
identity and differentiates the warp in its (rounded) corners.

Every value is computed in the order the kernels (``roilib/cuda/kernels/roi_warp.cu``)
compute it, so their CPU build agrees with this module bit for bit in the forward pass.

How the forward and the input gradient are evaluated
----------------------------------------------------
The layer's value at a sample is ``w1 v1 + w2 v2 + w3 v3 + w4 v4`` with the products and
sums rounded in that order, so it cannot be split into a row pass and a column pass
(RoIAlign's ``A_y X A_x^T``) without changing the last bits. What is separable is the
*sampling*: the samples of a box are the product of its row positions and its column
positions, and with ``g = 2`` (or any ``g`` whose steps add up to exactly 1) the last
sample of a bin is the first of the next, so a box has ``(P g + 1)^2`` distinct samples
instead of ``P^2 (g + 1)^2``. They are stored grouped by their place in a bin (with
``g = 2``, the bins' first samples, then their middle ones), so that each tap of the bins
reads one contiguous block of values. Boxes sharing their step counts are evaluated
together, a group of channels at a time (no channels-last copy of the whole map at once):

1. the map cells the corners read are made channels-last: the whole map's (a plain
   transpose) when the boxes read most of it, else only those cells, gathered;
2. for a block of boxes, the four corners of every distinct sample are gathered from
   them (``np.take`` of whole channel vectors), weighed and added, all the pass's
   channels at once; a sample outside the map is NaN (its first weight is);
3. each bin's maximum is taken over its samples, columns first, then rows (``np.fmax``
   skips the NaN samples, as the layer's ``>`` does);
4. the backward finds each bin's winner, its first sample equal to the maximum in the
   layer's row-major order, and adds ``g w`` to the winner's corners with one
   ``np.add.at`` per block (into a channels-last gradient of the cells, or with few
   cells into the result), in box, bin and corner order: every pixel receives its adds
   in the order the kernel's loop makes them, so the sums agree bit for bit.

The box gradient (:func:`roi_warp_rois_backward`) still evaluates one box at a time.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import numpy as np

from .. import _validate as v
from .._validate import compute_dtype
from ..geometry import WARP_FLOOR, WarpAxis, quantize_boxes, warp_axis, warp_bins, warp_steps
from ._layout import block as view_index, channels_first, channels_last
from ._pooling import _first_hit


class _Taps(NamedTuple):
    """One axis of the bilinear reads of a set of samples (arrays of equal shape)."""

    inside: np.ndarray  # the sample is read at all (within half a cell of the map)
    moving: np.ndarray  # the value follows the coordinate (not clamped at an edge)
    lo: np.ndarray
    hi: np.ndarray
    wlo: np.ndarray
    whi: np.ndarray


def _taps(coord: np.ndarray, size: int, present: np.ndarray) -> _Taps:
    """MNC's 1-D bilinear rule for the samples ``coord`` on an axis of ``size`` cells."""
    t = coord.dtype.type
    inside = present & ~((coord < t(-0.5)) | (coord > t(size) - t(0.5)))
    c = np.where(inside & (coord > t(0)), coord, t(0))  # y <= 0 reads row 0
    lo = c.astype(np.int64)  # c >= 0: truncation is floor
    at_end = lo >= size - 1
    lo = np.where(at_end, size - 1, lo)
    hi = np.where(at_end, size - 1, lo + 1)
    c = np.where(at_end, lo.astype(coord.dtype), c)
    whi = c - lo.astype(coord.dtype)
    wlo = t(1) - whi
    moving = inside & (coord > t(0)) & ~at_end
    return _Taps(inside, moving, lo, hi, wlo, whi)


# -- the forward and the input gradient, many boxes at a time ------------------------

#: elements (boxes x distinct samples x channels) of a block of sample values: the block
#: and its scratch twin stay in the L2 cache while the four corners are weighed and added
_BLOCK_ELEMENTS = 1 << 17
#: the forward gathers the map's cells for this many bytes' worth of channels at a time:
#: at most this fraction of the output's size (memory stays a small multiple of the
#: output's, the peak RSS the benchmark compares), and at least _MIN_SOURCE_BYTES
_SOURCE_FRACTION = 0.25
_MIN_SOURCE_BYTES = 3 << 19
#: each of the forward's two block buffers holds at most this fraction of the output's
#: number of values (and at least 2**14)
_BLOCK_FRACTION = 0.5
#: the backward's channels per pass: the cells' gradient of one pass takes about this
#: many bytes, so that ``np.add.at``'s scattered adds mostly hit the cache
_GRAD_PASS_BYTES = 8 << 20
#: when the boxes read more than this fraction of the map's cells, each channel pass
#: copies the whole map channels-last (a plain transpose) instead of gathering the cells
_DENSE_CELLS = 0.5
#: boxes per ``np.add.at`` call of the backward when boxes of several step counts mix
_GRAD_BOXES = 256
#: bins with at most this many samples find their winner sample by sample; more, with
#: reductions over a gathered (bin, sample) array
_TAP_LOOP = 16


class _AxisGrid(NamedTuple):
    """One axis of boxes that share a step count ``g``: the distinct sample positions of
    each box, the bilinear reads there (``(K, U)`` each), and each bin's samples."""

    taps: np.ndarray  # (P, g + 1): slot of sample j of bin p among the positions (absent: sample 0's)
    picks: tuple  # taps[:, j] for each j, as a slice where it is evenly spaced (a view, not a copy)
    read: np.ndarray  # (K, U) bool: within half a cell of the map
    lo: np.ndarray  # (K, U) int64
    hi: np.ndarray
    wlo: np.ndarray  # (K, U) in the arithmetic dtype
    whi: np.ndarray


def _evenly(index: np.ndarray):
    """``index`` (1-D, increasing) as a slice when it is evenly spaced, else itself."""
    first = int(index[0])
    if index.size == 1:
        return slice(first, first + 1)
    step = int(index[1] - index[0])
    if step > 0 and (np.diff(index) == step).all():
        return slice(first, int(index[-1]) + 1, step)
    return index


def _tap_order(taps: np.ndarray) -> np.ndarray:
    """The order to store an axis' distinct positions in (their indices, ``(U,)``): every
    tap ``j`` of the bins, ``taps[:, j]``, a run of consecutive slots, so that a bin's
    taps and the ``(P, C)`` values they read are one contiguous block, not ``P`` runs of
    ``C`` (NumPy's loops over a block run several times as fast). That is the positions
    grouped by their remainder modulo the bins' stride ``s`` when ``taps[p, j] = taps[0, j]
    + p s`` (``g = 2``: the even positions, then the odd ones); the given order otherwise.
    The values and every maximum are the same in any order."""
    n_bins = taps.shape[0]
    identity = np.arange(int(taps.max()) + 1)
    if n_bins < 2:
        return identity
    stride = int(taps[1, 0] - taps[0, 0])
    if stride <= 0 or not (np.diff(taps, axis=0) == stride).all():
        return identity
    order = np.argsort(identity % stride, kind="stable")
    rank = np.empty_like(order)
    rank[order] = identity
    return order if (np.diff(rank[taps], axis=0) == 1).all() else identity


def _axis_grid(starts, bin_size, n_bins: int, grid: int, size: int, dtype) -> _AxisGrid:
    """:class:`_AxisGrid` of boxes with corners ``starts`` and bins ``bin_size`` (``(K,)``)."""
    frac, present = warp_steps(n_bins, grid, dtype)
    # sample j of bin p sits at start + f * bin, and f depends on (p, j) only: equal f,
    # equal position (the last sample of a bin and the first of the next, often)
    ordered = frac[present]  # increasing, but for equal neighbours (np.unique would import np.ma)
    positions = ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]
    taps = np.searchsorted(positions, frac)
    # an absent sample repeats the bin's first: it never changes the max, nor the
    # first maximal sample, which comes earlier in the layer's order
    taps = np.where(present, taps, taps[:, :1])
    # stored in an order where each tap of the bins is a run of neighbouring slots
    order = _tap_order(taps)
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    taps, positions = rank[taps], positions[order]
    coord = starts[:, None] + positions * bin_size[:, None]
    r = _taps(coord, size, np.True_)
    picks = tuple(_evenly(taps[:, j]) for j in range(taps.shape[1]))
    return _AxisGrid(taps, picks, r.inside, r.lo, r.hi, r.wlo, r.whi)


class _Group(NamedTuple):
    """Boxes sharing their step counts on both axes, and their distinct samples."""

    boxes: np.ndarray  # (K,) increasing positions in rois
    ys: _AxisGrid
    xs: _AxisGrid
    weights: tuple  # w1..w4, (K, Uy, Ux) each: the bilinear weight of each corner
    first: np.ndarray  # w1, NaN where the sample is not read: the sum is NaN there, no max takes it
    cells: tuple  # the four corners' cells, (K, Uy, Ux) each: map cells, then _cell_space's
    tap_samples: np.ndarray  # (PH, PW, Ty * Tx): sample index uy * Ux + ux of tap j of each bin


def _group(boxes, image, ys: _AxisGrid, xs: _AxisGrid, height: int, width: int) -> _Group:
    wly, why = ys.wlo[:, :, None], ys.whi[:, :, None]
    wlx, whx = xs.wlo[:, None, :], xs.whi[:, None, :]
    # the kernel's weights: (hy * hx), (hy * lx), (ly * hx), (ly * lx)
    weights = (wly * wlx, wly * whx, why * wlx, why * whx)
    # unread samples point at cell (0, 0) or (0, 1) of their image: valid, never used
    row_lo = (image[:, None] * height + ys.lo)[:, :, None] * width
    row_hi = (image[:, None] * height + ys.hi)[:, :, None] * width
    col_lo, col_hi = xs.lo[:, None, :], xs.hi[:, None, :]
    cells = (row_lo + col_lo, row_lo + col_hi, row_hi + col_lo, row_hi + col_hi)
    tap_samples = ys.taps[:, None, :, None] * xs.read.shape[1] + xs.taps[None, :, None, :]
    tap_samples = tap_samples.reshape(ys.taps.shape[0], xs.taps.shape[0], -1)
    first = weights[0]
    if not (ys.read.all() and xs.read.all()):
        first = np.where(ys.read[:, :, None] & xs.read[:, None, :], first, first.dtype.type(np.nan))
    return _Group(boxes, ys, xs, weights, first, cells, tap_samples)


def _groups(rois: np.ndarray, corners: np.ndarray, output_size, sampling_ratio: int, shape, dtype):
    """The boxes as :class:`_Group` s, one per pair of step counts (one when ``g`` is fixed)."""
    _, _, height, width = shape
    ph, pw = output_size
    bin_y, grid_y, _ = warp_bins(corners[:, 1], corners[:, 3], ph, sampling_ratio, dtype)
    bin_x, grid_x, _ = warp_bins(corners[:, 0], corners[:, 2], pw, sampling_ratio, dtype)
    image = rois[:, 0].astype(np.int64)
    groups = []
    for gy, gx in sorted(set(zip(grid_y.tolist(), grid_x.tolist()))):
        boxes = np.flatnonzero((grid_y == gy) & (grid_x == gx))
        ys = _axis_grid(corners[boxes, 1], bin_y[boxes], ph, gy, height, dtype)
        xs = _axis_grid(corners[boxes, 0], bin_x[boxes], pw, gx, width, dtype)
        groups.append(_group(boxes, image[boxes], ys, xs, height, width))
    return groups


def _cell_space(groups, n_cells: int):
    """The map cells (``(image * H + row) * W + col``) any corner reads, increasing, and
    the groups with their corners renumbered as positions among those cells; ``None``
    for every cell of the map (the numbering is then the map's own)."""
    used = np.zeros(n_cells, dtype=bool)
    for group in groups:
        for cells in group.cells:
            used[cells] = True
    if np.count_nonzero(used) > _DENSE_CELLS * n_cells:
        return None, groups
    cells = np.flatnonzero(used)
    # each cell's position, written (and read) only where a corner reads: with few boxes
    # on a large map, a running count over every cell of the map cost more than the rest
    rank = np.empty(n_cells, dtype=np.intp)
    rank[cells] = np.arange(cells.size)
    return cells, [g._replace(cells=tuple(rank[c] for c in g.cells)) for g in groups]


def _n_cells(cells, x: np.ndarray) -> int:
    """How many cells :func:`_map_cells` gathers."""
    n, _, h, w = x.shape
    return n * h * w if cells is None else cells.size


def _map_cells(x: np.ndarray, cells, c0: int, c1: int, dtype, out=None) -> np.ndarray:
    """Channels ``c0:c1`` of the given map cells (``None``: all of them, written into
    ``out`` when given), channels-last ``(M, c1 - c0)`` in ``dtype``."""
    n, c, h, w = x.shape
    if cells is None:
        block = x[:, c0:c1].transpose(0, 2, 3, 1)
        if out is None:
            return np.ascontiguousarray(block, dtype=dtype).reshape(-1, c1 - c0)
        out = out[: n * h * w * (c1 - c0)].reshape(n, h, w, c1 - c0)
        np.copyto(out, block)
        return out.reshape(-1, c1 - c0)
    flat = x.reshape(n, c, h * w)
    if n == 1:
        block = flat[0, c0:c1].T[cells]
    else:
        block = flat[cells // (h * w), c0:c1, cells % (h * w)]
    return block.astype(dtype, copy=False)


def _set_map_cells(grad: np.ndarray, cells, c0: int, c1: int, values: np.ndarray) -> None:
    """``grad``'s channels ``c0:c1`` at the given cells (unique; ``None``: all of them)
    = ``values``, ``(M, c1 - c0)``."""
    n, c, h, w = grad.shape
    if cells is None:
        grad[:, c0:c1] = values.reshape(n, h, w, c1 - c0).transpose(0, 3, 1, 2)
        return
    flat = grad.reshape(n, c, h * w)
    if n == 1:
        flat[0, c0:c1].T[cells] = values
    else:
        flat[cells // (h * w), c0:c1, cells % (h * w)] = values


def _channel_passes(c: int, n_cells: int, budget: int, dtype):
    """Channel ranges ``(c0, c1)`` of at most about ``budget`` bytes of ``n_cells`` cells
    each, in multiples of 16 channels (all of them when they fit)."""
    fit = max(1, budget // max(1, n_cells * np.dtype(dtype).itemsize))
    step = c if fit >= c else max(16, fit - fit % 16)
    return [(c0, min(c, c0 + step)) for c0 in range(0, c, step)]


def _block_size(group: _Group, channels: int, elements: int = _BLOCK_ELEMENTS) -> int:
    """Boxes per block of :func:`_blocks`: about ``elements`` sample values."""
    per_box = group.ys.read.shape[1] * group.xs.read.shape[1] * channels
    return max(1, min(group.boxes.size, elements // per_box))


class _BlockBuffers(NamedTuple):
    """Two flat arrays that hold the largest block of :func:`_blocks` of some groups, for
    channel passes of up to ``channels`` channels and blocks of about ``elements`` values."""

    values: np.ndarray
    scratch: np.ndarray
    elements: int

    @classmethod
    def of(cls, groups, channels: int, dtype, elements: int = _BLOCK_ELEMENTS) -> "_BlockBuffers":
        n = max(_block_capacity(g, channels, elements) * g.ys.read.shape[1] * g.xs.read.shape[1]
                for g in groups)
        return cls(np.empty(n, dtype=dtype), np.empty(n, dtype=dtype), elements)


def _block_capacity(group: _Group, channels: int, elements: int = _BLOCK_ELEMENTS) -> int:
    """An upper bound of boxes x channels in a block of :func:`_blocks` for passes of up
    to ``channels`` channels."""
    return max(elements // (group.ys.read.shape[1] * group.xs.read.shape[1]), channels)


def _blocks(group: _Group, a: int, b: int, channels: int, buffers: _BlockBuffers):
    """Boxes ``a:b`` of ``group`` in blocks: ``(start, stop, values, scratch)``, the last
    two ``(stop - start, Uy, Ux, channels)`` views of ``buffers``, the same memory from
    block to block."""
    size = max(1, min(b - a, _block_size(group, channels, buffers.elements)))
    for start in range(a, b, size):
        stop = min(b, start + size)
        shape = (stop - start, group.ys.read.shape[1], group.xs.read.shape[1], channels)
        n = int(np.prod(shape))
        yield start, stop, buffers.values[:n].reshape(shape), buffers.scratch[:n].reshape(shape)


def _sample_values(src: np.ndarray, group: _Group, a: int, b: int, values, scratch) -> np.ndarray:
    """Every distinct sample of boxes ``a:b``, channels-last ``(K, Uy, Ux, C)``: the corners
    gathered from ``src`` (``(M, C)``), weighed and added left to right as the kernel does;
    NaN where the sample is not read (its first weight is NaN: no maximum takes it)."""
    weights = (group.first,) + group.weights[1:]
    for j, (cells, weight) in enumerate(zip(group.cells, weights)):
        dest = values if j == 0 else scratch
        np.take(src, cells[a:b], axis=0, out=dest, mode="clip")
        dest *= weight[a:b, :, :, None]
        if j:
            values += scratch
    return values


def _pick(a: np.ndarray, axis: int, pick) -> np.ndarray:
    """``a``'s entries ``pick`` (a slice or an index array) along ``axis``."""
    return a[(slice(None),) * axis + (pick,)]


def _tap_max(a: np.ndarray, axis: int, picks) -> np.ndarray:
    """The largest of each bin's taps along ``axis`` (``np.fmax``: NaN is never the max)."""
    if len(picks) == 1:
        return _pick(a, axis, picks[0]).copy()
    best = np.fmax(_pick(a, axis, picks[0]), _pick(a, axis, picks[1]))
    for pick in picks[2:]:
        np.fmax(best, _pick(a, axis, pick), out=best)
    return best


def _bin_max(values: np.ndarray, group: _Group) -> np.ndarray:
    """Each bin's largest sample, ``(K, PH, PW, C)``: over the columns, then the rows."""
    return _tap_max(_tap_max(values, 2, group.xs.picks), 1, group.ys.picks)


def _winning_taps(values: np.ndarray, best: np.ndarray, group: _Group) -> np.ndarray:
    """Each bin's winner: its first sample (in the layer's row-major order) equal to
    ``best``, as ``n - j`` for sample ``j`` of the bin's ``n`` (0 where none is: NaN),
    ``(K, PH, PW, C)``."""
    ny, nx = len(group.ys.picks), len(group.xs.picks)
    n = ny * nx
    if n > _TAP_LOOP:
        return _winning_taps_reduced(values, best, group)
    rank = np.min_scalar_type(n).type
    code = np.zeros(best.shape, dtype=rank)
    hit = np.empty(best.shape, dtype=bool)
    term = np.empty(best.shape, dtype=rank)
    for jy in range(ny):
        rows = _pick(values, 1, group.ys.picks[jy])
        for jx in range(nx):
            np.equal(_pick(rows, 2, group.xs.picks[jx]), best, out=hit)
            # the first hit has the largest n - j
            np.multiply(hit.view(np.uint8), rank(n - jy * nx - jx), out=term)
            np.maximum(code, term, out=code)
    return code


def _winning_taps_reduced(values: np.ndarray, best: np.ndarray, group: _Group) -> np.ndarray:
    """:func:`_winning_taps` for bins of many samples: the first row holding the max,
    and the first sample holding it in that row, from reductions (no NaN hit: the last)."""
    ny, nx = len(group.ys.picks), len(group.xs.picks)
    taps = values[:, group.ys.taps][:, :, :, group.xs.taps]  # (K, PH, ny, PW, nx, C)
    row_best = np.fmax.reduce(taps, axis=4)
    row_arg = _first_hit(taps, row_best, 4)
    win_y = _first_hit(row_best, best, 2)
    win_x = np.take_along_axis(row_arg, win_y[:, :, None], axis=2)[:, :, 0]
    return ny * nx - (win_y * nx + win_x)


def _tap_values(values: np.ndarray, code: np.ndarray, group: _Group) -> np.ndarray:
    """``values`` (``(K, Uy, Ux, C)``) at the samples :func:`_winning_taps` names."""
    k, ph, pw, c = code.shape
    n = group.tap_samples.shape[2]
    entry = np.arange(ph * pw).reshape(ph, pw, 1) * n + np.minimum(n - code.astype(np.intp), n - 1)
    sample = np.take(group.tap_samples.reshape(-1), entry)
    picked = np.take_along_axis(values.reshape(k, -1, c), sample.reshape(k, -1, c), axis=1)
    return picked.reshape(code.shape)


def _outputs(values: np.ndarray, group: _Group) -> np.ndarray:
    """The layer's outputs from the sample values, ``(K, PH, PW, C)``."""
    t = values.dtype.type
    best = _bin_max(values, group)
    zero = best == 0
    if zero.any():  # +0 and -0 tie: the first of them in the layer's order is the output
        best[zero] = _tap_values(values, _winning_taps(values, best, group), group)[zero]
    # a bin whose best does not beat -FLT_MAX (no sample read, or none above it) is 0
    if best.min() > t(WARP_FLOOR):  # (NaN is not)
        return best
    return np.where(best > t(WARP_FLOOR), best, t(0))


def _write(out: np.ndarray, boxes: np.ndarray, c0: int, c1: int, result: np.ndarray) -> None:
    """``out[boxes, c0:c1] = result`` for a channels-last ``(K, PH, PW, C)`` result."""
    rows = view_index(boxes)
    k, ph, pw, c = result.shape
    if isinstance(rows, slice):  # one transposed copy with inner runs of PH * PW
        out[rows, c0:c1].reshape(k, c, ph * pw)[...] = result.reshape(k, ph * pw, c).transpose(0, 2, 1)
    else:
        out[rows, c0:c1] = result.transpose(0, 3, 1, 2)


def _warp(x: np.ndarray, rois: np.ndarray, corners: np.ndarray, output_size, sampling_ratio: int):
    """The layer's output ``(K, C, PH, PW)`` in ``x``'s dtype; ``corners`` ``(K, 4)`` on the map."""
    n, c, h, w = x.shape
    dtype = compute_dtype(x.dtype)
    out = np.zeros((rois.shape[0], c) + tuple(output_size), dtype=x.dtype)
    if out.size == 0:
        return out
    groups = _groups(rois, corners, output_size, sampling_ratio, x.shape, dtype)
    cells, groups = _cell_space(groups, n * h * w)
    budget = max(_MIN_SOURCE_BYTES, int(_SOURCE_FRACTION * out.nbytes))
    passes = _channel_passes(c, _n_cells(cells, x), budget, dtype)
    buffer = np.empty(n * h * w * (passes[0][1] - passes[0][0]), dtype) if cells is None else None
    # blocks (two buffers) of at most _BLOCK_FRACTION of the output's size: a few boxes on
    # a large map stay within a small multiple of the output's memory, as many boxes do
    elements = min(_BLOCK_ELEMENTS, max(1 << 14, int(_BLOCK_FRACTION * out.size)))
    blocks = _BlockBuffers.of(groups, passes[0][1] - passes[0][0], dtype, elements)
    src = None
    for c0, c1 in passes:
        src = None  # one gathered block alive at a time
        src = _map_cells(x, cells, c0, c1, dtype, buffer)
        for group in groups:
            for a, b, values, scratch in _blocks(group, 0, group.boxes.size, c1 - c0, blocks):
                values = _sample_values(src, group, a, b, values, scratch)
                _write(out, group.boxes[a:b], c0, c1, _outputs(values, group))
    return out


class _Lookup(NamedTuple):
    """Per box, bin and sample of the bin, the sample's four corners: their flat positions
    in a channels-last ``(M, channels)`` gradient of the cells (``cell * channels``) and
    their weights, ``(K, PH, PW, n, 4)`` each; ``end`` ``(K, PH, PW, 1)``: the flat entry
    (over ``(K, PH, PW, n)``) one past each bin's."""

    cells: np.ndarray
    weights: np.ndarray
    end: np.ndarray


def _lookup(group: _Group, channels: int = 1) -> _Lookup:
    k = group.boxes.size
    ph, pw, n = group.tap_samples.shape
    taps = group.tap_samples.reshape(-1)
    # the four corners side by side first: one take of whole (4,) rows per sample
    cells = np.take(np.stack([c.reshape(k, -1) for c in group.cells], axis=-1), taps, axis=1)
    if channels != 1:
        cells *= channels
    weights = np.take(np.stack([w.reshape(k, -1) for w in group.weights], axis=-1), taps, axis=1)
    end = (np.arange(1, k * ph * pw + 1, dtype=np.intp) * n).reshape(k, ph, pw, 1)
    return _Lookup(cells.reshape(k, ph, pw, n, 4), weights.reshape(k, ph, pw, n, 4), end)


class _Scratch:
    """Work arrays of the backward's blocks, made once for the largest block of any pass
    (of up to ``channels`` channels)."""

    def __init__(self, groups, output_size, channels: int, dtype):
        n = max(_block_capacity(g, channels) for g in groups) * output_size[0] * output_size[1]
        self.entry = np.empty(n, dtype=np.intp)
        self.adds = (np.empty(4 * n, dtype=np.intp), np.empty(4 * n, dtype=dtype))
        self.blocks = _BlockBuffers.of(groups, channels, dtype)
        self.output_size = tuple(output_size)

    def block(self, k: int, channels: int):
        """The lookup entries of a block of ``k`` boxes, and its adds' two arrays."""
        shape = (k,) + self.output_size + (channels,)
        n = int(np.prod(shape))
        adds = tuple(a[: 4 * n].reshape(shape + (4,)) for a in self.adds)
        return self.entry[:n].reshape(shape), adds


class _GradPass(NamedTuple):
    """One channel pass of the backward: channels ``c0:c1`` of the output gradient ``g``,
    the map's cells gathered for them (``src``), and the flat gradient the adds go to, at
    a lookup's position plus the channel's offset (``lanes``, ``(c1 - c0, 4)``)."""

    g: np.ndarray
    src: np.ndarray
    c0: int
    c1: int
    lanes: np.ndarray
    flat_grad: np.ndarray
    work: _Scratch


def _corner_adds(p: _GradPass, group: _Group, table: _Lookup, block, entry, out) -> None:
    """The four corner adds of each output of a block of boxes: their flat positions and
    ``g w``, into ``out`` (two ``(K, PH, PW, c1 - c0, 4)`` arrays). For each pixel (cell
    and channel) that is the order the kernel adds them in: box, bin (row-major), corner.

    ``block`` is ``(a, b, values, scratch)`` from :func:`_blocks`, ``entry`` a
    ``(K, PH, PW, c1 - c0)`` scratch array."""
    a, b, values, scratch = block
    t = values.dtype.type
    values = _sample_values(p.src, group, a, b, values, scratch)
    best = _bin_max(values, group)
    # the lookup entry of each output's winning sample: one past its bin's, minus (n - j)
    np.subtract(table.end[a:b], _winning_taps(values, best, group), out=entry)
    gk = p.g[view_index(group.boxes[a:b]), p.c0 : p.c1].transpose(0, 2, 3, 1)
    gk = np.ascontiguousarray(gk, dtype=values.dtype)
    if not best.min() > t(WARP_FLOOR):  # an output with no winner routes nothing: + 0 adds
        gk[~(best > t(WARP_FLOOR))] = 0
    index, value = out
    np.take(table.cells.reshape(-1, 4), entry, axis=0, out=index, mode="clip")
    index += p.lanes
    np.take(table.weights.reshape(-1, 4), entry, axis=0, out=value, mode="clip")
    # each output's g times its four weights: looped over the outputs, corner by corner
    # (order="C" on the transposed view), not four values at a time
    corners = value.reshape(-1, 4).T
    np.multiply(corners, gk.reshape(-1), out=corners, order="C")


def _input_gradient(g: np.ndarray, x: np.ndarray, rois, corners, output_size, sampling_ratio) -> np.ndarray:
    """Gradient of :func:`_warp` with respect to ``x``, ``(N, C, H, W)`` in ``x``'s dtype.

    Each output's gradient goes to its winning sample's four corners, ``g w`` each, added
    in the kernel's order for every pixel: box, then bin (row-major), then corner. The
    adds of a block of boxes go to one ``np.add.at`` call, on a channels-last gradient of
    the gathered cells (or, with few cells, on the result itself); boxes of different
    step counts are put back in box order first.
    """
    n, c, h, w = x.shape
    dtype = compute_dtype(x.dtype)
    grad = np.zeros(x.shape, dtype=x.dtype)
    if rois.shape[0] == 0 or grad.size == 0:
        return grad
    on_map = _groups(rois, corners, output_size, sampling_ratio, x.shape, dtype)
    cells, groups = _cell_space(on_map, n * h * w)
    n_cells = _n_cells(cells, x)
    passes = _channel_passes(c, n_cells, _GRAD_PASS_BYTES, dtype)
    work = _Scratch(groups, output_size, passes[0][1] - passes[0][0], dtype)
    if cells is not None and grad.dtype == dtype:
        # few cells: the adds go straight into the result (flat (N, C, H, W) positions),
        # cheaper than a cells' gradient scattered into it afterwards
        tables = [_lookup(group) for group in on_map]  # corners as map cells
        tables = [t._replace(cells=t.cells + t.cells // (h * w) * ((c - 1) * h * w)) for t in tables]
        for c0, c1 in passes:
            lanes = np.repeat(np.arange(c0, c1) * (h * w), 4).reshape(-1, 4)
            src = _map_cells(x, cells, c0, c1, dtype)
            _add_all(_GradPass(g, src, c0, c1, lanes, grad.reshape(-1), work), groups, tables)
        return grad
    tables = {}
    # one gathered block and one gradient of the cells (channels-last, as the map's cells:
    # the adds of one bin land close together), their memory reused from pass to pass
    step = passes[0][1] - passes[0][0]
    gathered = np.empty(n_cells * step, dtype=dtype) if cells is None else None
    cell_grad = np.empty(n_cells * step, dtype=dtype)
    for c0, c1 in passes:
        if c1 - c0 not in tables:
            tables = {c1 - c0: [_lookup(group, c1 - c0) for group in groups]}
        lanes = np.repeat(np.arange(c1 - c0), 4).reshape(-1, 4)
        src = _map_cells(x, cells, c0, c1, dtype, gathered)
        pass_grad = cell_grad[: n_cells * (c1 - c0)]
        pass_grad.fill(0)
        _add_all(_GradPass(g, src, c0, c1, lanes, pass_grad, work), groups, tables[c1 - c0])
        _set_map_cells(grad, cells, c0, c1, pass_grad.reshape(n_cells, c1 - c0))
    return grad


def _add_all(p: _GradPass, groups, tables) -> None:
    """Add the gradient through every box, in box order, one ``np.add.at`` per block of
    boxes (one group) or per run of :data:`_GRAD_BOXES` boxes (several groups)."""
    if len(groups) == 1:
        for block in _blocks(groups[0], 0, groups[0].boxes.size, p.c1 - p.c0, p.work.blocks):
            entry, adds = p.work.block(block[1] - block[0], p.c1 - p.c0)
            _corner_adds(p, groups[0], tables[0], block, entry, adds)
            np.add.at(p.flat_grad, adds[0].reshape(-1), adds[1].reshape(-1))
        return
    n_boxes = max(int(group.boxes[-1]) for group in groups) + 1
    shape = (min(n_boxes, _GRAD_BOXES),) + p.work.output_size + (p.c1 - p.c0, 4)
    run_index, run_value = np.empty(shape, dtype=np.intp), np.empty(shape, dtype=p.src.dtype)
    for k0 in range(0, n_boxes, _GRAD_BOXES):
        k1 = min(n_boxes, k0 + _GRAD_BOXES)
        for group, table in zip(groups, tables):
            a, b = np.searchsorted(group.boxes, [k0, k1]).tolist()
            for block in _blocks(group, a, b, p.c1 - p.c0, p.work.blocks):
                entry, adds = p.work.block(block[1] - block[0], p.c1 - p.c0)
                rows = view_index(group.boxes[block[0] : block[1]] - k0)
                if isinstance(rows, slice):  # straight into the run
                    adds = (run_index[rows], run_value[rows])
                _corner_adds(p, group, table, block, entry, adds)
                if not isinstance(rows, slice):
                    run_index[rows], run_value[rows] = adds
        np.add.at(p.flat_grad, run_index[: k1 - k0].reshape(-1), run_value[: k1 - k0].reshape(-1))


# -- one box at a time: the box gradient ---------------------------------------------


class _Box(NamedTuple):
    """Everything one box needs: its axes, their taps and the winning samples."""

    k: int
    image: int
    ys: WarpAxis
    xs: WarpAxis
    ty: _Taps
    tx: _Taps
    corners: Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # v1..v4, (PH, ny, PW, nx, C)
    win_y: np.ndarray  # (PH, PW, C) winning sample's row index within its bin, -1: none
    win_x: np.ndarray
    out: np.ndarray  # (PH, PW, C)


def _boxes(x: np.ndarray, rois: np.ndarray, corners: np.ndarray, output_size, sampling_ratio):
    """Evaluate every box, one at a time, on the channels-last map ``x`` (``(N, H, W, C)``);
    ``corners`` are ``(K, 4)`` ``[x1, y1, x2, y2]`` on the map (rounded by the public
    functions). Yields a :class:`_Box` per box. The box gradient's path; :func:`_warp`
    is the forward's."""
    _, height, width, channels = x.shape
    ph, pw = output_size
    dtype = x.dtype
    t = dtype.type
    for k in range(rois.shape[0]):
        image = int(rois[k, 0])
        x1, y1, x2, y2 = corners[k]
        ys = warp_axis(y1, y2, ph, sampling_ratio, dtype)
        xs = warp_axis(x1, x2, pw, sampling_ratio, dtype)
        ty = _taps(ys.coord, height, ys.present)
        tx = _taps(xs.coord, width, xs.present)
        # the four corners of every sample, (PH, ny, PW, nx, C) each: np.take of flat
        # pixel indices gathers whole channel vectors faster than two index arrays;
        # samples that are not read point at valid pixels, their values never used
        plane = x[image].reshape(height * width, channels)
        rows_lo, rows_hi = ty.lo[:, :, None, None] * width, ty.hi[:, :, None, None] * width
        cols_lo, cols_hi = tx.lo[None, None], tx.hi[None, None]
        v1, v2 = np.take(plane, rows_lo + cols_lo, axis=0), np.take(plane, rows_lo + cols_hi, axis=0)
        v3, v4 = np.take(plane, rows_hi + cols_lo, axis=0), np.take(plane, rows_hi + cols_hi, axis=0)
        wly, why = ty.wlo[:, :, None, None, None], ty.whi[:, :, None, None, None]
        wlx, whx = tx.wlo[None, None, :, :, None], tx.whi[None, None, :, :, None]
        # w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4, left to right, as the kernel adds them
        val = (wly * wlx) * v1
        val += (wly * whx) * v2
        val += (why * wlx) * v3
        val += (why * whx) * v4
        # a sample must be read and beat -FLT_MAX to win: NaN never does (fmax drops it),
        # nor a sample outside the map; a bin whose best is not above -FLT_MAX has none
        np.fmax(val, t(-np.inf), out=val)
        read = ty.inside[:, :, None, None] & tx.inside[None, None]
        if not read.all():
            val[~read] = -np.inf
        best, win_y, win_x = _first_max(val)
        won = best > t(WARP_FLOOR)
        out = np.where(won, best, t(0))
        win_y[~won] = -1
        win_x[~won] = -1
        yield _Box(k, image, ys, xs, ty, tx, (v1, v2, v3, v4), win_y, win_x, out)


def _first_max(val: np.ndarray):
    """The largest sample of each bin and where it is, as a C loop with a strict ``>``
    over the samples in row-major order finds it: the first maximal one.

    ``val`` is ``(PH, ny, PW, nx, C)`` without NaN. Each row of samples is reduced
    across its columns, then the rows: the first row holding the bin's max, and in it
    the first column holding it, is the first maximal sample in row-major order. The
    reductions run over whole ``(PH, PW, C)`` slices, never along a short strided axis.

    Returns
    -------
    best : ndarray (PH, PW, C)
        The winning sample's value (its own sign of zero, too).
    win_y, win_x : ndarray of int64 (PH, PW, C)
    """
    row_best = val.max(axis=3)  # (PH, ny, PW, C)
    row_arg = _first_hit(val, row_best, 3)
    best = row_best.max(axis=1)
    win_y = _first_hit(row_best, best, 1)
    win_x = np.take_along_axis(row_arg, win_y[:, None], axis=1)[:, 0]
    zero = best == 0
    if zero.any():  # max() may return either zero when +0 and -0 tie; the loop keeps the first
        ph, pw, c = best.shape
        p, q, ch = np.nonzero(zero)
        best[zero] = val[p, win_y[zero], q, win_x[zero], ch]
    return best, win_y, win_x


def _winning(box: _Box, field: np.ndarray, axis: int) -> np.ndarray:
    """``field`` (``(P, n)`` of one axis) at each output's winning sample, ``(PH, PW, C)``."""
    ph, pw, _ = box.out.shape
    if axis == 0:
        return field[np.arange(ph)[:, None, None], np.maximum(box.win_y, 0)]
    return field[np.arange(pw)[None, :, None], np.maximum(box.win_x, 0)]


def _check(input, rois, output_size, spatial_scale, sampling_ratio, mode):
    v.check_input(input)
    rois = v.check_rois(rois, input)
    output_size = v.check_output_size(output_size)
    spatial_scale = v.check_spatial_scale(spatial_scale)
    sampling_ratio = v.check_sampling_ratio(sampling_ratio)
    if mode != "max":
        raise ValueError(f"mode must be 'max' for roi_warp (MNC's layer takes the largest sample), got {mode!r}")
    return rois, output_size, spatial_scale, sampling_ratio


def rounded_corners(rois: np.ndarray, spatial_scale: float, dtype) -> np.ndarray:
    """RoIWarp's box: ``c_round([x1, y1, x2, y2] * s)`` in ``dtype``, shape ``(K, 4)``."""
    return quantize_boxes(rois, spatial_scale, dtype)


def roi_warp(
    input: np.ndarray, rois, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1, mode: str = "max"
) -> np.ndarray:
    """RoIWarp forward: MNC's RoI warping layer.

    Parameters
    ----------
    input : ndarray, shape (N, C, H, W)
        Feature map, float16/32/64 (float16 is computed in float32).
    rois : ndarray (K, 5) or list of (K_i, 4) arrays
        Boxes ``[batch_index, x1, y1, x2, y2]`` in image pixels.
    output_size : int or (int, int)
        ``(PH, PW)``; MNC uses 14, followed by a 2x2 max pooling.
    spatial_scale : float
        Feature-map pixels per image pixel (MNC: 1/16).
    sampling_ratio : int
        ``<= 0`` (default): MNC's steps of ``1 / ceil(roi / P)``; ``g > 0``: steps of ``1 / g``.
    mode : {"max"}
        MNC's layer takes the largest sample; no other mode is defined.

    Returns
    -------
    ndarray, shape (K, C, PH, PW)
    """
    rois, output_size, spatial_scale, sampling_ratio = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, mode
    )
    corners = rounded_corners(rois, spatial_scale, compute_dtype(input.dtype))
    return _warp(input, rois, corners, output_size, sampling_ratio)


def roi_warp_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    mode: str = "max",
) -> np.ndarray:
    """Gradient of :func:`roi_warp` with respect to ``input``.

    Each output's gradient goes to the four corners of its winning sample, with that
    sample's bilinear weights; an output with no sample routes nothing.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio, mode
        As in :func:`roi_warp`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale, sampling_ratio = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, mode
    )
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    corners = rounded_corners(rois, spatial_scale, compute_dtype(input.dtype))
    return _input_gradient(grad_output, input, rois, corners, output_size, sampling_ratio)


def _corner_gradient(g: np.ndarray, x: np.ndarray, rois, corners, output_size, sampling_ratio, scale) -> np.ndarray:
    """``d loss / d corners * scale`` for ``(K, 4)`` corners on the map, ``(K, 5)`` result.

    The warp's output is ``v(y, x)`` at the winning sample, whose position is
    ``y = y1 + f (y2 - y1) / PH``: ``dy/dy1 = 1 - f/PH`` and ``dy/dy2 = f/PH`` (or 1 and
    0 for a flat box, whose bins stay at ``y1``). ``dv/dy`` is the bilinear slope,
    ``(1 - lx)(v3 - v1) + lx (v4 - v2)``, 0 where the read is clamped at an edge.
    """
    ph, pw = output_size
    t = x.dtype.type
    s = t(scale)
    grad = np.zeros((rois.shape[0], 5), dtype=x.dtype)
    for box in _boxes(x, rois, corners, output_size, sampling_ratio):
        won = box.win_y >= 0
        v1, v2, v3, v4 = _winning_values(box)
        wly, why = _winning(box, box.ty.wlo, 0), _winning(box, box.ty.whi, 0)
        wlx, whx = _winning(box, box.tx.wlo, 1), _winning(box, box.tx.whi, 1)
        dvdy = np.where(_winning(box, box.ty.moving, 0), wlx * (v3 - v1) + whx * (v4 - v2), t(0))
        dvdx = np.where(_winning(box, box.tx.moving, 1), wly * (v2 - v1) + why * (v4 - v3), t(0))
        fy = _winning(box, box.ys.frac, 0)
        fx = _winning(box, box.xs.frac, 1)
        y_lo, y_hi = _corner_rates(fy, ph, box.ys.flat, s)
        x_lo, x_hi = _corner_rates(fx, pw, box.xs.flat, s)
        gk = np.where(won, g[box.k], t(0))
        # per channel, sums over the bins in row-major order; then over the channels
        terms = np.stack([(gk * dvdx) * x_lo, (gk * dvdy) * y_lo, (gk * dvdx) * x_hi, (gk * dvdy) * y_hi])
        grad[box.k, 1:] = terms.sum(axis=(1, 2)).sum(axis=1)
    return grad


def _winning_values(box: _Box):
    """The four corner values of each output's winning sample, ``(PH, PW, C)`` each."""
    ph, pw, c = box.out.shape
    iy = np.maximum(box.win_y, 0)
    ix = np.maximum(box.win_x, 0)
    p = np.arange(ph)[:, None, None]
    q = np.arange(pw)[None, :, None]
    ch = np.arange(c)[None, None, :]
    return tuple(corner[p, iy, q, ix, ch] for corner in box.corners)


def _corner_rates(f: np.ndarray, n_bins: int, flat: bool, s) -> Tuple[np.ndarray, np.ndarray]:
    """``d position / d (low corner)`` and ``/ d (high corner)``, times the scale."""
    t = f.dtype.type
    if flat:
        return np.full_like(f, s), np.zeros_like(f)
    frac = f / t(n_bins)
    return (t(1) - frac) * s, frac * s


def roi_warp_rois_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    mode: str = "max",
) -> np.ndarray:
    """Gradient of :func:`roi_warp` with respect to the box coordinates.

    The forward rounds the corners, and rounding has derivative 0 almost everywhere;
    like MNC's layer, this treats the rounding as the identity and differentiates the
    warp in its corners: ``d loss / d x1 = s * d loss / d round(s x1)``, and so on.
    MNC's kernel reports the same derivative for the box centre and size
    (``d/dxc = d/dx1 + d/dx2``, ``d/dw = (d/dx2 - d/dx1) / 2``); roilib reports it for the
    corners, like :func:`roilib.roi_align_rois_backward`.

    Where the warp itself is not differentiable the result is one-sided: the step
    count ``ceil(roi / P)`` is piecewise constant and its jumps are ignored; a sample
    on a whole-number coordinate gets the right-hand slope; a sample clamped at the
    map's edge, or skipped outside it, contributes 0; only the winning sample of a bin
    moves, and a change of winner is a jump.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio, mode
        As in :func:`roi_warp`.

    Returns
    -------
    ndarray, shape (K, 5)
        ``d loss / d [batch_index, x1, y1, x2, y2]`` in image-pixel units; the batch
        column is 0.
    """
    rois, output_size, spatial_scale, sampling_ratio = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, mode
    )
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    x = channels_last(input)
    corners = rounded_corners(rois, spatial_scale, x.dtype)
    grad = _corner_gradient(channels_last(grad_output), x, rois, corners, output_size, sampling_ratio, spatial_scale)
    return grad.astype(input.dtype)


def warp_at_corners(input: np.ndarray, rois, corners, output_size, sampling_ratio: int = -1):
    """The warp on given (unrounded) map corners, and its corner gradient function.

    For tests and the book: ``forward()`` and ``corner_gradient(g)`` evaluate the layer
    with ``corners`` (``(K, 4)`` ``[x1, y1, x2, y2]`` on the map) used as they are, so
    finite differences in the corners can check :func:`roi_warp_rois_backward`'s rule.

    Returns
    -------
    forward : callable () -> ndarray (K, C, PH, PW)
    corner_gradient : callable (grad_output) -> ndarray (K, 5), per map pixel
    """
    v.check_input(input)
    rois = v.check_rois(rois, input)
    output_size = v.check_output_size(output_size)
    x = channels_last(input)
    q = np.asarray(corners, dtype=x.dtype).reshape(-1, 4)

    def forward():
        out = np.zeros((rois.shape[0],) + output_size + (x.shape[3],), dtype=x.dtype)
        for box in _boxes(x, rois, q, output_size, sampling_ratio):
            out[box.k] = box.out
        return channels_first(out, input.dtype)

    def corner_gradient(grad_output):
        g = channels_last(np.asarray(grad_output))
        return _corner_gradient(g, x, rois, q, output_size, sampling_ratio, 1.0)

    return forward, corner_gradient
