"""RoIAlign (Mask R-CNN): bilinear samples of a box, pooled per bin.

For one box and one channel, the bilinear samples form ``S = B_y X B_x^T``, where
``B_y`` (samples x touched rows) and ``B_x`` (samples x touched columns) hold the 1-D
interpolation weights from :func:`roilib.geometry.interpolation_matrix`. Average pooling
sums the samples of each bin, so ``avg`` RoIAlign is ``A_y X A_x^T / count`` with
``A = bin-summed B``: linear, separable, and its backward is the transpose. The code
applies these small matrices to a channels-last block of the map, all channels at once.

``max`` takes the largest sample of each bin (mmcv's definition: samples outside the
map count as 0) and routes the gradient through the winning sample's four corners.
"""
from __future__ import annotations

from typing import Tuple

import numpy as np

from .. import _validate as v
from ..geometry import AlignBoxes, box_axis_samples, interpolation_matrix, roi_align_boxes
from ._layout import GradBlocks, MapBlocks, cells_read, channels_last


class _BoxSampling:
    """The interpolation matrices of one box (see the module docstring)."""

    def __init__(self, ys, xs, count, output_size: Tuple[int, int], height: int, width: int, slopes: bool):
        self.ys, self.xs = ys, xs
        self.rows, self.by, *dy = interpolation_matrix(ys, height, slopes)
        self.cols, self.bx, *dx = interpolation_matrix(xs, width, slopes)
        if slopes:
            self.dy, self.dx = dy[0], dx[0]
        self.count = ys.coord.dtype.type(count)
        self.output_size = output_size

    @property
    def empty(self) -> bool:
        """No sample touches the map: output 0, no gradient."""
        return self.rows.size == 0 or self.cols.size == 0

    def bin_sum(self, m: np.ndarray, axis: int) -> np.ndarray:
        """Sum the rows of a per-sample matrix within each bin: ``(P*g, T) -> (P, T)``."""
        grid = self.ys.grid if axis == 0 else self.xs.grid
        return m.reshape(self.output_size[axis], grid, -1).sum(axis=1)

    def samples(self, block: np.ndarray, row_matrix=None, col_matrix=None) -> np.ndarray:
        """``R block C^T`` for a ``(rows, cols, C)`` block -> ``(R.shape[0], C.shape[0], C)``."""
        row_matrix = self.by if row_matrix is None else row_matrix
        col_matrix = self.bx if col_matrix is None else col_matrix
        t = col_matrix @ block  # (rows, n_col_samples, C)
        return (row_matrix @ t.reshape(t.shape[0], -1)).reshape(row_matrix.shape[0], col_matrix.shape[0], -1)

    def samples_adjoint(self, g: np.ndarray, row_matrix=None, col_matrix=None) -> np.ndarray:
        """Transpose of :meth:`samples`: ``R^T g C`` -> ``(rows, cols, C)``."""
        row_matrix = self.by if row_matrix is None else row_matrix
        col_matrix = self.bx if col_matrix is None else col_matrix
        t = (row_matrix.T @ g.reshape(g.shape[0], -1)).reshape(row_matrix.shape[1], g.shape[1], -1)
        return col_matrix.T @ t

    def winners(self, s: np.ndarray) -> np.ndarray:
        """Index (``iy * g_w + ix``) of each bin's largest sample, shape ``(PH, PW, C)``.

        The first maximal sample in ``iy``-major order wins, like a strict ``>`` loop.
        """
        (ph, pw), gh, gw = self.output_size, self.ys.grid, self.xs.grid
        per_bin = s.reshape(ph, gh, pw, gw, -1).transpose(0, 2, 4, 1, 3).reshape(ph, pw, s.shape[-1], gh * gw)
        return per_bin.argmax(axis=-1), per_bin

    def winner_mask(self, g: np.ndarray, win: np.ndarray) -> np.ndarray:
        """Scatter ``g`` (PH, PW, C) onto the sample grid at the winning samples."""
        (ph, pw), gh, gw = self.output_size, self.ys.grid, self.xs.grid
        c = g.shape[-1]
        grid = np.zeros((ph, pw, c, gh * gw), dtype=g.dtype)
        np.put_along_axis(grid, win[..., None], g[..., None], axis=-1)
        return grid.reshape(ph, pw, c, gh, gw).transpose(0, 3, 1, 4, 2).reshape(ph * gh, pw * gw, c)

    def coord_derivatives(self, boxes: AlignBoxes, k: int, spatial_scale, axis: int):
        """``d coord / d (low corner)`` and ``d coord / d (high corner)`` per sample."""
        samples = self.ys if axis == 0 else self.xs
        clamped = (boxes.clamped_h if axis == 0 else boxes.clamped_w)[k]
        s = samples.coord.dtype.type(spatial_scale)
        if clamped:
            # roi size was raised to 1: the bins no longer follow the far corner
            return np.full_like(samples.coord, s), np.zeros_like(samples.coord)
        f = samples.fraction.astype(samples.coord.dtype)
        return s * (1 - f), s * f


