"""RoIPool's computation paths agree with each other and with a plain loop.

The forward without ``return_argmax`` takes maxima rows first (``_pooling.bin_max``),
reading few boxes straight from the ``(N, C, H, W)`` map and many from one
channels-last copy; with ``return_argmax`` it goes through ``_pooling.window_max``.
Both must give torchvision's values bit for bit, so they are checked against each other
and against a loop written the way the C kernels are (``for h: for w: if v > best``).
The backward scatters the saved argmax chunk by chunk and checks its range per chunk.
"""
import importlib
import threading

import numpy as np
import pytest

import roilib
from roilib.geometry import roi_pool_bins
from roilib.reference import _pooling

from helpers import random_boxes

roi_pool_module = importlib.import_module("roilib.reference.roi_pool")

DTYPES = [np.float16, np.float32, np.float64]


def _loop_roi_pool(x, rois, output_size, spatial_scale):
    """RoIPool as a C loop computes it: first max in row-major order, -1 for an empty bin."""
    n, c, h, w = x.shape
    ph, pw = output_size
    dtype = np.float32 if x.dtype == np.float16 else x.dtype
    bins = roi_pool_bins(rois, output_size, spatial_scale, h, w, dtype)
    out = np.zeros((len(rois), c, ph, pw), x.dtype)
    arg = np.full(out.shape, -1, np.int64)
    for k in range(len(rois)):
        b = int(rois[k, 0])
        for ch in range(c):
            for p in range(ph):
                for q in range(pw):
                    best, where = None, -1
                    for r in range(bins.hstart[k, p], bins.hend[k, p]):
                        for s in range(bins.wstart[k, q], bins.wend[k, q]):
                            if best is None or x[b, ch, r, s] > best:
                                best, where = x[b, ch, r, s], r * w + s
                    if where >= 0:
                        out[k, ch, p, q], arg[k, ch, p, q] = best, where
    return out, arg


def _boxes(rng, n, n_images, h, w, scale):
    """Random boxes plus the awkward ones: off the map, tiny (bins under a pixel), the
    whole map, on the last image."""
    rois = random_boxes(rng, n, n_images, h, w, scale, margin=3)
    extra = np.array(
        [
            [0, -40, -40, -20, -20],  # wholly off the map: every bin empty
            [n_images - 1, (w + 5) / scale, 0, (w + 9) / scale, 3 / scale],  # right of the map
            [n_images - 1, 1 / scale, 1 / scale, 1 / scale, 1 / scale],  # one pixel: bins repeat it
            [n_images - 1, 0, 0, (w - 1) / scale, (h - 1) / scale],  # the whole map
            [0, -2 / scale, 2 / scale, 3 / scale, (h + 4) / scale],  # straddles two edges
        ]
    )
    return np.concatenate([rois, extra])


