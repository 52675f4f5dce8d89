"""Precise RoI Pooling (IoU-Net): the exact average of the bilinear interpolant over each bin.

As the authors' ``PreciseRoIPooling`` and mmcv's ``prroi_pool`` define it: pixel ``i`` at
coordinate ``i``, the interpolant 0 outside the map, no sampling ratio. With
``W_y`` (PH x rows) and ``W_x`` (PW x columns) the exact 1-D integrals of the bilinear
kernel over each bin (:func:`roilib.geometry_prroi.pixel_weights`), one box's output is

    ``out = W_y X W_x^T / area``   (all channels at once, ``area = bin_h * bin_w``),

its input gradient the transpose ``W_y^T g W_x / area``, and its box gradient follows
from ``d W / d edge = +-k(edge - j)`` and ``d area / d edge``
(:func:`prroi_pool_rois_backward`).
"""
from __future__ import annotations

import numpy as np

from .. import _validate as v
from ..geometry_prroi import bin_edges, pixel_weights, prroi_boxes
from ._layout import channels_first, channels_last, take_block


def _check(input, rois, output_size, spatial_scale):
    v.check_input(input)
    return v.check_rois(rois, input), v.check_output_size(output_size), v.check_spatial_scale(spatial_scale)


class _PrBox:
    """One box's bins and weight matrices (see the module docstring)."""

    def __init__(self, boxes, k, output_size, height, width, dtype, derivatives=False):
        ph, pw = output_size
        self.area = boxes.area[k]
        self.bin_h, self.bin_w = boxes.bin_h[k], boxes.bin_w[k]
        self.y0, self.y1 = bin_edges(boxes.y1[k], boxes.bin_h[k], ph, dtype)
        self.x0, self.x1 = bin_edges(boxes.x1[k], boxes.bin_w[k], pw, dtype)
        self.rows, self.wy, *dy = pixel_weights(self.y0, self.y1, height, derivatives)
        self.cols, self.wx, *dx = pixel_weights(self.x0, self.x1, width, derivatives)
        if derivatives:
            self.ky0, self.ky1 = dy
            self.kx0, self.kx1 = dx

    @property
    def empty(self) -> bool:
        """Zero area, or no pixel of the map under the box: output 0, no gradient."""
        return not self.area > 0 or self.rows.size == 0 or self.cols.size == 0


def _boxes(x_hwc, rois, output_size, spatial_scale, derivatives=False):
    _, h, w, _ = x_hwc.shape
    boxes = prroi_boxes(rois, output_size, spatial_scale, x_hwc.dtype)
    for k in range(rois.shape[0]):
        box = _PrBox(boxes, k, output_size, h, w, x_hwc.dtype, derivatives)
        if not box.empty:
            yield k, int(rois[k, 0]), box


def _sandwich(left, block, right):
    """``left @ block @ right.T`` for a ``(rows, cols, C)`` block -> ``(left.rows, right.rows, C)``."""
    t = right @ block  # (rows, right.rows, C)
    return (left @ t.reshape(t.shape[0], -1)).reshape(left.shape[0], right.shape[0], -1)


def prroi_pool(input: np.ndarray, rois, output_size, spatial_scale: float = 1.0) -> np.ndarray:
    """Precise RoI Pooling forward.

    Parameters
    ----------
    input : ndarray, shape (N, C, H, W)
        Feature map, float16/32/64 (float16 is computed in float32).
    rois : ndarray (K, 5) or list of (K_i, 4) arrays
        ``[batch_index, x1, y1, x2, y2]`` in image pixels.
    output_size : int or (int, int)
        ``(PH, PW)``.
    spatial_scale : float
        Feature-map pixels per image pixel.

    Returns
    -------
    ndarray, shape (K, C, PH, PW)
        Each bin's exact mean of the bilinear interpolant; 0 for a box of zero width or
        height (or an inverted one).
    """
    rois, output_size, spatial_scale = _check(input, rois, output_size, spatial_scale)
    x = channels_last(input)
    out = np.zeros((rois.shape[0],) + output_size + (x.shape[3],), dtype=x.dtype)
    for k, image, box in _boxes(x, rois, output_size, spatial_scale):
        out[k] = _sandwich(box.wy, take_block(x[image], box.rows, box.cols), box.wx) / box.area
    return channels_first(out, input.dtype)


