"""Geometry of two later members of the family: FPN levels and position-sensitive bins.

Like :mod:`roilib.geometry`, this is the one place these rules are written; the NumPy
reference, the kernels' host code, the tests and the book's figures all call it.

FPN level assignment (Lin et al., *Feature Pyramid Networks for Object Detection*, CVPR
2017, Eq. 1), exactly as torchvision's ``LevelMapper``::

    k = floor(k0 + log2(sqrt(w * h) / s0) + eps),  clamped to [k_min, k_max]

with ``k0 = canonical_level = 4``, ``s0 = canonical_scale = 224``, ``eps = 1e-6``, and
``w * h`` the box's area in image pixels. It is evaluated in the boxes' floating dtype,
operation for operation as torchvision does, so float32 boxes land on the same level.
The pyramid's levels come from the maps' scales: a map at scale ``2**-k`` is level
``k`` (P2 is ``1/4``, P5 is ``1/32``).

Position-sensitive pooling (Dai et al., *R-FCN*, NIPS 2016): the input has
``C_out * PH * PW`` channels and output bin ``(ph, pw)`` of output channel ``c`` reads
input channel ``(c * PH + ph) * PW + pw`` only (torchvision's mapping).
"""
from __future__ import annotations

from typing import Sequence, Tuple

import numpy as np

from .geometry import PoolBins, c_round, scale_boxes

__all__ = [
    "NO_LEVEL",
    "scale_level",
    "level_range",
    "infer_scale",
    "fpn_levels",
    "level_boundaries",
    "ps_channel",
    "ps_roi_pool_bins",
]

#: level index of a box whose FPN level is undefined (negative area: sqrt is NaN)
NO_LEVEL = -1


def scale_level(scale: float) -> int:
    """Pyramid level ``k`` of a map at ``spatial_scale = 2**-k``, as torchvision reads it.

    torchvision computes ``-log2`` of the scale in float32 and truncates it with ``int``.

    Parameters
    ----------
    scale : float
        Feature-map pixels per image pixel.

    Returns
    -------
    int
    """
    return int(-np.log2(np.float32(scale)))


def level_range(scales: Sequence[float]) -> Tuple[int, int]:
    """``(k_min, k_max)``: the levels of the first (finest) and last (coarsest) map."""
    return scale_level(scales[0]), scale_level(scales[-1])


def infer_scale(feature_hw: Sequence[int], image_hw: Sequence[int]) -> Tuple[float, float]:
    """torchvision's ``_infer_scale``, per axis: the power of two nearest ``map / image``.

    ``2 ** round(log2(size_map / size_image))``, the logarithm taken in float32 and
    rounded half to even (``torch.round``). torchvision keeps the height's value; roilib
    also returns the width's so that a mismatch can be reported.

    Parameters
    ----------
    feature_hw : (int, int)
        The map's ``(H, W)``.
    image_hw : (int, int)
        The (largest) image's ``(height, width)``.

    Returns
    -------
    (float, float)
        Scale inferred from the heights and from the widths.
    """
    out = []
    for s1, s2 in zip(feature_hw, image_hw):
        approx = np.float32(float(s1) / float(s2))
        out.append(2.0 ** float(np.round(np.log2(approx))))
    return out[0], out[1]


def fpn_levels(
    rois: np.ndarray,
    k_min: int,
    k_max: int,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
    dtype=None,
) -> np.ndarray:
    """The pyramid level of every box, as an index into the maps (``0`` is ``k_min``).

    Parameters
    ----------
    rois : ndarray, shape (K, 5)
        Boxes ``[batch_index, x1, y1, x2, y2]`` in image pixels.
    k_min, k_max : int
        Levels of the finest and the coarsest map (:func:`level_range`).
    canonical_scale, canonical_level, eps : float, int, float
        ``s0``, ``k0`` and ``eps`` of the formula in the module docstring.
    dtype : numpy dtype, optional
        Arithmetic dtype (default: the boxes'). torchvision computes in the boxes' dtype.

    Returns
    -------
    ndarray of int64, shape (K,)
        ``clamp(k, k_min, k_max) - k_min``. A box of zero area goes to ``k_min``; a box
        of negative area (inverted along one axis) has no level: :data:`NO_LEVEL`, and
        its output is 0 (torchvision's CPU result, where the NaN level matches no map).
    """
    rois = np.asarray(rois)
    dtype = np.dtype(dtype or rois.dtype)
    t = dtype.type
    b = rois[:, 1:5].astype(dtype)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    with np.errstate(invalid="ignore", divide="ignore"):
        s = np.sqrt(area)
        k = np.floor((t(canonical_level) + np.log2(s / t(canonical_scale))) + t(eps))
    undefined = np.isnan(k)
    k = np.clip(np.where(undefined, k_min, k), k_min, k_max).astype(np.int64) - k_min
    return np.where(undefined, NO_LEVEL, k)


