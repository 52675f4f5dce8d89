"""Precise RoI Pooling's geometry: bins, and the exact integral of the bilinear interpolant.

Precise RoI Pooling (IoU-Net; the authors' ``PreciseRoIPooling`` and mmcv's
``prroi_pool``) puts pixel ``i`` at coordinate ``i`` (no half-cell offset) and treats
the map as the continuous function

    ``f(y, x) = sum_ij X[i, j] * k(y - i) * k(x - j)``,   ``k(t) = max(0, 1 - |t|)``,

the bilinear interpolant, which is 0 beyond one cell outside the map (pixels outside the
map count as 0, unlike RoIAlign, which clamps). A bin ``[x0, x1] x [y0, y1]`` outputs the
integral of ``f`` over it divided by its area. Because ``f`` is a sum of products, so is
the integral:

    ``integral = sum_ij X[i, j] * K(y0, y1, i) * K(x0, x1, j)``,   ``K(a, b, j) = int_a^b k(t - j) dt``,

and ``K`` has a closed form per cell: on the cell ``[j-1, j]`` the hat rises (``u``,
``u = t - (j-1)``), on ``[j, j+1]`` it falls (``1 - v``, ``v = t - j``), so

    ``K = (u1 - u0)(u1 + u0)/2 + (v1 - v0)(2 - v1 - v0)/2``

with ``u`` and ``v`` the interval's ends clipped to ``[0, 1]`` in each cell. Written as
products of differences it stays accurate when the interval is short. The op is
therefore ``W_y X W_x^T / area`` per box: separable and linear, like average RoIAlign,
with ``W`` the matrix of ``K`` values (:func:`pixel_weights`).

Box geometry (as the authors' code): ``x1 = x1_image * s``, ``w = max(x2 - x1, 0)``,
``bin_w = w / PW``, bin ``pw`` spans ``[x1 + bin_w * pw, (x1 + bin_w * pw) + bin_w]``; a
bin of zero area outputs 0. The derivative of ``K`` in an end of the interval is the
hat itself (``dK/db = k(b - j)``, ``dK/da = -k(a - j)``), which is what makes the box
gradient exact: ``f`` is continuous, so the integral is continuously differentiable in
the bin's edges.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

__all__ = ["PrBoxes", "prroi_boxes", "hat", "hat_integral", "pixel_weights", "bin_edges"]


@dataclass(frozen=True)
class PrBoxes:
    """Per-box quantities of Precise RoI Pooling on the feature map, shape ``(K,)`` each.

    Attributes
    ----------
    x1, y1 : ndarray
        Box start (``x1_image * s``).
    bin_w, bin_h : ndarray
        ``max(x2 - x1, 0) / PW`` and ``max(y2 - y1, 0) / PH``.
    area : ndarray
        ``max(bin_w * bin_h, 0)``: the divisor; 0 means every bin outputs 0.
    """

    x1: np.ndarray
    y1: np.ndarray
    bin_w: np.ndarray
    bin_h: np.ndarray
    area: np.ndarray


def prroi_boxes(rois: np.ndarray, output_size: Tuple[int, int], spatial_scale: float, dtype=np.float64) -> PrBoxes:
    """Precise RoI Pooling's per-box geometry.

    Parameters
    ----------
    rois : ndarray, shape (K, 5)
        ``[batch_index, x1, y1, x2, y2]`` in image pixels.
    output_size : (int, int)
        ``(PH, PW)``.
    spatial_scale : float
    dtype : numpy dtype
        Arithmetic dtype.

    Returns
    -------
    PrBoxes
    """
    t = np.dtype(dtype).type
    ph, pw = output_size
    b = np.asarray(rois, dtype=dtype)[:, 1:5] * t(spatial_scale)
    bin_w = np.maximum(b[:, 2] - b[:, 0], t(0)) / t(pw)
    bin_h = np.maximum(b[:, 3] - b[:, 1], t(0)) / t(ph)
    return PrBoxes(b[:, 0], b[:, 1], bin_w, bin_h, np.maximum(bin_w * bin_h, t(0)))


def bin_edges(start, bin_size, n_bins: int, dtype=np.float64) -> Tuple[np.ndarray, np.ndarray]:
    """Edges of the bins along one axis: ``lo = start + bin * p``, ``hi = lo + bin``.

    Parameters
    ----------
    start, bin_size : float or ndarray of shape (K,)
    n_bins : int
    dtype : numpy dtype

    Returns
    -------
    lo, hi : ndarray, shape (n_bins,) or (K, n_bins)
    """
    start = np.asarray(start, dtype=dtype)[..., None]
    bin_size = np.asarray(bin_size, dtype=dtype)[..., None]
    lo = start + bin_size * np.arange(n_bins, dtype=dtype)
    return lo, lo + bin_size


def hat(t):
    """The bilinear kernel ``k(t) = max(0, 1 - |t|)``, in ``t``'s dtype."""
    t = np.asarray(t)
    one = t.dtype.type(1)
    return np.maximum(one - np.abs(t), t.dtype.type(0))


