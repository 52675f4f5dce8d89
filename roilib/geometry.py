"""Where a box becomes numbers: the one place RoI geometry is computed.

Every op in :mod:`roilib` (the NumPy reference, the kernels' host code, the tests and the
book's figures) takes its bins, sample points and interpolation weights from here, so a
convention (C rounding, the half-pixel offset, the out-of-range rule) is written once.

Conventions
-----------
* Boxes are ``(K, 5)`` rows ``[batch_index, x1, y1, x2, y2]`` in input-image pixels.
  ``spatial_scale`` (``s``) maps them onto the feature map: ``x_map = x_image * s``.
* Arithmetic happens in the input's floating dtype (``float32`` or ``float64``), in the
  same order as torchvision's C++ code, so rounding decisions (``floor``/``ceil`` of a
  bin edge, ``ceil(roi_h / PH)`` for the adaptive grid) agree with it bit for bit.
* One pixel convention for the book: map cell ``i`` covers ``[i, i + 1)`` of the scaled
  box's axis and holds its value at ``i + 0.5``. The ops index arrays, so the sampling
  functions below work in *array-index* coordinates, where pixel ``i``'s value is at
  ``i``: a sample at index ``u`` reads the point ``u + 0.5``. ``aligned=True`` subtracts
  the half pixel from the box and so samples exactly where the box is; ``aligned=False``
  does not, and reads half a cell right of and below the box. :func:`read_region`
  converts between the two.

The functions are vectorised over boxes where that is natural (``(K,)`` arrays), and
per box where the number of samples differs from box to box (adaptive sampling).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

__all__ = [
    "c_round",
    "scale_boxes",
    "quantize_boxes",
    "PoolBins",
    "roi_pool_bins",
    "spp_bins",
    "spp_training_windows",
    "AlignBoxes",
    "roi_align_boxes",
    "AxisSamples",
    "axis_samples",
    "box_axis_samples",
    "sample_points",
    "BilinearCorners",
    "bilinear_corners",
    "interpolation_matrix",
    "WarpAxis",
    "warp_bins",
    "warp_steps",
    "warp_axis",
    "CONVENTIONS",
    "read_region",
    "centre_shift",
    "area_lost_and_gained",
]


def c_round(x: np.ndarray) -> np.ndarray:
    """Round half away from zero, like C's ``round`` (not NumPy's half-to-even).

    Parameters
    ----------
    x : ndarray
        Floating values, any shape.

    Returns
    -------
    ndarray
        Same shape and dtype, integral values. ``c_round(2.5) == 3``, ``c_round(-2.5) == -3``.

    Notes
    -----
    ``floor(|x| + 0.5)`` is wrong in float32 for ``x = 0.49999997`` (the sum rounds up to
    1), so the fractional part is compared instead; ``x - trunc(x)`` is exact.
    """
    x = np.asarray(x)
    whole = np.trunc(x)
    frac = np.abs(x - whole)
    return whole + np.where(frac >= 0.5, np.sign(x), 0).astype(x.dtype)


def scale_boxes(rois: np.ndarray, spatial_scale: float, dtype=np.float64) -> np.ndarray:
    """Project image-pixel boxes onto the feature map, without rounding.

    Parameters
    ----------
    rois : ndarray, shape (K, 5)
        ``[batch_index, x1, y1, x2, y2]`` in image pixels.
    spatial_scale : float
        Feature-map pixels per image pixel (``1 / stride``).
    dtype : numpy dtype
        Arithmetic dtype (the input's); the scale is cast to it first, as the C++ ops do.

    Returns
    -------
    ndarray, shape (K, 4)
        ``[x1, y1, x2, y2] * spatial_scale`` in feature-map pixels, in ``dtype``.
    """
    t = np.dtype(dtype).type
    return np.asarray(rois, dtype=dtype)[:, 1:5] * t(spatial_scale)


def quantize_boxes(rois: np.ndarray, spatial_scale: float, dtype=np.float64) -> np.ndarray:
    """RoIPool's first quantization: scaled box corners rounded to whole feature pixels.

    Parameters
    ----------
    rois : ndarray, shape (K, 5)
        Boxes in image pixels.
    spatial_scale : float
        Feature-map pixels per image pixel.
    dtype : numpy dtype
        Arithmetic dtype.

    Returns
    -------
    ndarray, shape (K, 4)
        ``c_round([x1, y1, x2, y2] * s)`` as ``dtype`` (integral values).
    """
    return c_round(scale_boxes(rois, spatial_scale, dtype))


@dataclass(frozen=True)
class PoolBins:
    """Integer RoIPool bins, already clipped to the map.

    Attributes
    ----------
    hstart, hend : ndarray of int64, shape (K, PH)
        Row range ``[hstart, hend)`` of each bin row, in feature-map pixels.
    wstart, wend : ndarray of int64, shape (K, PW)
        Column range ``[wstart, wend)`` of each bin column.
    box : ndarray of int64, shape (K, 4)
        The rounded corners ``[x1, y1, x2, y2]`` before binning.

    A bin is empty when ``hend <= hstart`` or ``wend <= wstart``; it outputs 0.
    """

    hstart: np.ndarray
    hend: np.ndarray
    wstart: np.ndarray
    wend: np.ndarray
    box: np.ndarray


def _pool_axis(start: np.ndarray, end: np.ndarray, n_bins: int, size: int, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """Bin edges on one axis for RoIPool (see :func:`roi_pool_bins`)."""
    t = np.dtype(dtype).type
    length = np.maximum(end - start + t(1), t(1))
    bin_size = length / t(n_bins)
    p = np.arange(n_bins, dtype=dtype)
    lo = np.floor(p[None, :] * bin_size[:, None]).astype(np.int64)
    hi = np.ceil((p[None, :] + t(1)) * bin_size[:, None]).astype(np.int64)
    offset = start.astype(np.int64)[:, None]
    lo = np.clip(lo + offset, 0, size)
    hi = np.clip(hi + offset, 0, size)
    return lo, hi


def roi_pool_bins(
    rois: np.ndarray,
    output_size: Tuple[int, int],
    spatial_scale: float,
    height: int,
    width: int,
    dtype=np.float64,
) -> PoolBins:
    """RoIPool's bins (Fast R-CNN, as in Caffe, MXNet and torchvision).

    The scaled corners are C-rounded (first quantization); the box is
    ``end - start + 1`` pixels wide (corners inclusive, at least 1); bin ``p`` of ``P``
    spans ``[floor(p * w / P), ceil((p + 1) * w / P))`` pixels from ``start`` (second
    quantization), clipped to the map. Neighbouring bins may overlap by a pixel and
    differ in size; none is lost.

    Parameters
    ----------
    rois : ndarray, shape (K, 5)
        Boxes in image pixels.
    output_size : (int, int)
        ``(PH, PW)``.
    spatial_scale : float
        Feature-map pixels per image pixel.
    height, width : int
        Feature-map size ``(H, W)``.
    dtype : numpy dtype
        Arithmetic dtype (bin edges are computed in it, as in the C++ op).

    Returns
    -------
    PoolBins
    """
    ph, pw = output_size
    q = quantize_boxes(rois, spatial_scale, dtype)
    hstart, hend = _pool_axis(q[:, 1], q[:, 3], ph, height, dtype)
    wstart, wend = _pool_axis(q[:, 0], q[:, 2], pw, width, dtype)
    return PoolBins(hstart, hend, wstart, wend, q.astype(np.int64))


def spp_bins(length: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """SPP-net's pyramid bins on an axis (the paper's appendix rule).

    Bin ``i`` of ``n`` spans ``[floor(i * a / n), ceil((i + 1) * a / n))`` on an axis of
    length ``a``: always exactly ``n`` non-empty bins covering the axis. Exact integer
    arithmetic.

    Parameters
    ----------
    length : int
        Axis length ``a`` in feature-map pixels (``>= 1``).
    n : int
        Number of bins.

    Returns
    -------
    start, end : ndarray of int64, shape (n,)
    """
    i = np.arange(n, dtype=np.int64)
    return (i * length) // n, -((-(i + 1) * length) // n)


def spp_training_windows(length: int, n: int) -> Tuple[np.ndarray, np.ndarray]:
    """SPP-net's training-time pooling windows: ``win = ceil(a/n)``, ``stride = floor(a/n)``.

    This is how the paper describes the layer as a sliding-window pooling (its Fig. 4).
    It is not guaranteed to give ``n`` windows inside the map: for ``a = 10, n = 6`` the
    stride is 1 and the window 2, so six windows only reach pixel 6 and the last four
    pixels are never pooled. This function returns the ``n`` windows it would produce,
    clipped to the axis, so the book can show that.

    Parameters
    ----------
    length : int
        Axis length ``a``.
    n : int
        Number of windows wanted.

    Returns
    -------
    start, end : ndarray of int64, shape (n,)
        ``[i * stride, i * stride + win)`` clipped to ``[0, a]``.
    """
    win = -(-length // n)
    stride = length // n
    start = np.arange(n, dtype=np.int64) * stride
    return np.minimum(start, length), np.minimum(start + win, length)


@dataclass(frozen=True)
class AlignBoxes:
    """RoIAlign's continuous boxes, bins and sampling grids, per box and axis.

    Attributes
    ----------
    start_y, start_x : ndarray, shape (K,)
        Top/left edge in feature-map coordinates (``y1 * s - offset``).
    bin_h, bin_w : ndarray, shape (K,)
        Bin size (``roi_h / PH``); ``roi_h`` is at least 1 when ``aligned=False``.
    grid_h, grid_w : ndarray of int64, shape (K,)
        Samples per bin along each axis (``sampling_ratio`` or ``ceil(roi_h / PH)``),
        never negative (a degenerate aligned box has 0 and outputs 0).
    clamped_h, clamped_w : ndarray of bool, shape (K,)
        Where ``roi_h`` was raised to 1 (so the bin size no longer follows the box).
    """

    start_y: np.ndarray
    start_x: np.ndarray
    bin_h: np.ndarray
    bin_w: np.ndarray
    grid_h: np.ndarray
    grid_w: np.ndarray
    clamped_h: np.ndarray
    clamped_w: np.ndarray

    @property
    def count(self) -> np.ndarray:
        """Divisor of the average: ``max(grid_h * grid_w, 1)``, shape (K,)."""
        return np.maximum(self.grid_h * self.grid_w, 1)


def _align_axis(lo, hi, n_bins, sampling_ratio, aligned, dtype):
    t = np.dtype(dtype).type
    offset = t(0.5) if aligned else t(0.0)
    start = lo - offset
    length = (hi - offset) - start
    clamped = np.zeros(length.shape, dtype=bool) if aligned else length < t(1)
    if not aligned:
        length = np.maximum(length, t(1))
    bin_size = length / t(n_bins)
    if sampling_ratio > 0:
        grid = np.full(length.shape, sampling_ratio, dtype=np.int64)
    else:
        grid = np.maximum(np.ceil(length / t(n_bins)), 0).astype(np.int64)
    return start, bin_size, grid, clamped


def roi_align_boxes(
    rois: np.ndarray,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    dtype=np.float64,
) -> AlignBoxes:
    """RoIAlign's per-box geometry (Mask R-CNN; torchvision/Detectron convention).

    ``start = x1 * s - off`` and ``end = x2 * s - off`` with ``off = 0.5`` when
    ``aligned`` else 0; ``roi_w = end - start``, raised to 1 only when not aligned;
    ``bin_w = roi_w / PW``; ``grid_w = sampling_ratio`` if positive, else
    ``ceil(roi_w / PW)``.

    Parameters
    ----------
    rois : ndarray, shape (K, 5)
        Boxes in image pixels.
    output_size : (int, int)
        ``(PH, PW)``.
    spatial_scale : float
        Feature-map pixels per image pixel.
    sampling_ratio : int
        Samples per bin and axis; ``<= 0`` means adaptive.
    aligned : bool
        Shift the box by half a pixel so pixel centres sit at ``i + 0.5``.
    dtype : numpy dtype
        Arithmetic dtype.

    Returns
    -------
    AlignBoxes
    """
    ph, pw = output_size
    b = scale_boxes(rois, spatial_scale, dtype)
    sy, bh, gh, ch = _align_axis(b[:, 1], b[:, 3], ph, sampling_ratio, aligned, dtype)
    sx, bw, gw, cw = _align_axis(b[:, 0], b[:, 2], pw, sampling_ratio, aligned, dtype)
    return AlignBoxes(sy, sx, bh, bw, gh, gw, ch, cw)


@dataclass(frozen=True)
class AxisSamples:
    """Sample coordinates along one axis, with their 1-D bilinear weights.

    Fields have shape ``(..., n_bins * grid)``: one row per box when built for several
    boxes that share a grid size, a plain vector for one box. Entry ``j`` belongs to bin
    ``j // grid`` and is sample ``j % grid`` inside it.

    Attributes
    ----------
    coord : ndarray
        Sample positions in feature-map pixels, before any clamping.
    low, high : ndarray of int64
        The two neighbouring pixel indices (equal at the last pixel).
    w_low, w_high : ndarray
        Their weights ``1 - l`` and ``l`` (zero for samples out of range).
    valid : ndarray of bool
        False where the sample lies beyond ``[-1, size]``: it contributes 0 but counts.
    slope : ndarray
        ``d l / d coord``: 1 inside the map, 0 where the position was clamped
        (``coord <= 0`` or at/after the last pixel) or the sample is invalid.
    grid : int
        Samples per bin.
    """

    coord: np.ndarray
    low: np.ndarray
    high: np.ndarray
    w_low: np.ndarray
    w_high: np.ndarray
    valid: np.ndarray
    slope: np.ndarray
    grid: int

    def __getitem__(self, k) -> "AxisSamples":
        """The samples of box ``k`` (for fields built over several boxes)."""
        return AxisSamples(
            self.coord[k], self.low[k], self.high[k], self.w_low[k], self.w_high[k],
            self.valid[k], self.slope[k], self.grid,
        )

    @property
    def fraction(self) -> np.ndarray:
        """Position of each sample as a fraction of the box, ``(p + (i + 0.5)/g) / P``."""
        n = self.coord.shape[-1]
        if n == 0:
            return np.zeros(0, dtype=self.coord.dtype)
        j = np.arange(n)
        return ((j // self.grid) + ((j % self.grid) + 0.5) / self.grid) / (n // self.grid)


def sample_points(start, bin_size, grid: int, n_bins: int, dtype=np.float64) -> np.ndarray:
    """RoIAlign sample coordinates along one axis: ``start + p*bin + (i + .5)*bin/g``.

    Evaluated in the same order as torchvision's C++ (``(start + p*bin) + ((i+.5)*bin)/g``)
    so float32 results match it exactly.

    Parameters
    ----------
    start, bin_size : float or ndarray of shape (K,)
        Box edge and bin size in feature-map pixels.
    grid : int
        Samples per bin (``g``), shared by all the boxes.
    n_bins : int
        Number of bins (``P``).
    dtype : numpy dtype
        Arithmetic dtype.

    Returns
    -------
    ndarray, shape (n_bins * grid,) or (K, n_bins * grid)
        Bin-major: the ``grid`` samples of bin 0, then of bin 1, ...
    """
    t = np.dtype(dtype).type
    start = np.asarray(start, dtype=dtype)[..., None]
    bin_size = np.asarray(bin_size, dtype=dtype)[..., None]
    if grid <= 0:
        return np.zeros(start.shape[:-1] + (0,), dtype=dtype)
    p = np.repeat(np.arange(n_bins, dtype=dtype), grid)
    i = np.tile(np.arange(grid, dtype=dtype) + t(0.5), n_bins)
    return (start + p * bin_size) + (i * bin_size) / t(grid)


def _bilinear_axis(coord: np.ndarray, size: int):
    """torchvision's 1-D bilinear rule: validity, neighbours, weights, slope, clamped coord."""
    t = coord.dtype.type
    valid = ~((coord < t(-1)) | (coord > t(size)))
    c = np.where(coord <= t(0), t(0), coord)
    low = np.floor(c).astype(np.int64)
    at_end = low >= size - 1
    low = np.where(at_end, size - 1, low)
    high = np.where(at_end, size - 1, low + 1)
    c = np.where(at_end, low.astype(coord.dtype), c)
    frac = c - low.astype(coord.dtype)
    zero = t(0)
    w_high = np.where(valid, frac, zero)
    w_low = np.where(valid, t(1) - frac, zero)
    slope = np.where(valid & ~at_end & (coord > t(0)), t(1), zero)
    return low, high, w_low, w_high, valid, slope, c


