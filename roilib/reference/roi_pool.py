"""RoIPool (Fast R-CNN): max over integer bins of a C-rounded box.

Geometry comes from :func:`roilib.geometry.roi_pool_bins`; the max and its tie rule
from :func:`._pooling.window_max`.
"""
from __future__ import annotations

import numpy as np

from .. import _validate as v
from ..geometry import roi_pool_bins
from ._layout import channels_first, channels_last
from ._pooling import window_max


def _check(input, rois, output_size, spatial_scale):
    v.check_input(input)
    return (
        v.check_rois(rois, input),
        v.check_output_size(output_size),
        v.check_spatial_scale(spatial_scale),
    )


def _pool_boxes(x_hwc, rois, output_size, spatial_scale, with_arg=False):
    """Yield ``(k, image, row0, col0, values, arg_row, arg_col, empty)`` per box touching the map."""
    _, h, w, _ = x_hwc.shape
    bins = roi_pool_bins(rois, output_size, spatial_scale, h, w, x_hwc.dtype)
    for k in range(rois.shape[0]):
        hs, he, ws, we = bins.hstart[k], bins.hend[k], bins.wstart[k], bins.wend[k]
        r0, r1, c0, c1 = hs.min(), he.max(), ws.min(), we.max()
        if r1 <= r0 or c1 <= c0:
            continue
        image = int(rois[k, 0])
        region = x_hwc[image, r0:r1, c0:c1]
        values, ar, ac, empty = window_max(region, (hs - r0, he - r0), (ws - c0, we - c0), with_arg)
        yield k, image, r0, c0, values, ar, ac, empty


def roi_pool(input: np.ndarray, rois, output_size, spatial_scale: float = 1.0) -> np.ndarray:
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

    Returns
    -------
    ndarray, shape (K, C, PH, PW)
        Max of each bin (0 for empty bins), in the input's dtype.
    """
    rois, output_size, spatial_scale = _check(input, rois, output_size, spatial_scale)
    x = channels_last(input)
    out = np.zeros((rois.shape[0],) + output_size + (x.shape[3],), dtype=x.dtype)
    for k, _, _, _, values, _, _, _ in _pool_boxes(x, rois, output_size, spatial_scale):
        out[k] = values
    return channels_first(out, input.dtype)


def roi_pool_backward(grad_output: np.ndarray, input: np.ndarray, rois, output_size, spatial_scale: float = 1.0) -> np.ndarray:
    """Gradient of :func:`roi_pool` with respect to ``input``.

    Each output's gradient goes to the pixel its max came from (the first such pixel in
    row-major order on ties); empty bins route nothing. Contributions are added in box
    order, so the result is deterministic.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale
        As in :func:`roi_pool`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale = _check(input, rois, output_size, spatial_scale)
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    x = channels_last(input)
    n, h, w, c = x.shape
    g = channels_last(grad_output)
    grad = np.zeros(x.size, dtype=x.dtype)
    ch = np.arange(c)
    for k, image, r0, c0, _, ar, ac, empty in _pool_boxes(x, rois, output_size, spatial_scale, with_arg=True):
        flat = ((image * h + r0 + ar[~empty]) * w + c0 + ac[~empty]) * c + ch
        np.add.at(grad, flat.ravel(), g[k][~empty].ravel())
    return channels_first(grad.reshape(x.shape), input.dtype)
