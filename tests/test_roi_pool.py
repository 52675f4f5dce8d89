"""RoIPool's computation paths agree with each other and with a plain loop.

The forward without ``return_argmax`` takes maxima rows first (``_pooling.bin_max``),
reading few boxes straight from the ``(N, C, H, W)`` map and many from one
channels-last copy; with ``return_argmax`` it also finds where each max sits, rows first
(``_pooling.first_max_rows``, then ``first_max_windows``), in the same two layouts, and
hands NaN maxima (and bins of 256+ rows) to ``_pooling.window_max``. All must give
torchvision's values bit for bit, so they are checked against each other and against a
loop written the way the C kernels are (``for h: for w: if v > best``).
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


@pytest.fixture(params=[0.0, float("inf")], ids=["channels-last-copy", "row-copies"])
def argmax_layout(request, monkeypatch):
    monkeypatch.setattr(roi_pool_module, "ARGMAX_WHOLE_MAP_FRACTION", request.param)
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
@pytest.mark.parametrize("output_size", [(3, 4), (7, 7), (1, 1)])
def test_roi_pool_argmax_equals_a_plain_loop_in_both_layouts(rng, argmax_layout, dtype, output_size):
    x = np.round(rng.standard_normal((2, 3, 11, 13)), 1).astype(dtype)  # many ties
    rois = _boxes(rng, 12, 2, 11, 13, 0.5)
    expected, expected_arg = _loop_roi_pool(x, rois, output_size, 0.5)
    out, arg = roilib.roi_pool(x, rois, output_size, 0.5, return_argmax=True)
    assert out.dtype == x.dtype and arg.dtype == np.int64
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(arg, expected_arg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_argmax_takes_the_first_max_in_row_major_order_on_a_constant_map(argmax_layout, dtype):
    x = np.full((2, 2, 9, 10), 1.5, dtype)
    rois = np.array([[1, 0, 0, 9, 8], [0, 1, 2, 7, 5], [1, 3, 3, 3, 3]], np.float32)
    expected, expected_arg = _loop_roi_pool(x, rois, (3, 2), 1.0)
    out, arg = roilib.roi_pool(x, rois, (3, 2), 1.0, return_argmax=True)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(arg, expected_arg)
    # the top-left cell of every bin: rows 0-2, 3-5, 6-8 and columns 0-4, 5-9 of box 0
    np.testing.assert_array_equal(arg[0, 0], [[0, 5], [30, 35], [60, 65]])


def test_roi_pool_argmax_prefers_the_earlier_row_over_the_earlier_column(argmax_layout):
    # one 4 x 4 bin; the max 5 sits at (2, 0), (1, 3), (1, 2) and (3, 1): the first in
    # row-major order is (1, 2), although column 0 holds the max too
    x = np.zeros((1, 3, 4, 4), np.float32)
    for r, q in ((2, 0), (1, 3), (1, 2), (3, 1)):
        x[0, 0, r, q] = 5
    x[0, 1] = x[0, 0].T  # transposed: (0, 2), (3, 1), (2, 1), (1, 3): (0, 2) first
    x[0, 2, 3, 3] = x[0, 2, 0, 3] = x[0, 2, 3, 0] = 7  # corners but the first: (0, 3)
    out, arg = roilib.roi_pool(x, np.array([[0, 0, 0, 3, 3]], np.float32), 1, 1.0, return_argmax=True)
    np.testing.assert_array_equal(out[0, :, 0, 0], [5, 5, 7])
    np.testing.assert_array_equal(arg[0, :, 0, 0], [1 * 4 + 2, 0 * 4 + 2, 0 * 4 + 3])


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_argmax_on_maps_of_few_distinct_values_equals_a_plain_loop(rng, argmax_layout, dtype):
    # integers 0..3: nearly every bin has its max in several rows and columns
    x = rng.integers(0, 4, (2, 4, 14, 17)).astype(dtype)
    rois = _boxes(rng, 20, 2, 14, 17, 0.5)
    expected, expected_arg = _loop_roi_pool(x, rois, (3, 5), 0.5)
    out, arg = roilib.roi_pool(x, rois, (3, 5), 0.5, return_argmax=True)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(arg, expected_arg)


def test_roi_pool_argmax_without_boxes_is_empty(argmax_layout):
    x = np.ones((1, 3, 5, 5), np.float32)
    out, arg = roilib.roi_pool(x, np.zeros((0, 5), np.float32), (2, 3), 1.0, return_argmax=True)
    assert out.shape == arg.shape == (0, 3, 2, 3)
    assert out.dtype == np.float32 and arg.dtype == np.int64


def _window_max_argmax(x, rois, output_size, spatial_scale):
    """The argmax as ``_pooling.window_max`` finds it (columns first), box by box."""
    n, c, h, w = x.shape
    dtype = np.float32 if x.dtype == np.float16 else x.dtype
    bins = roi_pool_bins(rois, output_size, spatial_scale, h, w, dtype)
    arg = np.full((len(rois), c) + output_size, -1, np.int64)
    for k in range(len(rois)):
        r0, c0 = bins.hstart[k].min(), bins.wstart[k].min()
        r1, c1 = bins.hend[k].max(), bins.wend[k].max()
        if r1 <= r0 or c1 <= c0:
            continue
        region = np.ascontiguousarray(x[int(rois[k, 0]), :, r0:r1, c0:c1].transpose(1, 2, 0))
        rows, cols = (bins.hstart[k] - r0, bins.hend[k] - r0), (bins.wstart[k] - c0, bins.wend[k] - c0)
        _, ar, ac, empty = _pooling.window_max(region, rows, cols, True)
        arg[k] = np.where(empty[..., None], -1, (ar + r0) * w + ac + c0).transpose(2, 0, 1)
    return arg


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_argmax_of_a_nan_max_is_where_window_max_puts_it(rng, argmax_layout, dtype):
    x = np.round(rng.standard_normal((2, 3, 12, 15)), 1).astype(dtype)
    x[1, 0, 3:7, 5] = np.nan  # a column of NaN
    x[0, 2, 8, 2:4] = np.nan  # a row
    x[1, 1, 0, 0] = x[1, 1, 11, 14] = np.nan  # corners
    rois = _boxes(rng, 25, 2, 12, 15, 0.5)
    expected, expected_arg = _loop_roi_pool(x, rois, (3, 4), 0.5)
    out, arg = roilib.roi_pool(x, rois, (3, 4), 0.5, return_argmax=True)
    np.testing.assert_array_equal(out, roilib.roi_pool(x, rois, (3, 4), 0.5))
    assert np.isnan(out).any()
    np.testing.assert_array_equal(arg, _window_max_argmax(x, rois, (3, 4), 0.5))
    finite = ~np.isnan(out)  # elsewhere the plain loop's answer
    np.testing.assert_array_equal(arg[finite], expected_arg[finite])


def test_roi_pool_argmax_of_bins_taller_than_255_rows_equals_a_plain_loop(rng, argmax_layout):
    x = np.round(rng.standard_normal((1, 2, 600, 3)), 1).astype(np.float32)
    rois = np.array([[0, 0, 0, 2, 599], [0, 1, 10, 2, 400]], np.float32)  # bins of 300 and 196 rows
    expected, expected_arg = _loop_roi_pool(x, rois, (2, 2), 1.0)
    out, arg = roilib.roi_pool(x, rois, (2, 2), 1.0, return_argmax=True)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(arg, expected_arg)


def test_roi_pool_argmax_on_a_map_too_wide_for_16_bit_offsets_equals_a_plain_loop(rng, argmax_layout):
    x = np.round(rng.standard_normal((1, 1, 3, 40000)), 1).astype(np.float32)
    rois = np.array([[0, 0, 0, 39999, 2], [0, 39000, 1, 39990, 2]], np.float32)
    expected, expected_arg = _loop_roi_pool(x, rois, (2, 3), 1.0)
    out, arg = roilib.roi_pool(x, rois, (2, 3), 1.0, return_argmax=True)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(arg, expected_arg)
    assert arg.max() > 2**16  # a flat index past what 16 bits hold


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_argmax_is_the_same_searched_a_channel_at_a_time(rng, monkeypatch, dtype):
    x = np.round(rng.standard_normal((2, 5, 11, 13)), 1).astype(dtype)
    x[1, 3, 4, 4] = np.nan
    rois = _boxes(rng, 12, 2, 11, 13, 0.5)
    expected = roilib.roi_pool(x, rois, (3, 4), 0.5, return_argmax=True)
    monkeypatch.setattr(roi_pool_module, "ARGMAX_WHOLE_MAP_FRACTION", float("inf"))
    monkeypatch.setattr(roi_pool_module, "ARGMAX_WORK_BYTES", 1)  # one channel per step
    out, arg = roilib.roi_pool(x, rois, (3, 4), 0.5, return_argmax=True)
    assert out.tobytes() == expected[0].tobytes()
    np.testing.assert_array_equal(arg, expected[1])


def test_roi_pool_argmax_of_a_strided_map_equals_that_of_a_contiguous_copy(rng, argmax_layout):
    big = np.round(rng.standard_normal((2, 3, 11, 26)), 1).astype(np.float32)
    x = big[..., ::2]  # columns not contiguous
    rois = _boxes(rng, 12, 2, 11, 13, 0.5)
    out, arg = roilib.roi_pool(x, rois, (3, 4), 0.5, return_argmax=True)
    expected, expected_arg = roilib.roi_pool(np.ascontiguousarray(x), rois, (3, 4), 0.5, return_argmax=True)
    np.testing.assert_array_equal(out, expected)
    np.testing.assert_array_equal(arg, expected_arg)


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_values_path_equals_the_argmax_path_bitwise(rng, values_layout, argmax_layout, dtype):
    # larger than the loop can afford: boxes of a few to tens of pixels, many channels
    x = rng.standard_normal((2, 17, 40, 50)).astype(dtype)
    rois = _boxes(rng, 40, 2, 40, 50, 0.25)
    values = roilib.roi_pool(x, rois, (7, 5), 0.25)
    with_arg, _ = roilib.roi_pool(x, rois, (7, 5), 0.25, return_argmax=True)
    assert values.view(np.uint8).tobytes() == with_arg.view(np.uint8).tobytes()  # -0.0 too


@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_values_path_equals_the_argmax_path_bitwise_on_signed_zeros(
    rng, values_layout, argmax_layout, dtype
):
    # maxima of 0.0 and -0.0 mixed: which zero a max keeps depends on the order it is
    # taken in, so both paths must take it in the same order
    shape = (2, 5, 20, 24)
    x = np.where(rng.random(shape) < 0.3, -1.0, rng.choice([-0.0, 0.0], shape)).astype(dtype)
    rois = _boxes(rng, 30, 2, 20, 24, 0.5)
    values = roilib.roi_pool(x, rois, (4, 3), 0.5)
    with_arg, arg = roilib.roi_pool(x, rois, (4, 3), 0.5, return_argmax=True)
    zeros = values == 0
    assert (zeros & np.signbit(values)).any() and (zeros & ~np.signbit(values)).any()
    assert values.view(np.uint8).tobytes() == with_arg.view(np.uint8).tobytes()
    np.testing.assert_array_equal(arg, _loop_roi_pool(x, rois, (4, 3), 0.5)[1])  # -0.0 == 0.0: the first


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_first_max_rows_gives_bin_max_and_the_rank_of_the_first_row_holding_it(rng, dtype):
    a = rng.integers(0, 3, (9, 12)).astype(dtype)  # ties in most columns
    starts, ends = [0, 2, 2, 5, 8, 7, 0], [3, 2, 5, 9, 9, 6, 9]  # overlaps, empty, 1, 2, 3, 4, 9 rows
    top = 9
    values = np.full((len(starts), 12), 7, dtype)
    ranks = np.zeros((len(starts), 12), np.uint8)
    _pooling.first_max_rows(a, starts, ends, top, values, ranks)
    expected = np.full((len(starts), 12), 7, dtype)
    _pooling.bin_max(a, starts, ends, expected)
    assert values.tobytes() == expected.tobytes()
    for i, (s, e) in enumerate(zip(starts, ends)):
        if e > s:  # rank top - j of the first row j holding the max
            first = np.argmax(a[s:e] == expected[i], axis=0)
            np.testing.assert_array_equal(ranks[i], top - first)


def test_first_max_windows_takes_the_largest_key_among_the_columns_holding_the_max(rng):
    values = rng.integers(0, 3, (2, 7, 5)).astype(np.float32)  # (P, S, C), many ties
    keys = rng.permutation(2 * 7 * 5).reshape(2, 7, 5).astype(np.uint16) + 1
    bins = [(0, 3), (2, 4), (4, 7), (6, 7)]  # overlapping, one column
    m = max(e - s for s, e in bins)
    windows = np.array([[min(s + j, e - 1) for s, e in bins] for j in range(m)])  # the last column repeated
    best = np.zeros((2, len(bins), 5), np.float32)
    key = np.zeros((2, len(bins), 5), np.uint16)
    _pooling.first_max_windows(values, keys, windows, best, key)
    for q, (s, e) in enumerate(bins):
        top = values[:, s:e].max(axis=1)
        np.testing.assert_array_equal(best[:, q], top)
        holding = np.where(values[:, s:e] == top[:, None], keys[:, s:e], 0)
        np.testing.assert_array_equal(key[:, q], holding.max(axis=1))
    values[1, 4, 2] = np.nan  # a NaN max: nothing equals it, key 0
    _pooling.first_max_windows(values, keys, windows, best, key)
    assert np.isnan(best[1, 2, 2]) and key[1, 2, 2] == 0


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


#: the backward's scatter orders: box by box (a map whose gradient fits in cache), and
#: channel by channel (a larger one)
SCATTER_ORDERS = {"box_major": 1 << 40, "channel_major": 0}


@pytest.mark.parametrize("order", SCATTER_ORDERS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_roi_pool_backward_is_the_same_in_any_chunk_size_and_scatter_order(rng, monkeypatch, dtype, order):
    x = np.round(rng.standard_normal((2, 5, 12, 15)), 1).astype(dtype)
    rois = _boxes(rng, 20, 2, 12, 15, 0.5)  # some empty bins: -1 in some chunks only
    g = rng.standard_normal((len(rois), 5, 3, 4)).astype(dtype)
    _, argmax = roilib.roi_pool(x, rois, (3, 4), 0.5, return_argmax=True)
    searched = roilib.roi_pool_backward(g, x, rois, (3, 4), 0.5)  # argmax found again
    monkeypatch.setattr(roi_pool_module, "BOX_MAJOR_BYTES", SCATTER_ORDERS[order])
    one_go = roilib.roi_pool_backward(g, x, rois, (3, 4), 0.5, argmax=argmax)
    monkeypatch.setattr(roi_pool_module, "_CHUNK", 1)  # one box / one channel per step
    chunked = roilib.roi_pool_backward(g, x, rois, (3, 4), 0.5, argmax=argmax)
    as_int32 = roilib.roi_pool_backward(g, x, rois, (3, 4), 0.5, argmax=argmax.astype(np.int32))
    strided_g = roilib.roi_pool_backward(np.asfortranarray(g), x, rois, (3, 4), 0.5, argmax=argmax)  # copied
    assert one_go.dtype == x.dtype
    for other in (searched, chunked, as_int32, strided_g):
        np.testing.assert_array_equal(one_go, other)


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


@pytest.mark.parametrize("order", SCATTER_ORDERS)
@pytest.mark.parametrize("bad", [np.array(-2), np.array(36), np.array(2**64 - 1, np.uint64)])
def test_roi_pool_backward_rejects_an_argmax_out_of_range_in_any_chunk(rng, monkeypatch, bad, order):
    x = rng.standard_normal((1, 3, 6, 6)).astype(np.float32)
    rois = np.array([[0, 0, 0, 4, 4], [0, 1, 1, 5, 5]], np.float32)  # the last box: the last chunk
    out, argmax = roilib.roi_pool(x, rois, 2, 1.0, return_argmax=True)
    monkeypatch.setattr(roi_pool_module, "_CHUNK", 1)
    monkeypatch.setattr(roi_pool_module, "BOX_MAJOR_BYTES", SCATTER_ORDERS[order])
    argmax = argmax.astype(bad.dtype if bad.dtype == np.uint64 else np.int64)
    argmax[-1, 2, 1, 1] = bad  # the last box and channel: the last chunk of either order
    with pytest.raises(ValueError, match="argmax entries must be -1 or a flat index"):
        roilib.roi_pool_backward(out, x, rois, 2, 1.0, argmax=argmax)
