"""RoIWarp: the RoI warping layer of MNC (Dai, He and Sun, 2016), forward and backward.

The layer as MNC's own Caffe code defines it (``daijifeng001/caffe-mnc``,
``src/caffe/layers/roi_warping_layer.cu``; rules in :func:`roilib.geometry.warp_axis`):

* box corners scaled and C-rounded, like RoIPool, but no ``+ 1`` on the width;
* in every bin, bilinear samples from the bin's start to its end *inclusive*, in steps
  of ``1 / ceil(roi / P)``;
* a sample beyond half a cell outside the map (``y < -0.5`` or ``y > H - 0.5``) is
  skipped, not read as 0; inside, the reading follows RoIAlign's clamp rule;
* the output is the largest sample (a sample must beat ``-FLT_MAX``), 0 when none.

The input gradient flows through the winning sample's four corners. MNC also
differentiates the output with respect to the box; the rounding has derivative 0
almost everywhere, so, like MNC, :func:`roi_warp_rois_backward` treats it as the
identity and differentiates the warp in its (rounded) corners.

Every value is computed in the order the kernels (``roilib/cuda/kernels/roi_warp.cu``)
compute it, so their CPU build agrees with this module bit for bit in the forward pass.
"""
from __future__ import annotations

from typing import Iterator, NamedTuple, Tuple

import numpy as np

from .. import _validate as v
from ..geometry import WARP_FLOOR, WarpAxis, quantize_boxes, warp_axis
from ._layout import MapBlocks, cells_read, channels_first, channels_last
from ._pooling import _first_hit


class _Taps(NamedTuple):
    """One axis of the bilinear reads of a set of samples (arrays of equal shape)."""

    inside: np.ndarray  # the sample is read at all (within half a cell of the map)
    moving: np.ndarray  # the value follows the coordinate (not clamped at an edge)
    lo: np.ndarray
    hi: np.ndarray
    wlo: np.ndarray
    whi: np.ndarray


def _taps(coord: np.ndarray, size: int, present: np.ndarray) -> _Taps:
    """MNC's 1-D bilinear rule for the samples ``coord`` on an axis of ``size`` cells."""
    t = coord.dtype.type
    inside = present & ~((coord < t(-0.5)) | (coord > t(size) - t(0.5)))
    c = np.where(inside & (coord > t(0)), coord, t(0))  # y <= 0 reads row 0
    lo = c.astype(np.int64)  # c >= 0: truncation is floor
    at_end = lo >= size - 1
    lo = np.where(at_end, size - 1, lo)
    hi = np.where(at_end, size - 1, lo + 1)
    c = np.where(at_end, lo.astype(coord.dtype), c)
    whi = c - lo.astype(coord.dtype)
    wlo = t(1) - whi
    moving = inside & (coord > t(0)) & ~at_end
    return _Taps(inside, moving, lo, hi, wlo, whi)


class _Box(NamedTuple):
    """Everything one box needs: its axes, their taps and the winning samples."""

    k: int
    image: int
    ys: WarpAxis
    xs: WarpAxis
    ty: _Taps
    tx: _Taps
    corners: Tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # v1..v4, (PH, ny, PW, nx, C)
    win_y: np.ndarray  # (PH, PW, C) winning sample's row index within its bin, -1: none
    win_x: np.ndarray
    out: np.ndarray  # (PH, PW, C)


