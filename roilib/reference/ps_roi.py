"""Position-sensitive RoIPool and RoIAlign (R-FCN, Dai et al. 2016), torchvision's semantics.

The input has ``C_out * PH * PW`` channels; output ``(c, ph, pw)`` pools input channel
``(c * PH + ph) * PW + pw`` (:func:`roilib.family.ps_channel`) over bin ``(ph, pw)``.
Channels-last, an image's channels reshape to ``(C_out, PH, PW)``, so bin ``(ph, pw)``
reads the slice ``[..., :, ph, pw]`` of every pixel.

* ``ps_roi_pool`` averages integer bins (:func:`roilib.family.ps_roi_pool_bins`); the
  sums come from a summed-area table (computed in float64), all boxes and bins at once,
  and the backward is its transpose (a difference array, then two cumulative sums).
* ``ps_roi_align`` is RoIAlign with ``aligned=True`` geometry
  (:func:`roilib.geometry.roi_align_boxes`), applied per bin to its own channel group.

Two places where roilib returns the mathematically consistent value and torchvision's
CPU op does not (documented in the API page and tested against its fixture):

* ``ps_roi_pool_backward`` is the exact transpose of the forward. torchvision's forward
  clips bins to ``[0, size - 1]`` but its backward clips them to ``[0, size]``, so it
  sends gradient to the last row/column, which its forward never reads.
* ``ps_roi_align`` divides by ``max(gh * gw, 1)``; torchvision divides by ``gh * gw``,
  which is 0 for an adaptive grid on a box of (nearly) zero or inverted size, and returns
  NaN there. roilib returns 0, like RoIAlign.
"""
from __future__ import annotations

import numpy as np

from .. import _validate as v
from ..family import ps_roi_pool_bins
from ._layout import add_block, channels_first, channels_last, take_block
from .roi_align import _boxes


def _check(input, rois, output_size, spatial_scale):
    v.check_input(input)
    rois = v.check_rois(rois, input)
    output_size = v.check_output_size(output_size)
    spatial_scale = v.check_spatial_scale(spatial_scale)
    out_channels = v.check_ps_channels(input, output_size)
    return rois, output_size, spatial_scale, out_channels


# -- PS-RoIPool ---------------------------------------------------------------------


def _pool_index(rois, output_size, spatial_scale, shape, dtype):
    """Flat summed-area-table indices of every bin's four corners, and bin areas.

    Returns ``corners`` (4, K, PH, PW) int64 pixel indices into an ``(N, H+1, W+1)``
    table (``[he, we], [hs, we], [he, ws], [hs, ws]``) and ``area`` (K, PH, PW), 0
    where the bin is empty.
    """
    n, h, w = shape
    bins = ps_roi_pool_bins(rois, output_size, spatial_scale, h, w, dtype)
    img = rois[:, 0].astype(np.int64)[:, None, None]
    hs, he = bins.hstart[:, :, None], bins.hend[:, :, None]
    ws, we = bins.wstart[:, None, :], bins.wend[:, None, :]
    empty = (he <= hs) | (we <= ws)
    area = np.where(empty, 0, (he - hs) * (we - ws))

    def at(r, c):
        return (img * (h + 1) + r) * (w + 1) + c

    corners = np.stack(np.broadcast_arrays(at(he, we), at(hs, we), at(he, ws), at(hs, ws)))
    return corners, area


def _cumulate(t: np.ndarray) -> np.ndarray:
    """In-place cumulative sums of ``(N, H, W, C)`` along H, then W.

    A loop of whole-plane additions: several times faster than ``np.cumsum`` along a
    middle axis, with the same additions in the same order.
    """
    for i in range(1, t.shape[1]):
        t[:, i] += t[:, i - 1]
    for j in range(1, t.shape[2]):
        t[:, :, j] += t[:, :, j - 1]
    return t


def _ps_diagonal(out_channels, output_size):
    """Channel index ``(c * PH + ph) * PW + pw`` laid out as ``(PH, PW, C_out)``."""
    ph, pw = output_size
    return np.arange(out_channels * ph * pw).reshape(out_channels, ph, pw).transpose(1, 2, 0)


