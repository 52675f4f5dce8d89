"""RoIPool (Fast R-CNN): max over integer bins of a C-rounded box.

Geometry comes from :func:`roilib.geometry.roi_pool_bins`. The maxima alone come from
:func:`._pooling.bin_max` (rows, then columns); with their positions, and the tie rule,
from :func:`._pooling.window_max`. The forward can return where each max came from
(``return_argmax=True``, torchvision's format); the backward accepts it back
(``argmax=``) and then only scatters, as torchvision's backward does with the argmax
its forward saved. Without it the backward finds the maxima again.
"""
from __future__ import annotations

import numpy as np

from .. import _validate as v
from ..geometry import roi_pool_bins
from ._layout import MapBlocks, compute_dtype
from ._pooling import bin_max, scratch, window_max


#: outputs scattered per step of the backward (an index array of 512 KiB, in cache)
_CHUNK = 1 << 16
#: boxes reading at least this many maps' worth of cells have the map copied
#: channels-last once for the maxima (every reduction then runs over contiguous
#: channel vectors); fewer boxes read their rows straight from the ``(N, C, H, W)`` map,
#: which costs more per cell but copies nothing. Measured on the benchmark's map.
VALUES_WHOLE_MAP_FRACTION = 2.5


def _check(input, rois, output_size, spatial_scale):
    v.check_input(input)
    return (
        v.check_rois(rois, input),
        v.check_output_size(output_size),
        v.check_spatial_scale(spatial_scale),
    )


def _extents(bins, h: int, w: int):
    """Each box's rows ``[r0, r1)`` and columns ``[c0, c1)`` (the union of its bins) and
    whether it reads the map at all."""
    r0, r1 = bins.hstart.min(axis=1, initial=h), bins.hend.max(axis=1, initial=0)
    c0, c1 = bins.wstart.min(axis=1, initial=w), bins.wend.max(axis=1, initial=0)
    touches = (r1 > r0) & (c1 > c0)
    return r0, r1, c0, c1, touches


def _values(input, rois, output_size, spatial_scale) -> np.ndarray:
    """Maxima ``(K, C, PH, PW)`` in the input's dtype (0 for empty bins), positions not
    tracked: each box's rows are reduced per bin row, then its columns per bin column.

    A max is exact in any dtype and in any order, so this runs in the input's dtype and
    equals :func:`_pool`'s values bit for bit."""
    n, c, h, w = input.shape
    ph, pw = output_size
    bins = roi_pool_bins(rois, output_size, spatial_scale, h, w, compute_dtype(input.dtype))
    r0, r1, c0, c1, touches = _extents(bins, h, w)
    cells = int(np.sum(np.where(touches, (r1 - r0) * (c1 - c0), 0)))
    hwc = None
    if cells >= VALUES_WHOLE_MAP_FRACTION * n * h * w:
        hwc = np.ascontiguousarray(input.transpose(0, 2, 3, 1))
    # bin edges relative to each box's block, as Python ints (read once per bin)
    hs, he = (bins.hstart - r0[:, None]).tolist(), (bins.hend - r0[:, None]).tolist()
    ws, we = (bins.wstart - c0[:, None]).tolist(), (bins.wend - c0[:, None]).tolist()
    image = rois[:, 0].astype(np.int64).tolist()
    r0, r1, c0, c1 = r0.tolist(), r1.tolist(), c0.tolist(), c1.tolist()
    out = np.zeros((rois.shape[0], c) + output_size, dtype=input.dtype)
    touching = np.flatnonzero(touches).tolist()
    widest = max((c1[k] - c0[k] for k in touching), default=0)
    work = [scratch(slot, ph * widest * c, input.dtype) for slot in (0, 1)]
    cols = scratch(2, pw * ph * c, input.dtype).reshape(pw, ph, c)
    for k in touching:
        span = c1[k] - c0[k]
        if hwc is not None:
            block = hwc[image[k], r0[k] : r1[k], c0[k] : c1[k]]  # (R, S, C)
            rows = bin_max(block, hs[k], he[k], work[0][: ph * span * c].reshape(ph, span, c))
        else:
            block = input[image[k], :, r0[k] : r1[k], c0[k] : c1[k]].transpose(1, 0, 2)  # (R, C, S)
            per_row = work[0][: ph * c * span].reshape(ph, c, span)
            bin_max(block, hs[k], he[k], per_row, rowwise=True)
            # columns next: make channels the last axis, so a bin column reduces
            # contiguous channel vectors; turning each bin row's (C, S) plane into (S, C)
            # is twice as fast as moving the columns in front of the bin rows
            rows = work[1][: ph * span * c].reshape(ph, span, c)
            np.copyto(rows, per_row.transpose(0, 2, 1))
        bin_max(rows.transpose(1, 0, 2), ws[k], we[k], cols)  # (S, PH, C) -> (PW, PH, C)
        out[k] = cols.transpose(2, 1, 0)
    return out