def axis_samples(start, bin_size, grid: int, n_bins: int, size: int, dtype=np.float64) -> AxisSamples:
    """Sample points along one axis and their bilinear neighbours.

    Parameters
    ----------
    start, bin_size : float or ndarray of shape (K,)
        From :func:`roi_align_boxes` (``start_y``/``bin_h`` or ``start_x``/``bin_w``), for
        one box or for several boxes with the same ``grid``.
    grid : int
        Samples per bin.
    n_bins : int
        Output size along this axis.
    size : int or ndarray of int, shape (K, 1)
        Map size along this axis (``H`` or ``W``), or each box's (boxes of both axes
        in one call).
    dtype : numpy dtype
        Arithmetic dtype.

    Returns
    -------
    AxisSamples
    """
    coord = sample_points(start, bin_size, grid, n_bins, dtype)
    low, high, w_low, w_high, valid, slope, _ = _bilinear_axis(coord, size)
    return AxisSamples(coord, low, high, w_low, w_high, valid, slope, int(max(grid, 0)))


def box_axis_samples(start: np.ndarray, bin_size: np.ndarray, grid: np.ndarray, n_bins: int, size: int, dtype) -> list:
    """:func:`axis_samples` for every box, computed once per distinct grid size.

    Parameters
    ----------
    start, bin_size : ndarray, shape (K,)
    grid : ndarray of int, shape (K,)
    n_bins, size : int
    dtype : numpy dtype

    Returns
    -------
    list of AxisSamples
        Entry ``k`` holds box ``k``'s samples (1-D fields).
    """
    out = [None] * len(grid)
    for g in np.unique(grid):
        idx = np.flatnonzero(grid == g)
        group = axis_samples(start[idx], bin_size[idx], int(g), n_bins, size, dtype)
        for row, k in enumerate(idx):
            out[k] = group[row]
    return out


