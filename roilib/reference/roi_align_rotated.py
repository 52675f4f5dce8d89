"""Rotated RoIAlign (detectron2's ``ROIAlignRotated``; ``aligned=False`` as in mmcv).

Boxes are ``[batch_index, cx, cy, w, h, angle_degrees]``. The sample grid is RoIAlign's,
laid out in the box's own frame and rotated counter-clockwise about its centre
(:mod:`roilib.geometry_rotated`); each sample is a bilinear read with RoIAlign's
out-of-range rules, and a bin outputs the mean of its samples.

A rotated grid is not separable, so for one box the reference gathers the distinct
pixels its samples touch (``T`` of them) and builds the ``(PH*PW, T)`` matrix ``M`` of
summed bilinear weights per bin: the output is ``M X_T / count`` for all channels at
once, and the input gradient is the transpose, ``M^T g / count``, scattered back.
"""
from __future__ import annotations

import numpy as np

from .. import _validate as v
from ..geometry_rotated import roi_align_rotated_boxes, rotated_samples
from ._layout import channels_first, channels_last


def _check(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    v.check_input(input)
    return (
        v.check_rotated_rois(rois, input),
        v.check_output_size(output_size),
        v.check_spatial_scale(spatial_scale),
        v.check_sampling_ratio(sampling_ratio),
        v.check_aligned(aligned),
    )


def _box_matrices(x_hwc, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Yield ``(k, image, pixels, M)`` per box whose samples touch the map.

    ``pixels`` are the distinct flat indices ``row * W + col`` that the box reads and
    ``M`` (PH*PW, len(pixels)) the bilinear weights summed per bin and divided by the
    box's sample count.
    """
    _, h, w, _ = x_hwc.shape
    ph, pw = output_size
    boxes = roi_align_rotated_boxes(rois, output_size, spatial_scale, sampling_ratio, aligned, x_hwc.dtype)
    count = boxes.count.astype(x_hwc.dtype)
    for k in range(rois.shape[0]):
        if boxes.grid_h[k] <= 0 or boxes.grid_w[k] <= 0:
            continue
        s = rotated_samples(boxes, k, output_size, h, w)
        keep = s.weight != 0
        if not keep.any():
            continue
        bins = np.broadcast_to(s.bins(output_size)[..., None], s.index.shape)[keep]
        pixels, column = np.unique(s.index[keep], return_inverse=True)
        m = np.zeros((ph * pw, pixels.size), dtype=x_hwc.dtype)
        np.add.at(m, (bins, column.ravel()), s.weight[keep])
        yield k, int(rois[k, 0]), pixels, m / count[k]


def roi_align_rotated(
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> np.ndarray:
    """Rotated RoIAlign forward.

    Parameters
    ----------
    input : ndarray, shape (N, C, H, W)
        Feature map, float16/32/64 (float16 is computed in float32).
    rois : ndarray (K, 6) or list of (K_i, 5) arrays
        ``[batch_index, cx, cy, w, h, angle_degrees]`` in image pixels; the angle is
        counter-clockwise as seen on the image (y pointing down), the box is rotated
        about its centre.
    output_size : int or (int, int)
        ``(PH, PW)``; ``PH`` runs along the box's own height, ``PW`` along its width.
    spatial_scale : float
        Feature-map pixels per image pixel.
    sampling_ratio : int
        Samples per bin and axis; ``<= 0`` uses ``ceil(size / output_size)``.
    aligned : bool
        ``True`` (detectron2): pixel ``i``'s value sits at ``i + 0.5``. ``False``
        (mmcv's legacy option): no half-pixel shift, sizes raised to at least 1.

    Returns
    -------
    ndarray, shape (K, C, PH, PW)
    """
    rois, output_size, spatial_scale, sampling_ratio, aligned = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, aligned
    )
    x = channels_last(input)
    n, h, w, c = x.shape
    flat = x.reshape(n, h * w, c)
    out = np.zeros((rois.shape[0], output_size[0] * output_size[1], c), dtype=x.dtype)
    for k, image, pixels, m in _box_matrices(x, rois, output_size, spatial_scale, sampling_ratio, aligned):
        out[k] = m @ flat[image, pixels]
    return channels_first(out.reshape(rois.shape[0], *output_size, c), input.dtype)


def roi_align_rotated_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> np.ndarray:
    """Gradient of :func:`roi_align_rotated` with respect to ``input``.

    Each output's gradient, divided by the sample count, goes to the four corners of
    every sample of its bin with the bilinear weights (the transpose of the forward).

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio, aligned
        As in :func:`roi_align_rotated`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale, sampling_ratio, aligned = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, aligned
    )
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    x = channels_last(input)
    n, h, w, c = x.shape
    g = channels_last(grad_output).reshape(rois.shape[0], -1, c)
    grad = np.zeros((n, h * w, c), dtype=x.dtype)
    for k, image, pixels, m in _box_matrices(x, rois, output_size, spatial_scale, sampling_ratio, aligned):
        grad[image, pixels] += m.T @ g[k]
    return channels_first(grad.reshape(n, h, w, c), input.dtype)