def ps_roi_pool(input: np.ndarray, rois, output_size, spatial_scale: float = 1.0) -> np.ndarray:
    """Position-sensitive RoIPool forward (R-FCN; torchvision's ``ps_roi_pool``).

    The box corners are C-rounded on the map; the box is ``end - start`` pixels (at
    least 1); bin ``p`` spans ``[floor(p * len / P), ceil((p + 1) * len / P))`` from the
    start, clipped to ``[0, size - 1]`` (:func:`roilib.family.ps_roi_pool_bins`); the
    output is the bin's mean over its own channel group, 0 for an empty bin.

    Parameters
    ----------
    input : ndarray, shape (N, C_out * PH * PW, H, W)
    rois : ndarray (K, 5) or list of (K_i, 4) arrays
    output_size : int or (int, int)
    spatial_scale : float

    Returns
    -------
    ndarray, shape (K, C_out, PH, PW)
    """
    rois, output_size, spatial_scale, c_out = _check(input, rois, output_size, spatial_scale)
    x = channels_last(input)
    n, h, w, c = x.shape
    table = np.zeros((n, h + 1, w + 1, c), dtype=np.float64)
    table[:, 1:, 1:] = x
    table = _cumulate(table).reshape(-1, c)
    corners, area = _pool_index(rois, output_size, spatial_scale, (n, h, w), x.dtype)
    ch = _ps_diagonal(c_out, output_size)  # (PH, PW, C_out)
    cs = corners[..., None]  # (4, K, PH, PW, 1) against channels (PH, PW, C_out)
    s = table[cs[0], ch] - table[cs[1], ch] - table[cs[2], ch] + table[cs[3], ch]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(area[..., None] > 0, s / area[..., None], 0.0)
    return channels_first(out, input.dtype)