@dataclass(frozen=True)
class BilinearCorners:
    """The four neighbours of one sample point and their weights.

    Attributes
    ----------
    y, x : float
        The point after clamping (where interpolation actually happens).
    y_low, y_high, x_low, x_high : int
        Neighbouring rows and columns.
    weights : ndarray, shape (2, 2)
        ``weights[a, b]`` multiplies ``input[y_low if a == 0 else y_high,
        x_low if b == 0 else x_high]``; each is the area of the sub-rectangle diagonally
        opposite that corner. All zero when the point is out of range.
    valid : bool
        False when the point lies beyond ``[-1, H] x [-1, W]``.
    """

    y: float
    x: float
    y_low: int
    y_high: int
    x_low: int
    x_high: int
    weights: np.ndarray
    valid: bool

    def interpolate(self, plane: np.ndarray) -> float:
        """Bilinear value of a 2-D map ``plane`` (H, W) at this point."""
        v = plane[np.ix_([self.y_low, self.y_high], [self.x_low, self.x_high])]
        return float((self.weights * v).sum())


def bilinear_corners(y: float, x: float, height: int, width: int, dtype=np.float64) -> BilinearCorners:
    """Neighbours and weights of one point, with RoIAlign's out-of-range rules.

    Parameters
    ----------
    y, x : float
        Point in feature-map pixels.
    height, width : int
        Map size.
    dtype : numpy dtype
        Arithmetic dtype.

    Returns
    -------
    BilinearCorners
    """
    ly, hy, wly, why, vy, _, yc = _bilinear_axis(np.array([y], dtype=dtype), height)
    lx, hx, wlx, whx, vx, _, xc = _bilinear_axis(np.array([x], dtype=dtype), width)
    valid = bool(vy[0] and vx[0])
    w = np.outer([wly[0], why[0]], [wlx[0], whx[0]]).astype(dtype)
    if not valid:
        w[:] = 0
    return BilinearCorners(float(yc[0]), float(xc[0]), int(ly[0]), int(hy[0]), int(lx[0]), int(hx[0]), w, valid)