def hat_integral(lo, hi, j):
    """``K(lo, hi, j) = int_lo^hi k(t - j) dt`` in closed form (see the module docstring).

    Parameters
    ----------
    lo, hi : ndarray (broadcastable), floating
        Interval ends, ``lo <= hi``.
    j : ndarray of int (broadcastable)
        Pixel index.

    Returns
    -------
    ndarray
        In ``lo``'s dtype. Evaluated in the same order as the kernels'
        ``hat_integral``.
    """
    lo = np.asarray(lo)
    dtype = lo.dtype
    t = dtype.type
    hi = np.asarray(hi, dtype=dtype)
    jf = np.asarray(j).astype(dtype)
    zero, one, two, half = t(0), t(1), t(2), t(0.5)
    left = jf - one  # the cell [j-1, j]: rising edge
    u0 = np.clip(lo - left, zero, one)
    u1 = np.clip(hi - left, zero, one)
    v0 = np.clip(lo - jf, zero, one)  # the cell [j, j+1]: falling edge
    v1 = np.clip(hi - jf, zero, one)
    return (u1 - u0) * (u1 + u0) * half + (v1 - v0) * (two - v1 - v0) * half


def pixel_range(lo, hi, size: int) -> Tuple[int, int]:
    """First and last pixel whose hat overlaps ``[lo, hi]`` inside ``[0, size)``: ``[floor(lo), ceil(hi)]`` clipped.

    Returns ``(first, last)``; ``first > last`` when none does.
    """
    first = int(max(np.floor(np.min(lo)), 0)) if np.isfinite(np.min(lo)) else 0
    last = int(min(np.ceil(np.max(hi)), size - 1)) if np.isfinite(np.max(hi)) else size - 1
    return first, last


def pixel_weights(lo: np.ndarray, hi: np.ndarray, size: int, derivatives: bool = False):
    """The matrix ``W[p, j] = K(lo[p], hi[p], j)`` over the pixels the bins touch.

    Parameters
    ----------
    lo, hi : ndarray, shape (P,)
        One box's bin edges along an axis (:func:`bin_edges`).
    size : int
        Map size along the axis.
    derivatives : bool
        Also return ``k(lo[p] - j)`` and ``k(hi[p] - j)`` (``-dW/dlo`` and ``dW/dhi``).

    Returns
    -------
    index : ndarray of int64, shape (T,)
        The pixels ``j`` (a contiguous run, possibly empty).
    weights : ndarray, shape (P, T)
    at_lo, at_hi : ndarray, shape (P, T)
        Only with ``derivatives=True``.
    """
    first, last = pixel_range(lo, hi, size)
    index = np.arange(first, last + 1, dtype=np.int64)
    j = index[None, :]
    weights = hat_integral(lo[:, None], hi[:, None], j)
    if not derivatives:
        return index, weights
    jf = j.astype(lo.dtype)
    return index, weights, hat(lo[:, None] - jf), hat(hi[:, None] - jf)