def ps_roi_pool_backward(grad_output: np.ndarray, input: np.ndarray, rois, output_size, spatial_scale: float = 1.0) -> np.ndarray:
    """Gradient of :func:`ps_roi_pool` with respect to ``input``.

    Every pixel of a non-empty bin receives the bin's gradient divided by its area, in
    the bin's channel. This is the exact transpose of the forward (torchvision's CPU
    backward differs at the map's last row and column; see the module docstring).

    Parameters
    ----------
    grad_output : ndarray, shape (K, C_out, PH, PW)
    input, rois, output_size, spatial_scale
        As in :func:`ps_roi_pool`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale, c_out = _check(input, rois, output_size, spatial_scale)
    v.check_grad_output(grad_output, (rois.shape[0], c_out) + output_size, input)
    n, c, h, w = input.shape
    g = channels_last(grad_output).astype(np.float64)  # (K, PH, PW, C_out)
    corners, area = _pool_index(rois, output_size, spatial_scale, (n, h, w), rois.dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(area[..., None] > 0, g / np.maximum(area, 1)[..., None], 0.0)
    ch = _ps_diagonal(c_out, output_size)
    size = n * (h + 1) * (w + 1) * c
    flat = corners[..., None] * c + ch  # (4, K, PH, PW, C_out)
    weights = np.array([1.0, -1.0, -1.0, 1.0])[:, None, None, None, None] * share
    # the transpose of "sum over [hs, he) x [ws, we)" is a 2-D difference array
    diff = np.bincount(flat.ravel(), weights=weights.ravel(), minlength=size)
    grad = _cumulate(diff.reshape(n, h + 1, w + 1, c))[:, :h, :w]
    return channels_first(grad, input.dtype)


# -- PS-RoIAlign ---------------------------------------------------------------------


def _align_boxes(shape, dtype, rois, output_size, spatial_scale, sampling_ratio):
    """Yield ``(k, image, box, Ay, Ax)`` per box touching the map (aligned geometry).

    ``Ay`` (PH, rows) and ``Ax`` (PW, cols) are the bin-summed interpolation weights.
    ``shape`` is the map's ``(N, H, W, C)``; the geometry reads no values.
    """
    stand_in = np.broadcast_to(np.zeros((), dtype=dtype), shape)
    for k, image, box, _ in _boxes(stand_in, rois, output_size, spatial_scale, sampling_ratio, True):
        yield k, image, box, box.bin_sum(box.by, 0), box.bin_sum(box.bx, 1)


def _grouped(x: np.ndarray, output_size) -> np.ndarray:
    """``(N, C_out*PH*PW, H, W)`` -> contiguous ``(N, H, W, PW, C_out*PH)`` (compute dtype).

    Channel ``(c * PH + ph) * PW + pw`` goes to ``[..., pw, c * PH + ph]``: for a fixed bin
    column ``pw`` the channels of all bins in it are contiguous, so a box's block needs no
    further copy before the column weights are applied.
    """
    n, c, h, w = x.shape
    ph, pw = output_size
    g = x.reshape(n, c // (ph * pw), ph, pw, h, w).transpose(0, 4, 5, 3, 1, 2)
    return np.ascontiguousarray(g, dtype=v.compute_dtype(x.dtype)).reshape(n, h, w, pw, c // pw)


def _ungrouped(g: np.ndarray, output_size, dtype) -> np.ndarray:
    """The inverse of :func:`_grouped`, cast to ``dtype``."""
    n, h, w, pw, rest = g.shape
    ph = output_size[0]
    out = g.reshape(n, h, w, pw, rest // ph, ph).transpose(0, 4, 5, 3, 1, 2)
    return np.ascontiguousarray(out, dtype=dtype).reshape(n, rest * pw, h, w)


def ps_roi_align(input: np.ndarray, rois, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1) -> np.ndarray:
    """Position-sensitive RoIAlign forward (torchvision's ``ps_roi_align``).

    RoIAlign's bilinear average with the half-pixel offset always on (``aligned=True``:
    no size clamp), bin ``(ph, pw)`` sampled in its own channel group. A box whose grid
    has no samples outputs 0 (torchvision: NaN; see the module docstring).

    Parameters
    ----------
    input : ndarray, shape (N, C_out * PH * PW, H, W)
    rois : ndarray (K, 5) or list of (K_i, 4) arrays
    output_size : int or (int, int)
    spatial_scale : float
    sampling_ratio : int
        Samples per bin and axis; ``<= 0``: ``ceil(roi_size / output_size)``.

    Returns
    -------
    ndarray, shape (K, C_out, PH, PW)
    """
    rois, output_size, spatial_scale, c_out = _check(input, rois, output_size, spatial_scale)
    sampling_ratio = v.check_sampling_ratio(sampling_ratio)
    x = _grouped(input, output_size)  # (N, H, W, Q, O*P)
    n, h, w, pw, op = x.shape
    ph = output_size[0]
    out = np.zeros((rois.shape[0], pw, c_out, ph), dtype=x.dtype)
    shape = (n, h, w, input.shape[1])
    for k, image, box, ay, ax in _align_boxes(shape, x.dtype, rois, output_size, spatial_scale, sampling_ratio):
        block = take_block(x[image], box.rows, box.cols)  # (R, S, Q, O*P)
        # t[q, r, (o, p)] = sum_s Ax[q, s] X[r, s, q, (o, p)]: one small product per (q, r)
        t = np.matmul(ax[:, None, None, :], block.transpose(2, 0, 1, 3))[:, :, 0]
        t = t.reshape(pw, -1, c_out, ph)  # (Q, R, O, P)
        # out[q, o, p] = sum_r Ay[p, r] t[q, r, o, p]
        out[k] = np.einsum("pr,qrop->qop", ay, t) / box.count
    return np.ascontiguousarray(out.transpose(0, 2, 3, 1), dtype=input.dtype)


def ps_roi_align_backward(
    grad_output: np.ndarray, input: np.ndarray, rois, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1
) -> np.ndarray:
    """Gradient of :func:`ps_roi_align` with respect to ``input``.

    Each output's gradient, divided by the sample count, is spread over the four
    corners of each of its samples with their bilinear weights, in its own channel.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C_out, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio
        As in :func:`ps_roi_align`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale, c_out = _check(input, rois, output_size, spatial_scale)
    sampling_ratio = v.check_sampling_ratio(sampling_ratio)
    v.check_grad_output(grad_output, (rois.shape[0], c_out) + output_size, input)
    n, c, h, w = input.shape
    ph, pw = output_size
    dtype = v.compute_dtype(input.dtype)
    g = np.ascontiguousarray(grad_output.transpose(0, 3, 1, 2), dtype=dtype)  # (K, Q, O, P)
    grad = np.zeros((n, h, w, pw, c // pw), dtype=dtype)
    for k, image, box, ay, ax in _align_boxes((n, h, w, c), dtype, rois, output_size, spatial_scale, sampling_ratio):
        gk = g[k] / box.count
        # u[r, q, (o, p)] = Ay[p, r] g[q, o, p]
        u = (ay.T[:, None, None, :] * gk[None]).reshape(ay.shape[1], pw, -1)
        # part[r, s, q, (o, p)] = Ax[q, s] u[r, q, (o, p)]
        part = ax.T[None, :, :, None] * u[:, None]
        add_block(grad[image], box.rows, box.cols, part)
    return _ungrouped(grad, output_size, input.dtype)