def interpolation_matrix(samples: AxisSamples, size: int, slopes: bool = False):
    """One box's 1-D interpolation weights as a small dense matrix.

    Only the pixels some valid sample touches get a column, so a box's matrix stays
    small however large the map is, and sparse sampling (a fixed ``sampling_ratio`` on a
    large box) gathers only the rows and columns it reads.

    Parameters
    ----------
    samples : AxisSamples
        One box, one axis (1-D fields).
    size : int
        Map size along the axis.
    slopes : bool
        Also return the derivative matrix (for box-coordinate gradients).

    Returns
    -------
    index : ndarray of int64, shape (T,)
        Sorted pixel indices touched by at least one valid sample.
    weights : ndarray, shape (n_samples, T)
        ``weights[j, t]`` is the weight of pixel ``index[t]`` in sample ``j``.
    derivative : ndarray, shape (n_samples, T)
        Only with ``slopes=True``: ``d weights / d coord``, ``-slope`` on the low pixel
        and ``+slope`` on the high one.
    """
    v = samples.valid
    n = samples.coord.shape[0]
    dtype = samples.coord.dtype
    if not v.any():
        empty = np.zeros((n, 0), dtype=dtype)
        return (np.zeros(0, dtype=np.int64), empty) + ((empty,) if slopes else ())
    first = int(samples.low[v].min())
    span = int(samples.high[v].max()) + 1 - first
    lo = np.where(v, samples.low - first, 0)
    hi = np.where(v, samples.high - first, 0)
    j = np.arange(n)
    weights = np.zeros((n, span), dtype=dtype)
    weights[j, lo] = samples.w_low
    weights[j, hi] += samples.w_high  # lo == hi at the last pixel: the weights add up
    touched = np.zeros(span, dtype=bool)
    touched[lo[v]] = True
    touched[hi[v]] = True
    keep = slice(None) if touched.all() else np.flatnonzero(touched)
    index = np.arange(first, first + span)[keep]
    if not slopes:
        return index, weights[:, keep]
    derivative = np.zeros((n, span), dtype=dtype)
    derivative[j, lo] = -samples.slope
    derivative[j, hi] += samples.slope
    return index, weights[:, keep], derivative[:, keep]


