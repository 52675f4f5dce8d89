"""Rotated RoIAlign (detectron2's ``ROIAlignRotated``; ``aligned=False`` as in mmcv).

Boxes are ``[batch_index, cx, cy, w, h, angle_degrees]``. The sample grid is RoIAlign's,
laid out in the box's own frame and rotated counter-clockwise about its centre
(:mod:`roilib.geometry_rotated`); each sample is a bilinear read with RoIAlign's
out-of-range rules, and a bin outputs the mean of its samples.

A rotated grid is not separable, so for one box the reference gathers the distinct
pixels its samples touch (``T`` of them) and builds the ``(PH*PW, T)`` matrix ``M`` of
summed bilinear weights per bin: the output is ``M X_T / count`` for all channels at
once, and the input gradient is the transpose, ``M^T g / count``, scattered back. The
box gradient (:func:`roi_align_rotated_rois_backward`) follows every sample through the
rotation, as :func:`roilib.roi_align_rois_backward` does for the axis-aligned grid.
"""
from __future__ import annotations

import numpy as np

from .. import _validate as v
from ..geometry import _bilinear_axis, sample_points
from ..geometry_rotated import box_to_map, roi_align_rotated_boxes, rotated_samples
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


def _centred_fraction(n_bins: int, grid: int, dtype) -> np.ndarray:
    """``(p + (i + 1/2)/g) / P - 1/2`` for every sample along one axis (bin-major)."""
    t = np.dtype(dtype).type
    j = np.arange(n_bins * grid)
    return (((j // grid) + ((j % grid) + t(0.5)) / t(grid)) / t(n_bins) - t(0.5)).astype(dtype)


def roi_align_rotated_rois_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> np.ndarray:
    """Gradient of :func:`roi_align_rotated` with respect to the boxes ``[cx, cy, w, h, angle]``.

    A sample sits at ``y = yy cos t - xx sin t + cy s - off`` and
    ``x = yy sin t + xx cos t + cx s - off`` with ``yy = h s (f_y - 1/2)``,
    ``xx = w s (f_x - 1/2)`` and ``f = (p + (i + 1/2)/g) / P`` its fraction of the box.
    So ``dy/dcy = dx/dcx = s``; ``dy/dh = s (f_y - 1/2) cos t``,
    ``dx/dh = s (f_y - 1/2) sin t``; ``dy/dw = -s (f_x - 1/2) sin t``,
    ``dx/dw = s (f_x - 1/2) cos t``; ``dy/dt = -yy sin t - xx cos t``,
    ``dx/dt = yy cos t - xx sin t`` (times ``pi / 180`` per degree). The bilinear value
    changes with ``y`` at rate ``(1 - lx)(X[yh, xl] - X[yl, xl]) + lx (X[yh, xh] - X[yl, xh])``
    and likewise with ``x``.

    As for :func:`roilib.roi_align_rois_backward`, where the output is not
    differentiable the result is the one-sided derivative of the formula as evaluated:
    the adaptive grid and the ``max(size, 1)`` raise of ``aligned=False`` are piecewise
    constant (a raised size gets no gradient), a sample on a whole-number coordinate
    gets the right-hand derivative, and clamped or out-of-range samples contribute 0.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio, aligned
        As in :func:`roi_align_rotated`.

    Returns
    -------
    ndarray, shape (K, 6)
        ``d loss / d [batch_index, cx, cy, w, h, angle_degrees]`` (the batch column is 0),
        in the input's dtype, in image pixels and degrees.
    """
    rois, output_size, spatial_scale, sampling_ratio, aligned = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, aligned
    )
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    x = channels_last(input)
    n, h, w, c = x.shape
    flat = x.reshape(n, h * w, c)
    g = channels_last(grad_output)
    dtype = x.dtype
    t = dtype.type
    ph, pw = output_size
    s = t(spatial_scale)
    boxes = roi_align_rotated_boxes(rois, output_size, spatial_scale, sampling_ratio, aligned, dtype)
    count = boxes.count.astype(dtype)
    raised_w = np.zeros(len(rois), bool) if aligned else rois[:, 3] * s < t(1)
    raised_h = np.zeros(len(rois), bool) if aligned else rois[:, 4] * s < t(1)
    grad = np.zeros((rois.shape[0], 6), dtype=dtype)
    for k in range(rois.shape[0]):
        gh, gw = int(boxes.grid_h[k]), int(boxes.grid_w[k])
        if gh <= 0 or gw <= 0:
            continue
        yy = sample_points(-boxes.height[k] / t(2), boxes.bin_h[k], gh, ph, dtype)[:, None]
        xx = sample_points(-boxes.width[k] / t(2), boxes.bin_w[k], gw, pw, dtype)[None, :]
        y, xs = box_to_map(boxes, k, yy, xx)
        ylo, yhi, wyl, wyh, vy, sy, _ = _bilinear_axis(y.ravel(), h)
        xlo, xhi, wxl, wxh, vx, sx, _ = _bilinear_axis(xs.ravel(), w)
        ok = vy & vx
        if not ok.any():
            continue
        img = flat[int(rois[k, 0])]
        v1, v2 = img[ylo * w + xlo], img[ylo * w + xhi]  # (S, C)
        v3, v4 = img[yhi * w + xlo], img[yhi * w + xhi]
        dv_dy = (wxl[:, None] * (v3 - v1) + wxh[:, None] * (v4 - v2)) * np.where(ok, sy, t(0))[:, None]
        dv_dx = (wyl[:, None] * (v2 - v1) + wyh[:, None] * (v4 - v3)) * np.where(ok, sx, t(0))[:, None]
        # each sample's output gradient, divided by the sample count
        bins = (np.arange(ph * gh) // gh)[:, None] * pw + (np.arange(pw * gw) // gw)[None, :]
        gk = g[k].reshape(ph * pw, c)[bins.ravel()] / count[k]  # (S, C)
        gy = (dv_dy * gk).sum(axis=1).reshape(y.shape)
        gx = (dv_dx * gk).sum(axis=1).reshape(y.shape)
        cos, sin = boxes.cos[k], boxes.sin[k]
        fy = _centred_fraction(ph, gh, dtype)[:, None]  # f_y - 1/2
        fx = _centred_fraction(pw, gw, dtype)[None, :]
        d_cx = gx.sum() * s
        d_cy = gy.sum() * s
        d_w = t(0) if raised_w[k] else ((gx * cos - gy * sin) * fx).sum() * s
        d_h = t(0) if raised_h[k] else ((gy * cos + gx * sin) * fy).sum() * s
        d_t = (gy * (-yy * sin - xx * cos) + gx * (yy * cos - xx * sin)).sum() * t(np.pi / 180.0)
        grad[k, 1:] = [d_cx, d_cy, d_w, d_h, d_t]
    return grad.astype(input.dtype)
