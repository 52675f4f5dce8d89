"""Multi-scale RoIAlign (FPN): each box pooled by RoIAlign from its own pyramid level.

The level of every box comes from :func:`roilib.family.fpn_levels` (torchvision's
``LevelMapper``); the pooling is :mod:`.roi_align`'s, on that level's map at that
level's scale. One call covers all levels: the result is ``(K, C, PH, PW)`` in box
order, as if each box had been pooled alone (to rounding: a level that many boxes read
is read a channel group at a time, see :func:`._layout.reads_in_groups`).
"""
from __future__ import annotations

import numpy as np

from .. import _validate as v
from ..family import fpn_levels, level_range
from ._layout import channels_first, channels_last
from .roi_align import _average_into, _backward


def _check(features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level, eps, aligned):
    maps = v.check_features(features)
    return (
        maps,
        v.check_rois(rois, maps[0]),
        v.check_output_size(output_size),
        v.check_scales(scales, len(maps)),
        v.check_sampling_ratio(sampling_ratio),
        *v.check_fpn_mapping(canonical_scale, canonical_level, eps),
        v.check_aligned(aligned),
    )


def box_levels(rois, scales, canonical_scale=224, canonical_level=4, eps=1e-6) -> np.ndarray:
    """The map index each box is pooled from (``-1``: none, see :func:`roilib.family.fpn_levels`).

    With a single map every box uses it (torchvision skips the level mapping then).
    """
    if len(scales) == 1:
        return np.zeros(rois.shape[0], dtype=np.int64)
    k_min, k_max = level_range(scales)
    return fpn_levels(rois, k_min, k_max, canonical_scale, canonical_level, eps, rois.dtype)


def multiscale_roi_align(
    features,
    rois,
    output_size,
    scales,
    sampling_ratio: int = 2,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
    aligned: bool = False,
) -> np.ndarray:
    """RoIAlign over a feature pyramid, every box on its FPN level (torchvision's
    ``MultiScaleRoIAlign``).

    Parameters
    ----------
    features : list of ndarray, each (N, C, H_l, W_l)
        The pyramid, finest map first (P2, P3, ...).
    rois : ndarray (K, 5) or list of (K_i, 4) arrays
        Boxes ``[batch_index, x1, y1, x2, y2]`` in image pixels.
    output_size : int or (int, int)
    scales : sequence of float
        Each map's ``spatial_scale``, powers of two halving level to level
        (``1/4, 1/8, 1/16, 1/32`` for P2-P5); they fix the levels ``k_min .. k_max``.
    sampling_ratio : int
        As in :func:`roilib.roi_align` (torchvision's detectors use 2).
    canonical_scale, canonical_level, eps : float, int, float
        FPN's ``s0 = 224``, ``k0 = 4`` and torchvision's ``eps = 1e-6``.
    aligned : bool
        RoIAlign's half-pixel offset (torchvision's module always uses ``False``).

    Returns
    -------
    ndarray, shape (K, C, PH, PW)
    """
    maps, rois, output_size, scales, sampling_ratio, s0, k0, eps, aligned = _check(
        features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level, eps, aligned
    )
    levels = box_levels(rois, scales, s0, k0, eps)
    c = maps[0].shape[1]
    out = np.zeros((rois.shape[0], c) + output_size, dtype=v.compute_dtype(maps[0].dtype))
    for level, (fmap, scale) in enumerate(zip(maps, scales)):
        idx = np.flatnonzero(levels == level)
        if idx.size:  # each level's boxes write their own rows of the output
            _average_into(out, idx.tolist(), fmap, rois[idx], output_size, scale, sampling_ratio, aligned)
    return out.astype(maps[0].dtype, copy=False)


def multiscale_roi_align_backward(
    grad_output: np.ndarray,
    features,
    rois,
    output_size,
    scales,
    sampling_ratio: int = 2,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
    aligned: bool = False,
) -> list:
    """Gradient of :func:`multiscale_roi_align` with respect to every map.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level, eps, aligned
        As in :func:`multiscale_roi_align`.

    Returns
    -------
    list of ndarray
        One gradient per map, each with that map's shape and dtype (zeros for a level
        no box uses).
    """
    maps, rois, output_size, scales, sampling_ratio, s0, k0, eps, aligned = _check(
        features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level, eps, aligned
    )
    v.check_grad_output(grad_output, (rois.shape[0], maps[0].shape[1]) + output_size, maps[0])
    levels = box_levels(rois, scales, s0, k0, eps)
    g = channels_last(grad_output)
    grads = []
    for level, (fmap, scale) in enumerate(zip(maps, scales)):
        idx = np.flatnonzero(levels == level)
        if idx.size == 0:
            grads.append(np.zeros_like(fmap))
            continue
        # the average's backward never reads the map: a zero-memory stand-in with its
        # channels-last shape spares converting it
        n, c, h, w = fmap.shape
        x = np.broadcast_to(np.zeros((), dtype=v.compute_dtype(fmap.dtype)), (n, h, w, c))
        grad = _backward(g[idx], x, rois[idx], output_size, scale, sampling_ratio, aligned, "avg")
        grads.append(channels_first(grad, fmap.dtype))
    return grads