@pytest.fixture(params=[0.0, float("inf")], ids=["channels-last-copy", "channels-first-blocks"])
def values_layout(request, monkeypatch):
    monkeypatch.setattr(roi_pool_module, "VALUES_WHOLE_MAP_FRACTION", request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("output_size", [(3, 4), (7, 7), (1, 1)])
def test_roi_pool_values_equal_a_plain_loop_in_both_layouts(rng, values_layout, dtype, output_size):
    x = np.round(rng.standard_normal((2, 3, 11, 13)), 1).astype(dtype)  # ties
    rois = _boxes(rng, 12, 2, 11, 13, 0.5)
    expected, _ = _loop_roi_pool(x, rois, output_size, 0.5)
    out = roilib.roi_pool(x, rois, output_size, 0.5)
    assert out.dtype == x.dtype
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_argmax_equals_a_plain_loop(rng, dtype):
    x = np.round(rng.standard_normal((2, 3, 11, 13)), 1).astype(dtype)
    rois = _boxes(rng, 12, 2, 11, 13, 0.5)
    expected, expected_arg = _loop_roi_pool(x, rois, (3, 4), 0.5)
    out, arg = roilib.roi_pool(x, rois, (3, 4), 0.5, return_argmax=True)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(arg, expected_arg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_values_path_equals_the_argmax_path_bitwise(rng, values_layout, dtype):
    # larger than the loop can afford: boxes of a few to tens of pixels, many channels
    x = rng.standard_normal((2, 17, 40, 50)).astype(dtype)
    rois = _boxes(rng, 40, 2, 40, 50, 0.25)
    values = roilib.roi_pool(x, rois, (7, 5), 0.25)
    with_arg, _ = roilib.roi_pool(x, rois, (7, 5), 0.25, return_argmax=True)
    assert values.view(np.uint8).tobytes() == with_arg.view(np.uint8).tobytes()  # -0.0 too


def test_roi_pool_without_boxes_is_empty(values_layout):
    x = np.ones((1, 3, 5, 5), np.float32)
    out = roilib.roi_pool(x, np.zeros((0, 5), np.float32), (2, 3), 1.0)
    assert out.shape == (0, 3, 2, 3) and out.dtype == np.float32


def test_roi_pool_nan_propagates_to_the_bins_holding_it(values_layout):
    x = np.arange(2 * 36, dtype=np.float32).reshape(1, 2, 6, 6)
    x[0, 1, 4, 1] = np.nan
    rois = np.array([[0, 0, 0, 5, 5]], np.float32)  # 2x2 bins of 3x3 pixels
    out = roilib.roi_pool(x, rois, 2, 1.0)
    assert not np.isnan(out[0, 0]).any()
    np.testing.assert_array_equal(np.isnan(out[0, 1]), [[False, False], [True, False]])
    np.testing.assert_array_equal(out, roilib.roi_pool(x, rois, 2, 1.0, return_argmax=True)[0])


def test_bin_max_matches_numpy_max_including_empty_and_overlapping_ranges(rng):
    a = rng.standard_normal((9, 4, 6)).astype(np.float32)
    starts, ends = [0, 2, 2, 5, 8, 7], [3, 2, 5, 9, 9, 6]  # overlaps, empty (2, 2) and (7, 6)
    zero = np.zeros((4, 6), np.float32)
    expected = np.stack([a[s:e].max(axis=0) if e > s else zero for s, e in zip(starts, ends)])
    for rowwise, view in ((False, a), (True, a), (True, a.transpose(0, 2, 1).copy().transpose(0, 2, 1))):
        out = np.full((len(starts), 4, 6), 7.0, np.float32)
        _pooling.bin_max(view, starts, ends, out, rowwise=rowwise)
        np.testing.assert_array_equal(out, expected)


def test_scratch_reuses_its_buffer_per_slot_and_thread():
    a = _pooling.scratch(5, 100, np.float32)
    b = _pooling.scratch(5, 50, np.float64)  # fits the same 400 bytes
    assert a.size == 100 and a.dtype == np.float32 and b.size == 50 and b.dtype == np.float64
    assert np.shares_memory(a, b)
    assert not np.shares_memory(a, _pooling.scratch(6, 100, np.float32))  # another slot
    other = []
    thread = threading.Thread(target=lambda: other.append(_pooling.scratch(5, 100, np.float32)))
    thread.start()
    thread.join()
    assert not np.shares_memory(a, other[0])  # another thread
    huge = _pooling.SCRATCH_KEEP // 4 + 1
    assert not np.shares_memory(_pooling.scratch(5, huge, np.float32), _pooling.scratch(5, huge, np.float32))


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_backward_is_the_same_in_any_chunk_size(rng, monkeypatch, dtype):
    x = np.round(rng.standard_normal((2, 5, 12, 15)), 1).astype(dtype)
    rois = _boxes(rng, 20, 2, 12, 15, 0.5)  # some empty bins: -1 in some chunks only
    g = rng.standard_normal((len(rois), 5, 3, 4)).astype(dtype)
    _, argmax = roilib.roi_pool(x, rois, (3, 4), 0.5, return_argmax=True)
    one_go = roilib.roi_pool_backward(g, x, rois, (3, 4), 0.5, argmax=argmax)
    monkeypatch.setattr(roi_pool_module, "_CHUNK", 1)  # one channel per step
    chunked = roilib.roi_pool_backward(g, x, rois, (3, 4), 0.5, argmax=argmax)
    as_int32 = roilib.roi_pool_backward(g, x, rois, (3, 4), 0.5, argmax=argmax.astype(np.int32))
    assert one_go.dtype == x.dtype
    np.testing.assert_array_equal(one_go, chunked)
    np.testing.assert_array_equal(one_go, as_int32)


def test_roi_pool_backward_adds_in_box_then_bin_order(rng):
    # every box routes to the same pixel: the float32 sum depends on the order of adds
    x = np.zeros((1, 2, 4, 4), np.float32)
    x[0, :, 1, 1] = 1.0
    rois = np.array([[0, 0, 0, 3, 3]] * 50, np.float32)
    g = rng.standard_normal((50, 2, 1, 1)).astype(np.float32) * np.float32(1e4)
    grad = roilib.roi_pool_backward(g, x, rois, 1, 1.0)
    for ch in range(2):
        total = np.float32(0)
        for k in range(50):
            total = np.float32(total + g[k, ch, 0, 0])
        assert grad[0, ch, 1, 1] == total


@pytest.mark.parametrize("bad", [np.array(-2), np.array(36), np.array(2**64 - 1, np.uint64)])
def test_roi_pool_backward_rejects_an_argmax_out_of_range_in_any_chunk(rng, monkeypatch, bad):
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    rois = np.array([[0, 0, 0, 4, 4]], np.float32)
    out, argmax = roilib.roi_pool(x, rois, 2, 1.0, return_argmax=True)
    monkeypatch.setattr(roi_pool_module, "_CHUNK", 1)
    argmax = argmax.astype(bad.dtype if bad.dtype == np.uint64 else np.int64)
    argmax[0, 2, 1, 1] = bad  # the last channel: the last chunk
    with pytest.raises(ValueError, match="argmax entries must be -1 or a flat index"):
        roilib.roi_pool_backward(out, x, rois, 2, 1.0, argmax=argmax)
