"""Spatial pyramid pooling (SPP-net): fixed-length features from maps of any size."""
from __future__ import annotations

import numpy as np

from .. import _validate as v
from ..geometry import spp_bins
from ._layout import channels_first, channels_last
from ._pooling import window_max


def _bin_average_matrix(length: int, n: int, dtype) -> np.ndarray:
    """``(n, length)`` matrix averaging each SPP bin."""
    start, end = spp_bins(length, n)
    pos = np.arange(length)
    inside = (pos[None, :] >= start[:, None]) & (pos[None, :] < end[:, None])
    return (inside / (end - start)[:, None]).astype(dtype)


def _check(input, levels, mode):
    v.check_input(input)
    return v.check_levels(levels), v.check_mode(mode)


def spp(input: np.ndarray, levels=(4, 2, 1), mode: str = "max") -> np.ndarray:
    """Spatial pyramid pooling over the whole map.

    Level ``n`` splits each axis of length ``a`` into bins
    ``[floor(i*a/n), ceil((i+1)*a/n))`` (:func:`roilib.geometry.spp_bins`) and pools each
    of the ``n*n`` cells. Levels are concatenated in the given order, each flattened
    channel-major (``C, n, n``).

    Parameters
    ----------
    input : ndarray, shape (N, C, H, W)
    levels : sequence of int
        Bins per side for each pyramid level.
    mode : {"max", "avg"}
        Pooling inside a cell.

    Returns
    -------
    ndarray, shape (N, C * sum(n * n for n in levels))
    """
    levels, mode = _check(input, levels, mode)
    x = channels_last(input)
    n_img, h, w, c = x.shape
    parts = []
    for n in levels:
        if mode == "max":
            rows, cols = spp_bins(h, n), spp_bins(w, n)
            pooled = np.stack([window_max(x[i], rows, cols)[0] for i in range(n_img)])
        else:
            ay, ax = _bin_average_matrix(h, n, x.dtype), _bin_average_matrix(w, n, x.dtype)
            pooled = np.einsum("ph,nhwc,qw->npqc", ay, x, ax)
        parts.append(channels_first(pooled, x.dtype).reshape(n_img, -1))
    return np.concatenate(parts, axis=1).astype(input.dtype)


def spp_backward(grad_output: np.ndarray, input: np.ndarray, levels=(4, 2, 1), mode: str = "max") -> np.ndarray:
    """Gradient of :func:`spp` with respect to ``input``.

    ``max`` routes each cell's gradient to its argmax pixel (first in row-major order on
    ties); ``avg`` spreads it evenly over the cell.

    Parameters
    ----------
    grad_output : ndarray, shape (N, C * sum(n * n))
    input, levels, mode
        As in :func:`spp`.

    Returns
    -------
    ndarray, shape (N, C, H, W)
    """
    levels, mode = _check(input, levels, mode)
    n_img, c, h, w = input.shape
    v.check_grad_output(grad_output, (n_img, c * sum(n * n for n in levels)), input)
    x = channels_last(input)
    g = grad_output.astype(x.dtype, copy=False)
    grad = np.zeros(x.shape, dtype=x.dtype)
    offset = 0
    ch = np.arange(c)
    for n in levels:
        gl = g[:, offset : offset + c * n * n].reshape(n_img, c, n, n).transpose(0, 2, 3, 1)
        offset += c * n * n
        if mode == "max":
            rows, cols = spp_bins(h, n), spp_bins(w, n)
            for i in range(n_img):
                _, ar, ac, _ = window_max(x[i], rows, cols, with_arg=True)
                np.add.at(grad[i].reshape(-1), ((ar * w + ac) * c + ch).ravel(), gl[i].ravel())
        else:
            ay, ax = _bin_average_matrix(h, n, x.dtype), _bin_average_matrix(w, n, x.dtype)
            grad += np.einsum("ph,npqc,qw->nhwc", ay, gl, ax)
    return channels_first(grad, input.dtype)