def _boxes(x, rois: np.ndarray, corners: np.ndarray, output_size, sampling_ratio) -> Iterator[_Box]:
    """Evaluate every box on the map ``x`` (a :class:`MapBlocks`, or a channels-last
    ``(N, H, W, C)`` array); ``corners`` are ``(K, 4)`` ``[x1, y1, x2, y2]`` on the map
    (rounded by the public functions)."""
    if isinstance(x, np.ndarray):
        x = MapBlocks.of_channels_last(x)
    _, channels, height, width = x.shape
    ph, pw = output_size
    dtype = x.dtype
    t = dtype.type
    for k in range(rois.shape[0]):
        image = int(rois[k, 0])
        x1, y1, x2, y2 = corners[k]
        ys = warp_axis(y1, y2, ph, sampling_ratio, dtype)
        xs = warp_axis(x1, x2, pw, sampling_ratio, dtype)
        ty = _taps(ys.coord, height, ys.present)
        tx = _taps(xs.coord, width, xs.present)
        # the four corners of every sample, (PH, ny, PW, nx, C) each: np.take of flat
        # pixel indices gathers whole channel vectors faster than two index arrays
        plane, (r0, c0), stride = _plane(x, image, ty, tx)
        clip_y, clip_x = plane.shape[0] // stride - 1, stride - 1
        # samples that are not read may point anywhere: clipped into the block, their
        # values are never used
        lo_y, hi_y = (np.clip(a - r0, 0, clip_y) * stride for a in (ty.lo, ty.hi))
        lo_x, hi_x = (np.clip(a - c0, 0, clip_x) for a in (tx.lo, tx.hi))
        rows_lo, rows_hi = lo_y[:, :, None, None], hi_y[:, :, None, None]
        cols_lo, cols_hi = lo_x[None, None], hi_x[None, None]
        v1, v2 = np.take(plane, rows_lo + cols_lo, axis=0), np.take(plane, rows_lo + cols_hi, axis=0)
        v3, v4 = np.take(plane, rows_hi + cols_lo, axis=0), np.take(plane, rows_hi + cols_hi, axis=0)
        wly, why = ty.wlo[:, :, None, None, None], ty.whi[:, :, None, None, None]
        wlx, whx = tx.wlo[None, None, :, :, None], tx.whi[None, None, :, :, None]
        # w1 * v1 + w2 * v2 + w3 * v3 + w4 * v4, left to right, as the kernel adds them
        val = (wly * wlx) * v1
        val += (wly * whx) * v2
        val += (why * wlx) * v3
        val += (why * whx) * v4
        # a sample must be read and beat -FLT_MAX to win: NaN never does (fmax drops it),
        # nor a sample outside the map; a bin whose best is not above -FLT_MAX has none
        np.fmax(val, t(-np.inf), out=val)
        read = ty.inside[:, :, None, None] & tx.inside[None, None]
        if not read.all():
            val[~read] = -np.inf
        best, win_y, win_x = _first_max(val)
        won = best > t(WARP_FLOOR)
        out = np.where(won, best, t(0))
        win_y[~won] = -1
        win_x[~won] = -1
        yield _Box(k, image, ys, xs, ty, tx, (v1, v2, v3, v4), win_y, win_x, out)


def _plane(x: MapBlocks, image: int, ty: _Taps, tx: _Taps):
    """The pixels a box reads as a ``(pixels, C)`` array, the map position of its first
    pixel, and its row stride: the whole image when the map is channels-last already,
    else just the block the box's read samples touch."""
    _, channels, height, width = x.shape
    if x.hwc is not None:
        return x.hwc[image].reshape(height * width, channels), (0, 0), width
    if not (ty.inside.any() and tx.inside.any()):  # nothing is read: any pixel will do
        return x.block(image, 0, 1, 0, 1).reshape(1, channels), (0, 0), 1
    r0, r1 = int(ty.lo[ty.inside].min()), int(ty.hi[ty.inside].max()) + 1
    c0, c1 = int(tx.lo[tx.inside].min()), int(tx.hi[tx.inside].max()) + 1
    return x.block(image, r0, r1, c0, c1).reshape(-1, channels), (r0, c0), c1 - c0


def _first_max(val: np.ndarray):
    """The largest sample of each bin and where it is, as a C loop with a strict ``>``
    over the samples in row-major order finds it: the first maximal one.

    ``val`` is ``(PH, ny, PW, nx, C)`` without NaN. Each row of samples is reduced
    across its columns, then the rows: the first row holding the bin's max, and in it
    the first column holding it, is the first maximal sample in row-major order. The
    reductions run over whole ``(PH, PW, C)`` slices, never along a short strided axis.

    Returns
    -------
    best : ndarray (PH, PW, C)
        The winning sample's value (its own sign of zero, too).
    win_y, win_x : ndarray of int64 (PH, PW, C)
    """
    row_best = val.max(axis=3)  # (PH, ny, PW, C)
    row_arg = _first_hit(val, row_best, 3)
    best = row_best.max(axis=1)
    win_y = _first_hit(row_best, best, 1)
    win_x = np.take_along_axis(row_arg, win_y[:, None], axis=1)[:, 0]
    zero = best == 0
    if zero.any():  # max() may return either zero when +0 and -0 tie; the loop keeps the first
        ph, pw, c = best.shape
        p, q, ch = np.nonzero(zero)
        best[zero] = val[p, win_y[zero], q, win_x[zero], ch]
    return best, win_y, win_x