# Largest samples-per-bin count a box may ask for; it only keeps the int conversion
# defined for absurd boxes (the kernels use the same cap).
WARP_GRID_CAP = 1 << 20

#: ``-FLT_MAX``: MNC's starting value of a bin's maximum (a sample must beat it to win)
WARP_FLOOR = -3.4028234663852886e38


@dataclass(frozen=True)
class WarpAxis:
    """RoIWarp's (MNC's) sample positions along one axis of one box.

    Attributes
    ----------
    coord : ndarray, shape (P, g + 1)
        Sample positions in array-index coordinates (pixel ``i``'s value at ``i``),
        ``start + f * bin``; entry ``[p, j]`` is sample ``j`` of bin ``p``.
    frac : ndarray, shape (P, g + 1)
        ``f``: the position in bin units, ``p`` plus ``j`` steps of ``1 / g`` added one
        at a time (as MNC's loop adds them, so the rounding is the same).
    present : ndarray of bool, shape (P, g + 1)
        ``f <= p + 1``: the sample exists (accumulated rounding can drop the last one).
    grid : int
        ``g``: steps per bin (``ceil(roi / P)`` or ``sampling_ratio``); ``g + 1``
        samples per bin including both ends, 1 sample when ``g == 0``.
    flat : bool
        The box has no extent on this axis (``end <= start``): the bins do not follow
        the far corner.
    """

    coord: np.ndarray
    frac: np.ndarray
    present: np.ndarray
    grid: int
    flat: bool