def _check(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    v.check_input(input)
    return (
        v.check_rois(rois, input),
        v.check_output_size(output_size),
        v.check_spatial_scale(spatial_scale),
        v.check_sampling_ratio(sampling_ratio),
        v.check_aligned(aligned),
        v.check_mode(mode),
    )


def _sampled(height, width, dtype, rois, output_size, spatial_scale, sampling_ratio, aligned, slopes=False):
    """Yield ``(k, image, sampling, geometry)`` for every box that touches a
    ``height x width`` map, computing in ``dtype``."""
    ph, pw = output_size
    geo = roi_align_boxes(rois, output_size, spatial_scale, sampling_ratio, aligned, dtype)
    ys = box_axis_samples(geo.start_y, geo.bin_h, geo.grid_h, ph, height, dtype)
    xs = box_axis_samples(geo.start_x, geo.bin_w, geo.grid_w, pw, width, dtype)
    count = geo.count
    for k in range(rois.shape[0]):
        box = _BoxSampling(ys[k], xs[k], count[k], output_size, height, width, slopes)
        if not box.empty:
            yield k, int(rois[k, 0]), box, geo


def _boxes(x_hwc, rois, output_size, spatial_scale, sampling_ratio, aligned, slopes=False):
    """:func:`_sampled` for a channels-last map ``x_hwc`` (its shape and dtype)."""
    _, h, w, _ = x_hwc.shape
    return _sampled(h, w, x_hwc.dtype, rois, output_size, spatial_scale, sampling_ratio, aligned, slopes)


def _forward_blocks(x: MapBlocks, rois, output_size, spatial_scale, sampling_ratio, aligned, mode, out=None):
    """The output read from ``x``'s blocks: written into ``out`` (``(K, C, PH, PW)``, box by
    box, so no channels-last copy of the whole output is made) or, without ``out``,
    returned channels-last ``(K, PH, PW, C)`` in the compute dtype."""
    _, c, h, w = x.shape
    last = out is None
    if last:
        out = np.zeros((rois.shape[0],) + output_size + (c,), dtype=x.dtype)
    for k, image, box, _ in _sampled(h, w, x.dtype, rois, output_size, spatial_scale, sampling_ratio, aligned):
        block = x.take(image, box.rows, box.cols)
        if mode == "avg":
            value = box.samples(block, box.bin_sum(box.by, 0), box.bin_sum(box.bx, 1)) / box.count
        else:
            win, per_bin = box.winners(box.samples(block))
            value = np.take_along_axis(per_bin, win[..., None], axis=-1)[..., 0]
        out[k] = value if last else value.transpose(2, 0, 1)
    return out


def _backward_blocks(g, x, grad: GradBlocks, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    """Add the input gradient into ``grad``; ``g`` is channels-last, ``x`` (a
    :class:`MapBlocks`) is read only in ``max`` mode (``avg`` is linear)."""
    _, _, h, w = grad.shape
    for k, image, box, _ in _sampled(h, w, grad.dtype, rois, output_size, spatial_scale, sampling_ratio, aligned):
        if mode == "avg":
            part = box.samples_adjoint(g[k] / box.count, box.bin_sum(box.by, 0), box.bin_sum(box.bx, 1))
        else:
            win, _ = box.winners(box.samples(x.take(image, box.rows, box.cols)))
            part = box.samples_adjoint(box.winner_mask(g[k], win))
        grad.add(image, box.rows, box.cols, part)
    return grad


def _forward(x_hwc, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    """Forward on a channels-last map ``(N, H, W, C)``; output ``(K, PH, PW, C)``."""
    x = MapBlocks.of_channels_last(x_hwc)
    return _forward_blocks(x, rois, output_size, spatial_scale, sampling_ratio, aligned, mode)


def _backward(g, x_hwc, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    """Input gradient on a channels-last map ``(N, H, W, C)``, channels-last."""
    x = MapBlocks.of_channels_last(x_hwc)
    grad = GradBlocks.channels_last_like(x_hwc)
    _backward_blocks(g, x, grad, rois, output_size, spatial_scale, sampling_ratio, aligned, mode)
    return grad.grad


def roi_align(
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
) -> np.ndarray:
    """RoIAlign forward (torchvision semantics; ``mode="max"`` as in mmcv).

    Parameters
    ----------
    input : ndarray, shape (N, C, H, W)
        Feature map, float16/32/64 (float16 is computed in float32).
    rois : ndarray (K, 5) or list of (K_i, 4) arrays
        Boxes ``[batch_index, x1, y1, x2, y2]`` in image pixels.
    output_size : int or (int, int)
        ``(PH, PW)``.
    spatial_scale : float
        Feature-map pixels per image pixel (``1 / stride``).
    sampling_ratio : int
        Bilinear samples per bin and axis; ``<= 0`` uses ``ceil(roi_size / output_size)``.
    aligned : bool
        Shift the box by -0.5 feature pixel so that pixel ``i``'s value sits at ``i + 0.5``.
    mode : {"avg", "max"}
        Average the samples of a bin, or take their max.

    Returns
    -------
    ndarray, shape (K, C, PH, PW)
    """
    rois, output_size, spatial_scale, sampling_ratio, aligned, mode = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
    )
    x = MapBlocks(input, cells_read(rois, spatial_scale, *input.shape[2:]))
    out = np.zeros((rois.shape[0], input.shape[1]) + output_size, dtype=input.dtype)
    return _forward_blocks(x, rois, output_size, spatial_scale, sampling_ratio, aligned, mode, out)


def roi_align_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
) -> np.ndarray:
    """Gradient of :func:`roi_align` with respect to ``input``.

    ``avg``: each output's gradient, divided by the sample count, is spread over the
    four corners of every sample with its bilinear weights (the transpose of the
    forward). ``max``: only the winning sample's corners receive it.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
        As in :func:`roi_align`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    rois, output_size, spatial_scale, sampling_ratio, aligned, mode = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
    )
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    g = channels_last(grad_output)
    cells = cells_read(rois, spatial_scale, *input.shape[2:])
    grad = GradBlocks(input.shape, input.dtype, cells)
    x = MapBlocks(input, cells) if mode == "max" else None  # avg never reads the map
    _backward_blocks(g, x, grad, rois, output_size, spatial_scale, sampling_ratio, aligned, mode)
    return grad.result(input.dtype)


def roi_align_rois_backward(
    grad_output: np.ndarray,
    input: np.ndarray,
    rois,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
) -> np.ndarray:
    """Gradient of :func:`roi_align` with respect to the box coordinates.

    Every sample position is an affine function of the box:
    ``y = y1*s - off + (p + (i + 0.5)/g) * (y2 - y1)*s / P``, and the bilinear value
    changes with ``y`` at rate ``(1 - lx)(X[yh, xl] - X[yl, xl]) + lx (X[yh, xh] - X[yl, xh])``.
    The chain rule through both gives the result.

    Where it is not differentiable the result is the one-sided derivative of the
    formula as evaluated: the adaptive grid ``ceil(roi_h / PH)`` and the
    ``max(roi_h, 1)`` clamp (``aligned=False``) are piecewise constant in the box and
    their jumps are ignored; a sample exactly on a whole-number coordinate (a pixel's
    own position, where the interpolant has a kink) gets the right-hand derivative; a
    sample clamped at the map's edge (``y <= 0`` or at/beyond the last pixel) or out of
    range (``y < -1`` or ``y > H``) contributes 0; in ``max`` mode only the winning
    sample moves, and a change of winner is a jump.

    Parameters
    ----------
    grad_output : ndarray, shape (K, C, PH, PW)
    input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
        As in :func:`roi_align`.

    Returns
    -------
    ndarray, shape (K, 5)
        ``d loss / d [batch_index, x1, y1, x2, y2]`` (the batch column is 0), in the
        input's dtype, in image-pixel units.
    """
    rois, output_size, spatial_scale, sampling_ratio, aligned, mode = _check(
        input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
    )
    v.check_grad_output(grad_output, (rois.shape[0], input.shape[1]) + output_size, input)
    x = MapBlocks(input, cells_read(rois, spatial_scale, *input.shape[2:]))
    g = channels_last(grad_output)
    grad = np.zeros((rois.shape[0], 5), dtype=x.dtype)
    h, w = input.shape[2:]
    boxes = _sampled(h, w, x.dtype, rois, output_size, spatial_scale, sampling_ratio, aligned, slopes=True)
    for k, image, box, geo in boxes:
        block = np.ascontiguousarray(x.take(image, box.rows, box.cols))
        if mode == "avg":
            ay, ax = box.bin_sum(box.by, 0), box.bin_sum(box.bx, 1)
            gk = g[k] / box.count
            along_x = ax @ block  # (rows, PW, C)
            along_y = (ay @ block.reshape(block.shape[0], -1)).reshape(ay.shape[0], block.shape[1], -1)
            # weight of each touched row/column against each output bin
            per_row = np.tensordot(along_x, gk, axes=([1, 2], [1, 2]))  # (rows, PH)
            per_col = np.tensordot(along_y, gk, axes=([0, 2], [0, 2]))  # (cols, PW)
            bin_y = np.arange(box.dy.shape[0]) // max(box.ys.grid, 1)
            bin_x = np.arange(box.dx.shape[0]) // max(box.xs.grid, 1)
            dy = (box.dy * per_row.T[bin_y]).sum(axis=1)
            dx = (box.dx * per_col.T[bin_x]).sum(axis=1)
        else:
            win, _ = box.winners(box.samples(block))
            weights = box.winner_mask(g[k], win)  # (PH*gh, PW*gw, C)
            dy = (box.samples(block, row_matrix=box.dy) * weights).sum(axis=(1, 2))
            dx = (box.samples(block, col_matrix=box.dx) * weights).sum(axis=(0, 2))
        y_lo, y_hi = box.coord_derivatives(geo, k, spatial_scale, 0)
        x_lo, x_hi = box.coord_derivatives(geo, k, spatial_scale, 1)
        grad[k, 1:] = [dx @ x_lo, dy @ y_lo, dx @ x_hi, dy @ y_hi]
    return grad.astype(input.dtype)