def _winning(box: _Box, field: np.ndarray, axis: int) -> np.ndarray:
    """``field`` (``(P, n)`` of one axis) at each output's winning sample, ``(PH, PW, C)``."""
    ph, pw, _ = box.out.shape
    if axis == 0:
        return field[np.arange(ph)[:, None, None], np.maximum(box.win_y, 0)]
    return field[np.arange(pw)[None, :, None], np.maximum(box.win_x, 0)]


def _check(input, rois, output_size, spatial_scale, sampling_ratio, mode):
    v.check_input(input)
    rois = v.check_rois(rois, input)
    output_size = v.check_output_size(output_size)
    spatial_scale = v.check_spatial_scale(spatial_scale)
    sampling_ratio = v.check_sampling_ratio(sampling_ratio)
    if mode != "max":
        raise ValueError(f"mode must be 'max' for roi_warp (MNC's layer takes the largest sample), got {mode!r}")
    return rois, output_size, spatial_scale, sampling_ratio


def rounded_corners(rois: np.ndarray, spatial_scale: float, dtype) -> np.ndarray:
    """RoIWarp's box: ``c_round([x1, y1, x2, y2] * s)`` in ``dtype``, shape ``(K, 4)``."""
    return quantize_boxes(rois, spatial_scale, dtype)


def roi_warp(
    input: np.ndarray, rois, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1, mode: str = "max"
) -> np.ndarray:
    """RoIWarp forward: MNC's RoI warping layer.

    Parameters
    ----------
    input : ndarray, shape (N, C, H, W)
        Feature map, float16/32/64 (float16 is computed in float32).
    rois : ndarray (K, 5) or list of (K_i, 4) arrays
        Boxes ``[batch_index, x1, y1, x2, y2]`` in image pixels.
    output_size : int or (int, int)
        ``(PH, PW)``; MNC uses 14, followed by a 2x2 max pooling.
    spatial_scale : float
        Feature-map pixels per image pixel (MNC: 1/16).
    sampling_ratio : int
        ``<= 0`` (default): MNC's steps of ``1 / ceil(roi / P)``; ``g > 0``: steps of ``1 / g``.
    mode : {"max"}
        MNC's layer takes the largest sample; no other mode is defined.

    Returns
    -------
    ndarray, shape (K, C, PH, PW)
    """
    rois, output_size, spatial_scale, sampling_ratio = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, mode
    )
    x = MapBlocks(input, cells_read(rois, spatial_scale, *input.shape[2:]))
    out = np.zeros((rois.shape[0], input.shape[1]) + output_size, dtype=input.dtype)
    for box in _boxes(x, rois, rounded_corners(rois, spatial_scale, x.dtype), output_size, sampling_ratio):
        out[box.k] = box.out.transpose(2, 0, 1)
    return out


class _PerBox:
    """``g[k]`` of a ``(K, C, PH, PW)`` gradient as a channels-last ``(PH, PW, C)`` view in
    ``dtype``: no transposed copy of the whole gradient."""

    def __init__(self, g: np.ndarray, dtype):
        self.g, self.dtype = g, dtype

    def __getitem__(self, k: int) -> np.ndarray:
        return self.g[k].transpose(1, 2, 0).astype(self.dtype, copy=False)


#: outputs' corner adds gathered before one ``np.add.at`` call of the backward
_SCATTER_CHUNK = 1 << 20