def warp_bins(starts, ends, n_bins: int, sampling_ratio: int = -1, dtype=np.float64):
    """MNC's bin size and steps per bin for boxes ``[start, end]`` on one axis, vectorised.

    ``roi = max(end - start, 0)`` (no ``+ 1``), ``bin = roi / P``, and ``g = ceil(roi / P)``
    (capped at :data:`WARP_GRID_CAP`) or ``sampling_ratio`` when it is positive.

    Parameters
    ----------
    starts, ends : ndarray, shape (K,)
        The boxes' (rounded) corners on this axis, in feature-map pixels.
    n_bins : int
        ``P``.
    sampling_ratio : int
        ``<= 0``: MNC's adaptive ``g``; otherwise ``g`` itself.
    dtype : numpy dtype
        Arithmetic dtype.

    Returns
    -------
    bin_size : ndarray (K,) of ``dtype``
    grid : ndarray (K,) of int64
        ``g``: steps per bin.
    flat : ndarray (K,) of bool
        The box has no extent on this axis (``end <= start``).
    """
    t = np.dtype(dtype).type
    length = np.asarray(ends, dtype=dtype) - np.asarray(starts, dtype=dtype)
    flat = ~(length > t(0))
    roi = np.where(flat, t(0), length)
    bin_size = roi / t(n_bins)
    if sampling_ratio > 0:
        grid = np.full(bin_size.shape, int(sampling_ratio), dtype=np.int64)
    else:
        grid = np.minimum(np.ceil(roi / t(n_bins)), WARP_GRID_CAP).astype(np.int64)
    return bin_size, grid, flat


