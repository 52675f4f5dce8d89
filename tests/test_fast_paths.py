"""The CPU speed work of issue 13 changed how the reference computes, never what.

* RoIPool's forward can return its argmax (torchvision's layout) and the backward can
  take it back: the gradient is bitwise the one the backward finds on its own.
* Few boxes on a large map are read block by block and their gradient added in place;
  many boxes copy the map channels-last once. Both layouts add the same numbers in the
  same order, so every op gives bitwise the same result either way.
* ``python -m roilib.bench``'s workers run every op without torchvision.
Speed itself is measured by the benchmark, never asserted here.
"""
import numpy as np
import pytest

import roilib
from roilib import bench
from roilib.reference import _layout

from helpers import random_boxes


def test_roi_pool_argmax_on_the_mxnet_4x4_example():
    # arange(16): every value is its own flat index, so the argmax equals the output;
    # the MXNet example's outputs are [[5, 6], [9, 10]] and [[9, 11], [13, 15]]
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    rois = np.array([[0, 0, 0, 2, 2], [0, 0, 1, 3, 3]], dtype=np.float32)
    out, argmax = roilib.roi_pool(x, rois, (2, 2), 1.0, return_argmax=True)
    assert argmax.dtype == np.int64 and argmax.shape == out.shape
    np.testing.assert_array_equal(argmax[0, 0], [[5, 6], [9, 10]])
    np.testing.assert_array_equal(argmax[1, 0], [[9, 11], [13, 15]])
    np.testing.assert_array_equal(out, roilib.roi_pool(x, rois, (2, 2), 1.0))


def test_roi_pool_argmax_is_minus_one_for_empty_bins():
    # a box wholly right of a 4-wide map: every bin is clipped away
    x = np.ones((1, 2, 4, 4), dtype=np.float32)
    out, argmax = roilib.roi_pool(x, np.array([[0, 10, 0, 12, 2]], np.float32), 2, 1.0, return_argmax=True)
    assert (argmax == -1).all() and (out == 0).all()
    grad = roilib.roi_pool_backward(np.ones_like(out), x, np.array([[0, 10, 0, 12, 2]], np.float32), 2, 1.0, argmax=argmax)
    assert not grad.any()


def test_roi_pool_first_pixel_wins_a_tie():
    # a constant map: every bin's max is tied; the first pixel in row-major order wins
    x = np.zeros((1, 1, 4, 4), dtype=np.float64)
    _, argmax = roilib.roi_pool(x, np.array([[0, 0, 0, 3, 3]], float), 2, 1.0, return_argmax=True)
    np.testing.assert_array_equal(argmax[0, 0], [[0, 2], [8, 10]])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_roi_pool_backward_with_saved_argmax_is_bitwise_the_same(rng, dtype):
    x = np.round(rng.standard_normal((2, 5, 12, 15)), 1).astype(dtype)  # ties
    rois = random_boxes(rng, 30, 2, 12, 15, 0.5, margin=3)
    g = rng.standard_normal((30, 5, 3, 4)).astype(dtype)
    out, argmax = roilib.roi_pool(x, rois, (3, 4), 0.5, return_argmax=True)
    with_arg = roilib.roi_pool_backward(g, x, rois, (3, 4), 0.5, argmax=argmax)
    without = roilib.roi_pool_backward(g, x, rois, (3, 4), 0.5)
    assert with_arg.dtype == x.dtype
    np.testing.assert_array_equal(with_arg, without)


def test_roi_pool_backward_checks_the_argmax(rng):
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float32)
    rois = np.array([[0, 0, 0, 4, 4]], np.float32)
    out, argmax = roilib.roi_pool(x, rois, 2, 1.0, return_argmax=True)
    with pytest.raises(ValueError, match="argmax"):
        roilib.roi_pool_backward(out, x, rois, 2, 1.0, argmax=argmax[:, :1])
    with pytest.raises(TypeError, match="argmax"):
        roilib.roi_pool_backward(out, x, rois, 2, 1.0, argmax=argmax.astype(np.float32))
    with pytest.raises(ValueError, match="argmax"):
        roilib.roi_pool_backward(out, x, rois, 2, 1.0, argmax=argmax + 36)


def _every_op(x, rois, g, g_spp):
    results = []
    for kwargs in (dict(sampling_ratio=2, aligned=True), dict(sampling_ratio=-1, mode="max")):
        results.append(roilib.roi_align(x, rois, (3, 4), 0.5, **kwargs))
        results.append(roilib.roi_align_backward(g, x, rois, (3, 4), 0.5, **kwargs))
        results.append(roilib.roi_align_rois_backward(g, x, rois, (3, 4), 0.5, **kwargs))
    results.append(roilib.roi_pool(x, rois, (3, 4), 0.5))
    results.append(roilib.roi_pool_backward(g, x, rois, (3, 4), 0.5))
    results.append(roilib.roi_warp(x, rois, (3, 4), 0.5, sampling_ratio=2))
    results.append(roilib.roi_warp_backward(g, x, rois, (3, 4), 0.5, sampling_ratio=2))
    results.append(roilib.spp(x, (3, 2, 1)))
    results.append(roilib.spp_backward(g_spp, x, (3, 2, 1)))
    return results


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_block_and_whole_map_layouts_agree_bitwise(rng, monkeypatch, dtype):
    x = np.round(rng.standard_normal((2, 6, 14, 17)), 1).astype(dtype)
    rois = random_boxes(rng, 9, 2, 14, 17, 0.5, margin=2)
    g = rng.standard_normal((9, 6, 3, 4)).astype(dtype)
    g_spp = rng.standard_normal((2, 6 * 14)).astype(dtype)
    for name in ("WHOLE_MAP_FRACTION", "GRAD_WHOLE_MAP_FRACTION"):
        monkeypatch.setattr(_layout, name, 0.0)  # always copy the whole map
    whole = _every_op(x, rois, g, g_spp)
    for name in ("WHOLE_MAP_FRACTION", "GRAD_WHOLE_MAP_FRACTION"):
        monkeypatch.setattr(_layout, name, float("inf"))  # always block by block
    blocks = _every_op(x, rois, g, g_spp)
    for a, b in zip(whole, blocks):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("case", range(len(bench.CASES)))
@pytest.mark.parametrize("backward", [False, True])
def test_bench_worker_runs_every_op_without_torchvision(case, backward):
    spec = dict(impl="roilib", case=case, backward=backward, boxes=3, channels=4, map_hw=[10, 12], repeat=1)
    result = bench._worker(spec)
    assert result["best"] > 0 and np.isfinite(result["checksum"])


def test_bench_tables_format():
    timing = dict(best=0.002, median=0.003, peak_mib=4.0, checksum=1.0)
    row = dict(case="roi_pool", op="roi_pool", pass_="forward", boxes=16, channels=8, map_hw=[10, 12],
               roilib=timing, torchvision=dict(timing, best=0.004), axis="boxes")
    assert "0.50" in bench.format_table([row])
    assert "0.50" in bench.format_scaling([row])
