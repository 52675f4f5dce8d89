"""Rotated RoIAlign's geometry: where the samples of a rotated box lie.

A rotated box is a row ``[batch_index, cx, cy, w, h, angle]`` in image pixels, the angle
in degrees, counter-clockwise as seen on the image (whose y axis points down), as in
detectron2's ``ROIAlignRotated``. The box is laid out in its own frame first, centred
on the origin: bin ``(ph, pw)`` holds the samples

    ``yy = -h/2 + ph * bin_h + (iy + 0.5) * bin_h / g_h``  (and ``xx`` likewise),

exactly RoIAlign's grid (:func:`roilib.geometry.sample_points`). Each sample is then
rotated about the centre and moved onto the map:

    ``y = yy * cos(t) - xx * sin(t) + cy``,   ``x = yy * sin(t) + xx * cos(t) + cx``,

with ``cx = cx_image * s - off`` and ``off = 0.5`` when ``aligned`` (detectron2 always
aligns; ``aligned=False`` is mmcv's option, which also raises ``w`` and ``h`` to at
least 1). The bilinear read and its out-of-range rules are RoIAlign's
(:func:`roilib.geometry.bilinear_corners`).

``cos(t)`` and ``sin(t)`` are computed once per box, in float64 from the angle, then
rounded to the arithmetic dtype (:func:`angle_cos_sin`); the kernels receive these very
numbers from their host code, so the reference and the kernels rotate by the same two
numbers. (detectron2 evaluates them in the arithmetic dtype; the two can differ in the
last bit of a float32.) At angle 0 they are exactly 1 and 0 and the grid is RoIAlign's
(``aligned=True``) on the box ``[cx - w/2, cy - h/2, cx + w/2, cy + h/2]``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

import numpy as np

from .geometry import _bilinear_axis, sample_points

__all__ = [
    "RotatedBoxes",
    "roi_align_rotated_boxes",
    "rotated_sample_points",
    "box_to_map",
    "RotatedSamples",
    "rotated_samples",
    "rotated_corners",
    "to_axis_aligned",
    "angle_cos_sin",
]


@dataclass(frozen=True)
class RotatedBoxes:
    """Per-box quantities of rotated RoIAlign on the feature map, shape ``(K,)`` each.

    Attributes
    ----------
    cx, cy : ndarray
        Centre in feature-map coordinates (``cx_image * s - off``).
    width, height : ndarray
        Box size in feature-map pixels (raised to 1 when ``aligned=False``).
    cos, sin : ndarray
        Of the angle, in the arithmetic dtype.
    bin_h, bin_w : ndarray
        ``height / PH`` and ``width / PW``.
    grid_h, grid_w : ndarray of int64
        Samples per bin and axis (``sampling_ratio`` or ``ceil(size / P)``).
    """

    cx: np.ndarray
    cy: np.ndarray
    width: np.ndarray
    height: np.ndarray
    cos: np.ndarray
    sin: np.ndarray
    bin_h: np.ndarray
    bin_w: np.ndarray
    grid_h: np.ndarray
    grid_w: np.ndarray

    @property
    def count(self) -> np.ndarray:
        """Divisor of the average: ``max(grid_h * grid_w, 1)``."""
        return np.maximum(self.grid_h * self.grid_w, 1)


def angle_cos_sin(angle_degrees, dtype) -> Tuple[np.ndarray, np.ndarray]:
    """``cos`` and ``sin`` of angles in degrees: computed in float64, rounded to ``dtype``."""
    theta = np.asarray(angle_degrees, dtype=np.float64) * (np.pi / 180.0)
    return np.cos(theta).astype(dtype), np.sin(theta).astype(dtype)


def roi_align_rotated_boxes(
    rois: np.ndarray,
    output_size: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool = True,
    dtype=np.float64,
) -> RotatedBoxes:
    """Rotated RoIAlign's per-box geometry (detectron2's ``ROIAlignRotated``).

    Parameters
    ----------
    rois : ndarray, shape (K, 6)
        ``[batch_index, cx, cy, w, h, angle_degrees]`` in image pixels.
    output_size : (int, int)
        ``(PH, PW)``.
    spatial_scale : float
        Feature-map pixels per image pixel.
    sampling_ratio : int
        Samples per bin and axis; ``<= 0`` means ``ceil(size / P)``.
    aligned : bool
        Shift the centre by half a pixel (pixel ``i`` at ``i + 0.5``); when False the
        size is raised to at least 1 (mmcv).
    dtype : numpy dtype
        Arithmetic dtype.

    Returns
    -------
    RotatedBoxes
    """
    t = np.dtype(dtype).type
    ph, pw = output_size
    r = np.asarray(rois, dtype=dtype)
    s = t(spatial_scale)
    off = t(0.5) if aligned else t(0)
    cx, cy = r[:, 1] * s - off, r[:, 2] * s - off
    width, height = r[:, 3] * s, r[:, 4] * s
    if not aligned:
        width, height = np.maximum(width, t(1)), np.maximum(height, t(1))
    cos, sin = angle_cos_sin(r[:, 5], dtype)
    bin_h, bin_w = height / t(ph), width / t(pw)
    if sampling_ratio > 0:
        gh = np.full(len(r), sampling_ratio, dtype=np.int64)
        gw = gh.copy()
    else:
        gh = np.maximum(np.ceil(height / t(ph)), 0).astype(np.int64)
        gw = np.maximum(np.ceil(width / t(pw)), 0).astype(np.int64)
    return RotatedBoxes(cx, cy, width, height, cos, sin, bin_h, bin_w, gh, gw)


def rotated_sample_points(boxes: RotatedBoxes, k: int, output_size: Tuple[int, int]):
    """The sample positions of box ``k`` on the map.

    Parameters
    ----------
    boxes : RotatedBoxes
    k : int
        Which box.
    output_size : (int, int)
        ``(PH, PW)``.

    Returns
    -------
    y, x : ndarray, shape (PH * g_h, PW * g_w)
        Row ``ph * g_h + iy``, column ``pw * g_w + ix`` is sample ``(iy, ix)`` of bin
        ``(ph, pw)``. Evaluated as ``(yy * cos - xx * sin) + cy`` and
        ``(yy * sin + xx * cos) + cx``, the kernels' order.
    """
    ph, pw = output_size
    dtype = boxes.cx.dtype
    t = dtype.type
    gh, gw = int(boxes.grid_h[k]), int(boxes.grid_w[k])
    yy = sample_points(-boxes.height[k] / t(2), boxes.bin_h[k], gh, ph, dtype)[:, None]
    xx = sample_points(-boxes.width[k] / t(2), boxes.bin_w[k], gw, pw, dtype)[None, :]
    return box_to_map(boxes, k, yy, xx)


def box_to_map(boxes: RotatedBoxes, k: int, yy, xx):
    """Points ``(yy, xx)`` of box ``k``'s own frame (origin at its centre) on the map.

    ``y = (yy * cos - xx * sin) + cy`` and ``x = (yy * sin + xx * cos) + cx``: a
    counter-clockwise rotation as seen on the image (y pointing down), then the move to
    the centre. Arrays broadcast.
    """
    c, s = boxes.cos[k], boxes.sin[k]
    y = (yy * c - xx * s) + boxes.cy[k]
    x = (yy * s + xx * c) + boxes.cx[k]
    return y, x


@dataclass(frozen=True)
class RotatedSamples:
    """One rotated box's samples with their bilinear corners (RoIAlign's rules).

    Fields have shape ``(PH * g_h, PW * g_w)`` (positions) or ``(PH * g_h, PW * g_w, 4)``
    (the four corners: ``(y_low, x_low), (y_low, x_high), (y_high, x_low),
    (y_high, x_high)``).

    Attributes
    ----------
    y, x : ndarray
        Sample positions.
    index : ndarray of int64
        Flat pixel index ``row * W + col`` of each corner (0 where the sample is out of
        range).
    weight : ndarray
        Bilinear weight of each corner (0 where the sample is out of range).
    grid : (int, int)
        ``(g_h, g_w)``.
    """

    y: np.ndarray
    x: np.ndarray
    index: np.ndarray
    weight: np.ndarray
    grid: Tuple[int, int]

    @property
    def valid(self) -> np.ndarray:
        """False for samples beyond ``[-1, H] x [-1, W]`` (they read 0 but still count)."""
        return self.weight.sum(axis=-1) > 0

    def bins(self, output_size: Tuple[int, int]) -> np.ndarray:
        """Flat bin index ``ph * PW + pw`` of every sample, shape like ``y``."""
        ph, pw = output_size
        gh, gw = self.grid
        rows = np.arange(ph * gh) // max(gh, 1)
        cols = np.arange(pw * gw) // max(gw, 1)
        return rows[:, None] * pw + cols[None, :]


def rotated_samples(boxes: RotatedBoxes, k: int, output_size: Tuple[int, int], height: int, width: int) -> RotatedSamples:
    """Sample positions of box ``k`` and their four bilinear corners on an ``(H, W)`` map.

    Parameters
    ----------
    boxes : RotatedBoxes
    k : int
    output_size : (int, int)
    height, width : int
        Map size.

    Returns
    -------
    RotatedSamples
    """
    y, x = rotated_sample_points(boxes, k, output_size)
    ylo, yhi, wyl, wyh, vy, _, _ = _bilinear_axis(y.ravel(), height)
    xlo, xhi, wxl, wxh, vx, _, _ = _bilinear_axis(x.ravel(), width)
    valid = vy & vx
    index = np.stack([ylo * width + xlo, ylo * width + xhi, yhi * width + xlo, yhi * width + xhi], axis=-1)
    weight = np.stack([wyl * wxl, wyl * wxh, wyh * wxl, wyh * wxh], axis=-1)
    index = np.where(valid[:, None], index, 0)
    weight = np.where(valid[:, None], weight, weight.dtype.type(0))
    shape = y.shape + (4,)
    gh, gw = int(boxes.grid_h[k]), int(boxes.grid_w[k])
    return RotatedSamples(y, x, index.reshape(shape), weight.reshape(shape), (gh, gw))


def rotated_corners(roi, spatial_scale: float = 1.0, aligned: bool = True) -> np.ndarray:
    """The four corners of a rotated box on the feature map, for drawing.

    Parameters
    ----------
    roi : sequence of 6 floats
        ``[batch_index, cx, cy, w, h, angle_degrees]``.
    spatial_scale : float
    aligned : bool
        Apply the half-pixel shift of the centre (as the op does).

    Returns
    -------
    ndarray, shape (4, 2)
        ``(x, y)`` of the box-frame corners ``(-w/2, -h/2), (w/2, -h/2), (w/2, h/2),
        (-w/2, h/2)`` after rotation, in that order.
    """
    b = roi_align_rotated_boxes(np.asarray([roi], dtype=np.float64), (1, 1), spatial_scale, 1, aligned)
    hw, hh = b.width[0] / 2, b.height[0] / 2
    xx = np.array([-hw, hw, hw, -hw])
    yy = np.array([-hh, -hh, hh, hh])
    c, s = b.cos[0], b.sin[0]
    return np.stack([yy * s + xx * c + b.cx[0], yy * c - xx * s + b.cy[0]], axis=1)


def to_axis_aligned(rois: np.ndarray) -> np.ndarray:
    """``[b, cx, cy, w, h, angle]`` -> ``[b, cx - w/2, cy - h/2, cx + w/2, cy + h/2]`` (angle dropped).

    The box that ``roi_align(aligned=True)`` must sample exactly like
    ``roi_align_rotated`` does at angle 0.
    """
    r = np.asarray(rois)
    half_w, half_h = r[:, 3] / 2, r[:, 4] / 2
    return np.stack([r[:, 0], r[:, 1] - half_w, r[:, 2] - half_h, r[:, 1] + half_w, r[:, 2] + half_h], axis=1)