def _input_gradient(g: np.ndarray, x: np.ndarray, rois, corners, output_size, sampling_ratio) -> np.ndarray:
    """Scatter each output's gradient to its winning sample's corners, in output order
    (box, channel, row, column, corner), the order of the kernel's atomic adds on the CPU.

    The gradient is built straight in the ``(N, C, H, W)`` layout (flat indices), and the
    adds of many boxes go to one ``np.add.at`` call, concatenated in box order: a pixel
    still receives its adds in the kernel's order. Returns ``(N, C, H, W)`` in ``x``'s dtype.
    """
    if isinstance(x, np.ndarray):
        x = MapBlocks.of_channels_last(x)
    n, c, h, w = x.shape
    grad = np.zeros(n * c * h * w, dtype=x.dtype)
    chan = np.arange(c)[None, None, :, None]
    pending_index, pending_value, pending = [], [], 0
    for box in _boxes(x, rois, corners, output_size, sampling_ratio):
        won = box.win_y >= 0
        pick_y, pick_x = _winner_index(box, 0), _winner_index(box, 1)
        ylo, yhi = box.ty.lo.take(pick_y), box.ty.hi.take(pick_y)
        xlo, xhi = box.tx.lo.take(pick_x), box.tx.hi.take(pick_x)
        wly, why = box.ty.wlo.take(pick_y), box.ty.whi.take(pick_y)
        wlx, whx = box.tx.wlo.take(pick_x), box.tx.whi.take(pick_x)
        gk = g[box.k]
        rows = np.stack([ylo, ylo, yhi, yhi], axis=-1)
        cols = np.stack([xlo, xhi, xlo, xhi], axis=-1)
        adds = np.stack([gk * (wly * wlx), gk * (wly * whx), gk * (why * wlx), gk * (why * whx)], axis=-1)
        flat = ((box.image * c + chan) * h + rows) * w + cols  # (PH, PW, C, corner)
        order = (2, 0, 1, 3)  # (PH, PW, C, corner) -> (C, PH, PW, corner)
        flat, adds = np.transpose(flat, order), np.transpose(adds, order)
        if not won.all():  # an output with no sample routes nothing
            keep = np.broadcast_to(np.transpose(won, (2, 0, 1))[..., None], flat.shape)
            flat, adds = flat[keep], adds[keep]
        pending_index.append(flat.ravel())
        pending_value.append(adds.ravel())
        pending += flat.size
        if pending >= _SCATTER_CHUNK:
            np.add.at(grad, np.concatenate(pending_index), np.concatenate(pending_value))
            pending_index, pending_value, pending = [], [], 0
    if pending:
        np.add.at(grad, np.concatenate(pending_index), np.concatenate(pending_value))
    return grad.reshape(n, c, h, w)


def _winner_index(box: _Box, axis: int) -> np.ndarray:
    """Flat index into a ``(P, n)`` field of one axis of each output's winning sample."""
    ph, pw, _ = box.out.shape
    if axis == 0:
        return np.arange(ph)[:, None, None] * (box.ys.grid + 1) + np.maximum(box.win_y, 0)
    return np.arange(pw)[None, :, None] * (box.xs.grid + 1) + np.maximum(box.win_x, 0)


def roi_warp_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    mode: str = "max",
) -> np.ndarray:
    """Gradient of :func:`roi_warp` with respect to ``input``.

    Each output's gradient goes to the four corners of its winning sample, with that
    sample's bilinear weights; an output with no sample routes nothing.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio, mode
        As in :func:`roi_warp`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale, sampling_ratio = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, mode
    )
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    x = MapBlocks(input, cells_read(rois, spatial_scale, *input.shape[2:]))
    corners = rounded_corners(rois, spatial_scale, x.dtype)
    grad = _input_gradient(_PerBox(grad_output, x.dtype), x, rois, corners, output_size, sampling_ratio)
    return grad.astype(input.dtype, copy=False)


def _corner_gradient(g: np.ndarray, x: np.ndarray, rois, corners, output_size, sampling_ratio, scale) -> np.ndarray:
    """``d loss / d corners * scale`` for ``(K, 4)`` corners on the map, ``(K, 5)`` result.

    The warp's output is ``v(y, x)`` at the winning sample, whose position is
    ``y = y1 + f (y2 - y1) / PH``: ``dy/dy1 = 1 - f/PH`` and ``dy/dy2 = f/PH`` (or 1 and
    0 for a flat box, whose bins stay at ``y1``). ``dv/dy`` is the bilinear slope,
    ``(1 - lx)(v3 - v1) + lx (v4 - v2)``, 0 where the read is clamped at an edge.
    """
    ph, pw = output_size
    t = x.dtype.type
    s = t(scale)
    grad = np.zeros((rois.shape[0], 5), dtype=x.dtype)
    for box in _boxes(x, rois, corners, output_size, sampling_ratio):
        won = box.win_y >= 0
        v1, v2, v3, v4 = _winning_values(box)
        wly, why = _winning(box, box.ty.wlo, 0), _winning(box, box.ty.whi, 0)
        wlx, whx = _winning(box, box.tx.wlo, 1), _winning(box, box.tx.whi, 1)
        dvdy = np.where(_winning(box, box.ty.moving, 0), wlx * (v3 - v1) + whx * (v4 - v2), t(0))
        dvdx = np.where(_winning(box, box.tx.moving, 1), wly * (v2 - v1) + why * (v4 - v3), t(0))
        fy = _winning(box, box.ys.frac, 0)
        fx = _winning(box, box.xs.frac, 1)
        y_lo, y_hi = _corner_rates(fy, ph, box.ys.flat, s)
        x_lo, x_hi = _corner_rates(fx, pw, box.xs.flat, s)
        gk = np.where(won, g[box.k], t(0))
        # per channel, sums over the bins in row-major order; then over the channels
        terms = np.stack([(gk * dvdx) * x_lo, (gk * dvdy) * y_lo, (gk * dvdx) * x_hi, (gk * dvdy) * y_hi])
        grad[box.k, 1:] = terms.sum(axis=(1, 2)).sum(axis=1)
    return grad


def _winning_values(box: _Box):
    """The four corner values of each output's winning sample, ``(PH, PW, C)`` each."""
    ph, pw, c = box.out.shape
    iy = np.maximum(box.win_y, 0)
    ix = np.maximum(box.win_x, 0)
    p = np.arange(ph)[:, None, None]
    q = np.arange(pw)[None, :, None]
    ch = np.arange(c)[None, None, :]
    return tuple(corner[p, iy, q, ix, ch] for corner in box.corners)