def _pool(input, rois, output_size, spatial_scale, with_arg):
    """Maxima ``(K, C, PH, PW)`` in the input's dtype and, with ``with_arg``, argmax (same shape).

    Each box's result is written straight into the ``(K, C, PH, PW)`` arrays, so no
    channels-last copy of the whole output is made."""
    n, c, h, w = input.shape
    dtype = compute_dtype(input.dtype)
    bins = roi_pool_bins(rois, output_size, spatial_scale, h, w, dtype)
    r0, r1 = bins.hstart.min(axis=1, initial=h), bins.hend.max(axis=1, initial=0)
    c0, c1 = bins.wstart.min(axis=1, initial=w), bins.wend.max(axis=1, initial=0)
    touches = (r1 > r0) & (c1 > c0)
    cells = int(np.sum(np.where(touches, (r1 - r0) * (c1 - c0), 0)))
    blocks = MapBlocks(input, cells)
    out = np.zeros((rois.shape[0], c) + output_size, dtype=input.dtype)
    arg = np.full(out.shape, -1, dtype=np.int64) if with_arg else None
    for k in np.flatnonzero(touches).tolist():
        a, b, e, f = int(r0[k]), int(r1[k]), int(c0[k]), int(c1[k])
        region = blocks.block(int(rois[k, 0]), a, b, e, f)
        row_bins = (bins.hstart[k] - a, bins.hend[k] - a)
        col_bins = (bins.wstart[k] - e, bins.wend[k] - e)
        values, ar, ac, empty = window_max(region, row_bins, col_bins, with_arg)
        out[k] = values.transpose(2, 0, 1)
        if with_arg:
            # torchvision's argmax: the flat index h * W + w in the map, -1 for empty bins
            arg[k] = np.where(empty[..., None], -1, (ar + a) * w + ac + e).transpose(2, 0, 1)
    return out, arg