def level_boundaries(
    k_min: int, k_max: int, canonical_scale: float = 224, canonical_level: int = 4, eps: float = 1e-6
) -> np.ndarray:
    """Box sizes ``sqrt(w h)`` where the level changes: ``s0 * 2**(k - k0 - eps)``.

    Level ``k`` (for ``k_min < k <= k_max``) starts at the ``k - k_min - 1``-th entry:
    a box at least that large (in the formula's exact arithmetic) goes to level ``k``
    or above.

    Returns
    -------
    ndarray of float64, shape (k_max - k_min,)
    """
    k = np.arange(k_min + 1, k_max + 1, dtype=np.float64)
    return canonical_scale * 2.0 ** (k - canonical_level - eps)


def ps_channel(out_channels: int, output_size: Tuple[int, int]) -> np.ndarray:
    """Input channel read by each output element: ``(c * PH + ph) * PW + pw``.

    Returns
    -------
    ndarray of int64, shape (out_channels, PH, PW)
    """
    ph, pw = output_size
    return np.arange(out_channels * ph * pw, dtype=np.int64).reshape(out_channels, ph, pw)


def _ps_pool_axis(start, end, n_bins: int, size: int, dtype):
    """torchvision's PS-RoIPool bins on one axis (see :func:`ps_roi_pool_bins`)."""
    t = np.dtype(dtype).type
    length = np.maximum(end - start, 1)  # integer corners, no +1
    bin_size = length.astype(dtype) / t(n_bins)
    p = np.arange(n_bins, dtype=dtype)
    lo = np.floor(p[None, :] * bin_size[:, None]).astype(np.int64)
    hi = np.ceil((p[None, :] + t(1)) * bin_size[:, None]).astype(np.int64)
    # np.minimum/np.maximum in place: np.clip's dispatch costs more than these small arrays
    lo += start[:, None]
    hi += start[:, None]
    for edge in (lo, hi):
        np.minimum(np.maximum(edge, 0, out=edge), size - 1, out=edge)
    return lo, hi


def ps_roi_pool_bins(
    rois: np.ndarray,
    output_size: Tuple[int, int],
    spatial_scale: float,
    height: int,
    width: int,
    dtype=np.float64,
) -> PoolBins:
    """Position-sensitive RoIPool's bins, as torchvision's ``ps_roi_pool`` forward.

    Three differences from RoIPool's bins (:func:`roilib.geometry.roi_pool_bins`): the
    box is ``end - start`` pixels wide (no ``+ 1``; at least 1), and the bin edges are
    clipped to ``[0, size - 1]``, not ``[0, size]``, so the map's last row and column are
    never read and a bin that starts there is empty. The bin is averaged, not maxed.

    Parameters
    ----------
    rois : ndarray, shape (K, 5)
    output_size : (int, int)
    spatial_scale : float
    height, width : int
    dtype : numpy dtype
        Arithmetic dtype.

    Returns
    -------
    PoolBins
        ``hstart, hend`` (K, PH) and ``wstart, wend`` (K, PW): bin ``[start, end)``,
        empty when ``end <= start``; ``box`` holds the rounded corners.
    """
    ph, pw = output_size
    q = c_round(scale_boxes(rois, spatial_scale, dtype)).astype(np.int64)
    hstart, hend = _ps_pool_axis(q[:, 1], q[:, 3], ph, height, dtype)
    wstart, wend = _ps_pool_axis(q[:, 0], q[:, 2], pw, width, dtype)
    return PoolBins(hstart, hend, wstart, wend, q)