def warp_steps(n_bins: int, grid: int, dtype=np.float64) -> Tuple[np.ndarray, np.ndarray]:
    """MNC's sample positions in bin units, the same for every box with ``g`` steps.

    Bin ``p`` is walked from ``f = p`` in steps of ``1 / g`` (computed in double and
    stored in ``dtype``, as the C++ layer does), added one by one in ``dtype`` while
    ``f <= p + 1``; ``g == 0`` gives the single sample ``f = p``.

    Returns
    -------
    frac : ndarray, shape (P, g + 1)
        ``f`` of sample ``j`` of bin ``p``.
    present : ndarray of bool, shape (P, g + 1)
        ``f <= p + 1``: the sample exists (accumulated rounding can drop the last one).
    """
    t = np.dtype(dtype).type
    step = t(1.0 / grid) if grid > 0 else None
    p = np.arange(n_bins, dtype=dtype)
    f = p.copy()
    fracs, present = [], []
    for _ in range(grid + 1):
        fracs.append(f)
        present.append(f <= p + t(1))
        if step is None:
            break
        f = f + step
    return np.stack(fracs, axis=1), np.stack(present, axis=1)


def warp_axis(start, end, n_bins: int, sampling_ratio: int = -1, dtype=np.float64) -> WarpAxis:
    """Sample positions of MNC's RoI warping layer along one axis of one box.

    MNC (``roi_warping_layer.cu`` in ``daijifeng001/caffe-mnc``) takes the rounded
    corners, ``roi = max(end - start, 0)`` (no ``+ 1``), ``bin = roi / P`` and
    ``g = ceil(roi / P)``, and walks each bin from its start to its end *inclusive*:
    ``f = p, p + 1/g, p + 2/g, ...`` while ``f <= p + 1``, reading the map at
    ``start + f * bin``. The steps are added one by one in ``dtype``, as the layer's loop
    does, so float32 rounding decides the same way (:func:`warp_bins`, :func:`warp_steps`).

    Parameters
    ----------
    start, end : float
        The box's (rounded) corners on this axis, in feature-map pixels.
    n_bins : int
        ``P``.
    sampling_ratio : int
        ``<= 0``: MNC's adaptive ``g = ceil(roi / P)``; otherwise ``g`` itself.
    dtype : numpy dtype
        Arithmetic dtype.

    Returns
    -------
    WarpAxis
    """
    t = np.dtype(dtype).type
    bin_size, grid, flat = warp_bins([t(start)], [t(end)], n_bins, sampling_ratio, dtype)
    frac, present = warp_steps(n_bins, int(grid[0]), dtype)
    coord = t(start) + frac * bin_size[0]
    return WarpAxis(coord, frac, present, int(grid[0]), bool(flat[0]))


#: ``read_region``'s conventions: where pixel ``i``'s value sits on the map's axis
CONVENTIONS = {
    "cell": 0.5,  # the book's: cell i covers [i, i + 1) and its value sits at i + 1/2
    "index": 0.0,  # the legacy picture (aligned=False): value at i, cell [i - 1/2, i + 1/2]
}