def roi_pool(
    input: np.ndarray, rois, output_size, spatial_scale: float = 1.0, return_argmax: bool = False
):
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
    return_argmax : bool
        Also return where each max sits, for :func:`roi_pool_backward`'s ``argmax``
        (NumPy arrays; the CUDA backend does not take it yet).

    Returns
    -------
    ndarray, shape (K, C, PH, PW)
        Max of each bin (0 for empty bins), in the input's dtype.
    argmax : ndarray of int64, shape (K, C, PH, PW)
        Only with ``return_argmax``: the flat index ``h * W + w`` of each max in its
        image's map (the first in row-major order on ties), -1 for an empty bin; the
        layout of torchvision's ``roi_pool`` argmax.
    """
    rois, output_size, spatial_scale = _check(input, rois, output_size, spatial_scale)
    if not return_argmax:
        return _values(input, rois, output_size, spatial_scale)
    return _pool(input, rois, output_size, spatial_scale, with_arg=True)


def _check_argmax(argmax, shape, hw: int) -> np.ndarray:
    """Type and shape of a saved argmax. Its range is checked chunk by chunk as it is
    scattered, on the int64 copy in cache (:func:`_check_argmax_range`); only uint64,
    whose large values would wrap in that copy, is range-checked here."""
    if not isinstance(argmax, np.ndarray) or argmax.dtype.kind not in "iu":
        raise TypeError(f"argmax must be an integer NumPy array from roi_pool(..., return_argmax=True), got {type(argmax).__name__}")
    if argmax.shape != shape:
        raise ValueError(f"argmax must have shape {shape} (the forward's output), got {argmax.shape}")
    if argmax.dtype == np.uint64 and argmax.size and argmax.max() >= hw:
        _check_argmax_range(np.array([hw]), hw)
    return argmax


def _check_argmax_range(part: np.ndarray, hw: int) -> bool:
    """Raise unless every entry of ``part`` is -1 or in ``[0, hw)``; whether all are >= 0."""
    if part.size == 0:
        return True
    low = part.min()
    if low < -1 or part.max() >= hw:
        raise ValueError(f"argmax entries must be -1 or a flat index into the H*W = {hw} map")
    return bool(low >= 0)


def roi_pool_backward(
    grad_output: np.ndarray, input: np.ndarray, rois, output_size, spatial_scale: float = 1.0, argmax=None
) -> np.ndarray:
    """Gradient of :func:`roi_pool` with respect to ``input``.

    Each output's gradient goes to the pixel its max came from (the first such pixel in
    row-major order on ties); empty bins route nothing. Contributions are added in the
    order box, channel, bin (torchvision's loop order), so the result is deterministic
    and bitwise the same with or without ``argmax``.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale
        As in :func:`roi_pool`.
    argmax : ndarray of int, shape (K, C, PH, PW), optional
        The forward's argmax (``roi_pool(..., return_argmax=True)``) for these
        arguments. Saves finding the maxima again; it is trusted, not re-derived
        (only its shape, dtype and range are checked). NumPy arrays; the CUDA backend
        does not take it yet.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale = _check(input, rois, output_size, spatial_scale)
    out_shape = (rois.shape[0], input.shape[1]) + output_size
    v.check_grad_output(grad_output, out_shape, input)
    n, c, h, w = input.shape
    if argmax is None:
        _, argmax = _pool(input, rois, output_size, spatial_scale, with_arg=True)
    else:
        argmax = _check_argmax(argmax, out_shape, h * w)
    dtype = compute_dtype(input.dtype)
    grad = np.zeros(input.size, dtype=dtype)
    # flat NCHW index of each output's pixel: (image * C + channel) * H*W + argmax
    planes = (rois[:, 0].astype(np.int64)[:, None] * c + np.arange(c)[None, :]) * (h * w)
    # A pixel of one channel receives its adds in box order, then bin order, whatever
    # the channels do; so the scatter may go channel by channel (a few at a time), which
    # keeps the written planes and the index array in cache, and stays exact.
    per_channel = argmax.size // max(c, 1)
    step = max(1, _CHUNK // max(1, per_channel))
    arg_c = argmax.transpose(1, 0, 2, 3)
    values = grad_output.transpose(1, 0, 2, 3)
    planes_c = planes.T[:, :, None, None]
    size = min(step, c) * per_channel
    index_buffer, value_buffer = scratch(0, size, np.int64), scratch(1, size, dtype)
    for c0 in range(0, c, step):
        arg = arg_c[c0 : c0 + step]
        flat = index_buffer[: arg.size].reshape(arg.shape)
        part = value_buffer[: arg.size].reshape(arg.shape)
        np.copyto(flat, arg)  # gathered once, contiguous: add.at's fast path wants that
        routes_all = _check_argmax_range(flat, h * w)
        flat += planes_c[c0 : c0 + step]
        np.copyto(part, values[c0 : c0 + step])
        if not routes_all:  # empty bins (-1) route nothing
            routed = arg >= 0
            flat, part = flat[routed], part[routed]
        # add.at adds repeated indices one by one in array order (box, then bin)
        np.add.at(grad, flat.ravel(), part.ravel())
    return grad.reshape(input.shape).astype(input.dtype, copy=False)