def prroi_pool_backward(grad_output: np.ndarray, input: np.ndarray, rois, output_size, spatial_scale: float = 1.0) -> np.ndarray:
    """Gradient of :func:`prroi_pool` with respect to ``input``.

    Pixel ``(i, j)`` receives ``sum_bins g * K_y(i) * K_x(j) / area``: each bin's
    gradient spread with the exact integral weights (the transpose of the forward).

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale
        As in :func:`prroi_pool`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale = _check(input, rois, output_size, spatial_scale)
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    x = channels_last(input)
    g = channels_last(grad_output)
    grad = np.zeros_like(x)
    for k, image, box in _boxes(x, rois, output_size, spatial_scale):
        part = _sandwich(box.wy.T, g[k] / box.area, box.wx.T)
        grad[image, box.rows[0] : box.rows[-1] + 1, box.cols[0] : box.cols[-1] + 1] += part
    return channels_first(grad, input.dtype)


def prroi_pool_rois_backward(grad_output: np.ndarray, input: np.ndarray, rois, output_size, spatial_scale: float = 1.0) -> np.ndarray:
    """Gradient of :func:`prroi_pool` with respect to the box coordinates (exact).

    For a bin ``[x0, x1] x [y0, y1]`` with integral ``S`` and area ``A``, the output is
    ``O = S / A`` and moving an edge changes ``S`` by the line integral of the
    interpolant along that edge: ``dO/dx0 = (-int_y0^y1 f(x0, y) dy + O (y1 - y0)) / A``,
    ``dO/dx1 = (int_y0^y1 f(x1, y) dy - O (y1 - y0)) / A`` (IoU-Net's Eq. 3), and
    likewise in ``y``. The bin edges are affine in the box: ``x0 = x1_box*s + bin_w*pw``
    moves with ``x1_box`` at rate ``s (1 - pw/PW)`` and with ``x2_box`` at ``s pw/PW``;
    ``x1 = x0 + bin_w`` at ``s (1 - (pw+1)/PW)`` and ``s (pw+1)/PW``.

    The interpolant is continuous, so this is the derivative everywhere except where the
    box has zero width or height (or is inverted), where the output is the constant 0
    and so is the returned gradient.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale
        As in :func:`prroi_pool`.

    Returns
    -------
    ndarray, shape (K, 5)
        ``d loss / d [batch_index, x1, y1, x2, y2]`` (the batch column is 0), in the
        input's dtype, in image-pixel units.
    """
    rois, output_size, spatial_scale = _check(input, rois, output_size, spatial_scale)
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    x = channels_last(input)
    g = channels_last(grad_output)
    dtype = x.dtype
    t = dtype.type
    ph, pw = output_size
    s = t(spatial_scale)
    fy0 = np.arange(ph, dtype=dtype) / t(ph)
    fy1 = np.arange(1, ph + 1, dtype=dtype) / t(ph)
    fx0 = np.arange(pw, dtype=dtype) / t(pw)
    fx1 = np.arange(1, pw + 1, dtype=dtype) / t(pw)
    grad = np.zeros((rois.shape[0], 5), dtype=dtype)
    for k, image, box in _boxes(x, rois, output_size, spatial_scale, derivatives=True):
        block = take_block(x[image], box.rows, box.cols)
        out = _sandwich(box.wy, block, box.wx) / box.area
        # line integrals along each bin's four edges, per channel: (PH, PW, C)
        at_x0 = _sandwich(box.wy, block, box.kx0)
        at_x1 = _sandwich(box.wy, block, box.kx1)
        at_y0 = _sandwich(box.ky0, block, box.wx)
        at_y1 = _sandwich(box.ky1, block, box.wx)
        gk = g[k]
        d_x0 = ((-at_x0 + out * box.bin_h) * gk).sum(axis=(0, 2)) / box.area  # (PW,)
        d_x1 = ((at_x1 - out * box.bin_h) * gk).sum(axis=(0, 2)) / box.area
        d_y0 = ((-at_y0 + out * box.bin_w) * gk).sum(axis=(1, 2)) / box.area  # (PH,)
        d_y1 = ((at_y1 - out * box.bin_w) * gk).sum(axis=(1, 2)) / box.area
        grad[k, 1] = (d_x0 @ (t(1) - fx0) + d_x1 @ (t(1) - fx1)) * s
        grad[k, 2] = (d_y0 @ (t(1) - fy0) + d_y1 @ (t(1) - fy1)) * s
        grad[k, 3] = (d_x0 @ fx0 + d_x1 @ fx1) * s
        grad[k, 4] = (d_y0 @ fy0 + d_y1 @ fy1) * s
    return grad.astype(input.dtype)
