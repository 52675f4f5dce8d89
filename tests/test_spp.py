"""SPP's max backward equals a plain loop; its per-plane column pass equals one reduceat.

``spp._column_segment_max`` streams each plane into cache before its ``reduceat``
(three times faster on a map that is not in cache); the result must not change.
"""
import importlib

import numpy as np
import pytest

import roilib
from roilib.geometry import spp_bins

spp_module = importlib.import_module("roilib.reference.spp")

DTYPES = [np.float16, np.float32, np.float64]
#: maps and levels whose bins overlap (10 rows in 3 bins, 13 columns in 6) or are 1 pixel
CASES = [((2, 3, 10, 7), (3, 2, 1)), ((1, 2, 9, 13), (6, 4, 1)), ((2, 2, 1, 5), (2, 1))]


def _loop_spp_backward(g, x, levels):
    """Each cell's gradient to its first max in row-major order, level by level, cell by
    cell, added in that order in the compute dtype."""
    n_img, c, h, w = x.shape
    dtype = np.float32 if x.dtype == np.float16 else x.dtype
    grad = np.zeros(x.shape, dtype)
    offset = 0
    for n in levels:
        rs, re = spp_bins(h, n)
        cs, ce = spp_bins(w, n)
        gl = g[:, offset : offset + c * n * n].reshape(n_img, c, n, n).astype(dtype)
        offset += c * n * n
        for i in range(n_img):
            for ch in range(c):
                for p in range(n):
                    for q in range(n):
                        cell = x[i, ch, rs[p] : re[p], cs[q] : ce[q]]
                        r, s = np.unravel_index(np.argmax(cell), cell.shape)  # first max
                        grad[i, ch, rs[p] + r, cs[q] + s] += gl[i, ch, p, q]
    return grad.astype(x.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, levels", CASES)
def test_spp_max_backward_equals_a_plain_loop(rng, dtype, shape, levels):
    x = np.round(rng.standard_normal(shape), 0).astype(dtype)  # many ties
    g = rng.standard_normal((shape[0], shape[1] * sum(n * n for n in levels))).astype(dtype)
    grad = roilib.spp_backward(g, x, levels)
    assert grad.dtype == x.dtype
    np.testing.assert_array_equal(grad, _loop_spp_backward(g, x, levels))


@pytest.mark.parametrize("dtype", DTYPES)
def test_column_segment_max_equals_one_reduceat(rng, dtype):
    x = rng.standard_normal((2, 3, 5, 11)).astype(dtype)
    starts = np.array([0, 3, 4, 8])
    out = spp_module._column_segment_max(x, starts)
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out, np.maximum.reduceat(x, starts, axis=3))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, levels", CASES)
def test_spp_max_and_its_position_are_window_max_s_nan_included(rng, dtype, shape, levels):
    """Each cell's max and where it sits, as ``_pooling.window_max`` defines them: ties to
    the first row, then the first column; a NaN max to the last row, then the last column
    (NaN and -inf sprinkled over a map of many ties)."""
    from roilib.reference._pooling import window_max

    x = np.round(rng.standard_normal(shape), 0).astype(dtype)
    x[rng.random(shape) < 0.15] = np.nan
    x[rng.random(shape) < 0.1] = -np.inf
    _, _, h, w = shape
    for n, (pooled, (rows, cols)) in zip(levels, spp_module._max_levels(x, levels, with_arg=True)):
        for i in range(shape[0]):
            values, ar, ac, _ = window_max(x[i].transpose(1, 2, 0), spp_bins(h, n), spp_bins(w, n), True)
            np.testing.assert_array_equal(pooled[i], values.transpose(2, 0, 1))  # NaN == NaN here
            np.testing.assert_array_equal(rows[i], ar.transpose(2, 0, 1))
            np.testing.assert_array_equal(cols[i], ac.transpose(2, 0, 1))