def _corner_rates(f: np.ndarray, n_bins: int, flat: bool, s) -> Tuple[np.ndarray, np.ndarray]:
    """``d position / d (low corner)`` and ``/ d (high corner)``, times the scale."""
    t = f.dtype.type
    if flat:
        return np.full_like(f, s), np.zeros_like(f)
    frac = f / t(n_bins)
    return (t(1) - frac) * s, frac * s


def roi_warp_rois_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    mode: str = "max",
) -> np.ndarray:
    """Gradient of :func:`roi_warp` with respect to the box coordinates.

    The forward rounds the corners, and rounding has derivative 0 almost everywhere;
    like MNC's layer, this treats the rounding as the identity and differentiates the
    warp in its corners: ``d loss / d x1 = s * d loss / d round(s x1)``, and so on.
    MNC's kernel reports the same derivative for the box centre and size
    (``d/dxc = d/dx1 + d/dx2``, ``d/dw = (d/dx2 - d/dx1) / 2``); roilib reports it for the
    corners, like :func:`roilib.roi_align_rois_backward`.

    Where the warp itself is not differentiable the result is one-sided: the step
    count ``ceil(roi / P)`` is piecewise constant and its jumps are ignored; a sample
    on a whole-number coordinate gets the right-hand slope; a sample clamped at the
    map's edge, or skipped outside it, contributes 0; only the winning sample of a bin
    moves, and a change of winner is a jump.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio, mode
        As in :func:`roi_warp`.

    Returns
    -------
    ndarray, shape (K, 5)
        ``d loss / d [batch_index, x1, y1, x2, y2]`` in image-pixel units; the batch
        column is 0.
    """
    rois, output_size, spatial_scale, sampling_ratio = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, mode
    )
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    x = channels_last(input)
    corners = rounded_corners(rois, spatial_scale, x.dtype)
    grad = _corner_gradient(channels_last(grad_output), x, rois, corners, output_size, sampling_ratio, spatial_scale)
    return grad.astype(input.dtype)


def warp_at_corners(input: np.ndarray, rois, corners, output_size, sampling_ratio: int = -1):
    """The warp on given (unrounded) map corners, and its corner gradient function.

    For tests and the book: ``forward()`` and ``corner_gradient(g)`` evaluate the layer
    with ``corners`` (``(K, 4)`` ``[x1, y1, x2, y2]`` on the map) used as they are, so
    finite differences in the corners can check :func:`roi_warp_rois_backward`'s rule.

    Returns
    -------
    forward : callable () -> ndarray (K, C, PH, PW)
    corner_gradient : callable (grad_output) -> ndarray (K, 5), per map pixel
    """
    v.check_input(input)
    rois = v.check_rois(rois, input)
    output_size = v.check_output_size(output_size)
    x = channels_last(input)
    q = np.asarray(corners, dtype=x.dtype).reshape(-1, 4)

    def forward():
        out = np.zeros((rois.shape[0],) + output_size + (x.shape[3],), dtype=x.dtype)
        for box in _boxes(x, rois, q, output_size, sampling_ratio):
            out[box.k] = box.out
        return channels_first(out, input.dtype)

    def corner_gradient(grad_output):
        g = channels_last(np.asarray(grad_output))
        return _corner_gradient(g, x, rois, q, output_size, sampling_ratio, 1.0)

    return forward, corner_gradient