def read_region(
    rois: np.ndarray,
    spatial_scale: float,
    method: str,
    dtype=np.float64,
    height=None,
    width=None,
    convention: str = "cell",
) -> np.ndarray:
    """The part of the map an op actually reads for each box, on the box's axis.

    The box itself is ``[x1 s, x2 s]``. Each op reads its map at array indices; where an
    index lands on the box's axis is a convention:

    * ``"cell"`` (the book's, and the one under which ``aligned=True`` is exact): map
      cell ``i`` covers ``[i, i + 1)`` and its value sits at ``i + 1/2``, so array
      index ``u`` is the point ``u + 1/2``.
    * ``"index"`` (the legacy picture behind ``aligned=False``, and of many tutorials):
      pixel ``i``'s value sits at ``i`` and its cell is ``[i - 1/2, i + 1/2]``.

    With ``q = round(x s)`` (C rounding), in array indices the ops read:

    * ``"pool"`` (RoIPool): the whole cells ``q1 .. q2``, ``[q1 - 1/2, q2 + 1/2]``;
    * ``"warp"`` (RoIWarp, MNC): samples from ``q1`` to ``max(q1, q2)``, ends included;
    * ``"align"`` (RoIAlign, ``aligned=False``): bins from ``x1 s`` to ``x2 s``;
    * ``"aligned"`` (RoIAlign, ``aligned=True``): bins from ``x1 s - 1/2`` to ``x2 s - 1/2``.

    For the sampling ops the region is the extent of the bins the samples fill (for
    ``"align"`` before the ``max(roi, 1)`` clamp of tiny boxes).

    Parameters
    ----------
    rois : ndarray, shape (K, 5)
    spatial_scale : float
    method : {"pool", "warp", "align", "aligned"}
    dtype : numpy dtype
    height, width : int, optional
        Map size: when given, the region is clipped to the map, whose cells span
        ``[0, W]`` (``"cell"``) or ``[-1/2, W - 1/2]`` (``"index"``).
    convention : {"cell", "index"}

    Returns
    -------
    ndarray, shape (K, 4)
        ``[x_lo, y_lo, x_hi, y_hi]`` in the same units as the box ``[x1 s, y1 s, x2 s, y2 s]``.
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {tuple(CONVENTIONS)}, got {convention!r}")
    half = dtype(0.5) if isinstance(dtype, type) else np.dtype(dtype).type(0.5)
    if method == "align":
        region = scale_boxes(rois, spatial_scale, dtype)
    elif method == "aligned":
        region = scale_boxes(rois, spatial_scale, dtype) - half
    elif method == "warp":
        region = quantize_boxes(rois, spatial_scale, dtype)
        region[:, 2:] = np.maximum(region[:, 2:], region[:, :2])
    elif method == "pool":
        region = quantize_boxes(rois, spatial_scale, dtype) + np.array([-0.5, -0.5, 0.5, 0.5], dtype=dtype)
    else:
        raise ValueError(f"method must be 'pool', 'warp', 'align' or 'aligned', got {method!r}")
    offset = CONVENTIONS[convention]
    region = region + offset
    if height is not None and width is not None:
        upper = np.array([width, height, width, height], dtype=dtype) - 0.5 + offset
        region = np.clip(region, -0.5 + offset, upper)
    return region


def centre_shift(rois: np.ndarray, spatial_scale: float, method: str, convention: str = "cell") -> np.ndarray:
    """How far the centre of the region an op reads lies from the box's centre.

    Parameters
    ----------
    rois : ndarray, shape (K, 5)
    spatial_scale : float
    method, convention
        As in :func:`read_region` (no clipping to the map).

    Returns
    -------
    ndarray, shape (K, 2)
        ``(dx, dy)`` in image pixels; positive is right and down.
    """
    box = scale_boxes(rois, spatial_scale)
    region = read_region(rois, spatial_scale, method, convention=convention)
    return ((region[:, :2] + region[:, 2:]) - (box[:, :2] + box[:, 2:])) / 2 / spatial_scale


def area_lost_and_gained(box: np.ndarray, region: np.ndarray):
    """Areas of ``box`` missing from ``region`` and of ``region`` outside ``box``.

    Parameters
    ----------
    box, region : ndarray, shape (K, 4)
        Rectangles ``[x_lo, y_lo, x_hi, y_hi]`` (feature-map pixels).

    Returns
    -------
    lost, gained : ndarray, shape (K,)
        In square feature-map pixels.
    """
    box, region = np.atleast_2d(box), np.atleast_2d(region)

    def area(r):
        return np.clip(r[:, 2] - r[:, 0], 0, None) * np.clip(r[:, 3] - r[:, 1], 0, None)

    inter = np.concatenate([np.maximum(box[:, :2], region[:, :2]), np.minimum(box[:, 2:], region[:, 2:])], axis=1)
    common = area(inter)
    return area(box) - common, area(region) - common
