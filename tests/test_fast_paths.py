"""The CPU speed work of issue 13 changed how the reference computes, never what.

* RoIPool's forward can return its argmax (torchvision's layout) and the backward can
  take it back: the gradient is bitwise the one the backward finds on its own.
* Few boxes on a large map are read block by block and their gradient added in place;
  many boxes copy the map channels-last once. Both layouts add the same numbers in the
  same order, so every op gives bitwise the same result either way.
* RoIAlign's average reads few boxes' blocks of the ``(N, C, H, W)`` map in place and
  many boxes' from channels-last copies of a channel group at a time. The two multiply
  in another order, so they agree to rounding, and both equal the per-sample matrices
  the backward uses.
* ``python -m roilib.bench``'s workers run every op without torchvision.
Speed itself is measured by the benchmark, never asserted here.
"""
import importlib

import numpy as np
import pytest

import roilib
from roilib import bench
from roilib._validate import compute_dtype
from roilib.reference import _layout

# the module: ``roilib.reference.roi_align`` the attribute is the function
align_module = importlib.import_module("roilib.reference.roi_align")

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
    spec = dict(impl="roilib", case=case, backward=backward, boxes=3, channels=4, map_hw=[10, 12], repeat=1,
                min_seconds=0)
    result = bench._worker(spec)
    assert result["best"] > 0 and np.isfinite(result["checksum"])


def _run_taking(seconds):
    """A bench runner that says each call took ``seconds`` (as the backward runners do)."""
    def run():
        run.calls += 1
        run.elapsed = seconds

    run.calls, run.times_itself = 0, True
    return run


def test_bench_times_short_calls_until_they_fill_the_minimum_time():
    run = _run_taking(0.1)
    assert bench._timed_calls(run, 3, min_seconds=0.45) == [0.1] * 5 and run.calls == 5


def test_bench_times_long_calls_only_repeat_times():
    run = _run_taking(2.0)
    assert bench._timed_calls(run, 3, min_seconds=0.5) == [2.0] * 3


def test_bench_times_at_most_max_calls():
    run = _run_taking(0.0)
    assert len(bench._timed_calls(run, 3, min_seconds=0.5)) == bench.MAX_CALLS


def test_bench_tables_format():
    timing = dict(best=0.002, median=0.003, peak_mib=4.0, checksum=1.0)
    row = dict(case="roi_pool", op="roi_pool", pass_="forward", boxes=16, channels=8, map_hw=[10, 12],
               roilib=timing, torchvision=dict(timing, best=0.004), axis="boxes")
    assert "0.50" in bench.format_table([row])
    assert "0.50" in bench.format_scaling([row])



def test_bench_rows_say_how_many_boxes_they_ran(monkeypatch):
    """The FPN rows run a workload of their own: they print its box count, not the block's."""
    ran = []
    monkeypatch.setattr(bench, "_peers", lambda: ["roilib"])
    monkeypatch.setattr(bench, "_row", lambda case, backward, boxes, *a: ran.append((case, boxes)) or {})
    bench.run_cpu(1, 1, box_counts=(715, 16))
    ops = {bench.CASES[case][1] for case, _ in ran}
    assert "multiscale_roi_align" in ops and "roi_pool" in ops
    for case, boxes in ran:
        op = bench.CASES[case][1]
        assert boxes == bench.FPN_BOXES if op == "multiscale_roi_align" else boxes in (715, 16)


def test_bench_scaling_measures_only_the_cases_asked_for(monkeypatch):
    ran = []
    monkeypatch.setattr(bench, "_peers", lambda: ["roilib"])
    monkeypatch.setattr(bench, "_row", lambda case, *a: ran.append(bench.CASES[case][0]) or {})
    bench.run_scaling(1, 1, only="roi_warp")
    assert ran and set(ran) == {"roi_warp sr=2"}
    ran.clear()
    bench.run_scaling(1, 1)
    assert len(set(ran)) == len(bench.SCALING_CASES)


def test_bench_tables_fit_the_longest_op_label():
    timing = dict(best=0.002, median=0.003, peak_mib=4.0, checksum=1.0)
    label = "a_rather_long_op_label sr=2"  # longer than the default 24-character column
    row = dict(case=label, op="roi_pool", pass_="forward", boxes=1000, channels=8, map_hw=[10, 12],
               roilib=timing, torchvision=dict(timing, best=0.004), axis="boxes")
    for table in (bench.format_table([row]), bench.format_scaling([row])):
        head, _, line = table.splitlines()
        assert label + " " in line
        assert line.index("forward") == head.index("pass")  # the columns stay aligned


# -- RoIAlign's average: in place, in channel groups, per sample ---------------------------

ALIGN_SHAPE = (2, 10, 40, 48)  # 10 channels: groups of 4, 4 and 2; 40 rows: tall boxes
ALIGN_SCALE = 0.5
#: float16 is computed in float32 either way; the two float32 results may round to
#: neighbouring float16 values
ALIGN_TOL = {np.float16: 2**-10, np.float32: 2e-6, np.float64: 1e-13}


def _align_boxes(rng):
    """Random boxes (some off the map) and the cases each path treats apart."""
    n, _, h, w = ALIGN_SHAPE
    s = ALIGN_SCALE
    rois = random_boxes(rng, 12, n, h, w, s, margin=3, min_size=0.5)
    special = [
        [1, 2 / s, 0, 9 / s, (h - 1) / s],  # image 1, every row: tall bins, rows first
        [0, 0, 0, (w - 1) / s, (h - 1) / s],  # the whole map: sparse rows and columns at sr=2
        [1, 3 / s, 30 / s, 44 / s, 33 / s],  # wide and short
        [0, (w + 5) / s, 4 / s, (w + 9) / s, 8 / s],  # right of the map: zeros
        [1, 6 / s, 6 / s, 6 / s, 6 / s],  # a point: no samples when aligned and adaptive
    ]
    return np.concatenate([rois, special])


def _average_per_sample(x, rois, output_size, sampling_ratio, aligned):
    """RoIAlign's average from each box's per-sample matrices (those of the backward),
    summed per bin, on a channels-last copy of the map."""
    dtype = compute_dtype(x.dtype)
    hwc = _layout.channels_last(x)
    rois = rois.astype(dtype)
    out = np.zeros((rois.shape[0], x.shape[1]) + output_size, dtype=dtype)
    h, w = x.shape[2:]
    boxes = align_module._sampled(h, w, dtype, rois, output_size, ALIGN_SCALE, sampling_ratio, aligned)
    for k, image, box, _ in boxes:
        block = _layout.take_block(hwc[image], box.rows, box.cols)
        value = box.samples(block, box.bin_sum(box.by, 0), box.bin_sum(box.bx, 1)) / box.count
        out[k] = value.transpose(2, 0, 1)
    return out.astype(x.dtype)


def _in_place_and_grouped(monkeypatch, *args, **kwargs):
    monkeypatch.setattr(_layout, "CHANNEL_GROUP", 4)
    monkeypatch.setattr(_layout, "GROUPED_MAP_FRACTION", float("inf"))  # never in groups
    in_place = roilib.roi_align(*args, **kwargs)
    monkeypatch.setattr(_layout, "GROUPED_MAP_FRACTION", 0.0)  # always in groups
    grouped = roilib.roi_align(*args, **kwargs)
    return in_place, grouped


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_average_in_place_in_groups_from_sampled_rows_and_per_sample_agree(
    rng, monkeypatch, dtype, sampling_ratio, aligned
):
    x = rng.standard_normal(ALIGN_SHAPE).astype(dtype)
    rois = _align_boxes(rng)
    in_place, grouped = _in_place_and_grouped(
        monkeypatch, x, rois, (3, 4), ALIGN_SCALE, sampling_ratio=sampling_ratio, aligned=aligned
    )
    # in place, every box (off the map, on image 1, adaptive grids...) read through only
    # the rows its samples read, each bin's weighted on their own
    monkeypatch.setattr(align_module, "SAMPLE_ROWS_SHARE", float("inf"))
    monkeypatch.setattr(_layout, "GROUPED_MAP_FRACTION", float("inf"))
    sampled_rows = roilib.roi_align(x, rois, (3, 4), ALIGN_SCALE, sampling_ratio, aligned)
    per_sample = _average_per_sample(x, rois, (3, 4), sampling_ratio, aligned)
    tol = ALIGN_TOL[dtype]
    for got in (in_place, grouped, sampled_rows):
        assert got.dtype == x.dtype and got.shape == (rois.shape[0], 10, 3, 4)
        np.testing.assert_allclose(got, per_sample, rtol=tol, atol=tol)
        assert not got[-2].any()  # the box right of the map


@pytest.mark.parametrize("slack", [1.0, 1e9])
@pytest.mark.parametrize("rows_first", [0, 1e9])
@pytest.mark.parametrize("band, halves", [(0, 0), (1e9, 0), (1e9, 1e9)])
@pytest.mark.parametrize("sample_rows", [0, 1e9])
def test_roi_align_average_runs_orders_and_bands_agree(
    rng, monkeypatch, slack, rows_first, band, halves, sample_rows
):
    # channels-last: every box read as whole runs (zero weights on untouched pixels) or
    # only its touched pixels; in place: only the rows the samples read (every box, or
    # none), or rows or columns first, bin by bin, half the bins at a time or all at once.
    # The same numbers to rounding.
    x = rng.standard_normal(ALIGN_SHAPE)
    rois = _align_boxes(rng)
    expected = _average_per_sample(x, rois, (3, 4), 2, True)
    monkeypatch.setattr(align_module, "SAMPLE_ROWS_SHARE", sample_rows)
    monkeypatch.setattr(align_module, "SPAN_SLACK", slack)
    monkeypatch.setattr(align_module, "ROWS_FIRST_WINDOW", rows_first)
    monkeypatch.setattr(align_module, "BAND_WINDOW", band)
    monkeypatch.setattr(align_module, "HALVES_WINDOW", halves)
    for got in _in_place_and_grouped(monkeypatch, x, rois, (3, 4), ALIGN_SCALE, 2, True):
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)


def test_roi_align_average_sampled_rows_on_a_hand_computed_case(monkeypatch):
    # one column, rows 0..19 holding their index: a tall box at sr=2 reads 4 of its 17
    # rows per bin; each bin's average is the mean of its samples' y (the map is linear)
    x = np.arange(20.0).reshape(1, 1, 20, 1)
    rois = np.array([[0, 0.0, 0.0, 0.0, 18.0]])  # not aligned: y from 0 to 18, 3 bins of 6
    monkeypatch.setattr(_layout, "GROUPED_MAP_FRACTION", float("inf"))
    monkeypatch.setattr(align_module, "SAMPLE_ROWS_SHARE", 1.0)  # 3 bins * 4 rows <= 17 rows

    def other_path(*args):
        raise AssertionError("read by rows or columns first")

    monkeypatch.setattr(align_module, "_rows_first", other_path)
    monkeypatch.setattr(align_module, "_columns_first", other_path)
    got = roilib.roi_align(x, rois, (3, 1), 1.0, sampling_ratio=2, aligned=False)
    np.testing.assert_allclose(got[0, 0, :, 0], [3.0, 9.0, 15.0], rtol=0, atol=1e-14)


def test_roi_align_average_without_boxes_in_either_layout(monkeypatch):
    x = np.ones(ALIGN_SHAPE, dtype=np.float32)
    for got in _in_place_and_grouped(monkeypatch, x, np.zeros((0, 5), np.float32), output_size=2):
        assert got.shape == (0, 10, 2, 2) and got.dtype == np.float32


def test_roi_align_average_one_pixel_bins_equal_the_map(monkeypatch):
    # boxes over whole pixels with one sample per bin at each pixel's own position read
    # the map itself: a hand-computed case for both layouts, on image 1
    x = np.arange(2 * 10 * 6 * 8, dtype=np.float64).reshape(2, 10, 6, 8)
    rois = np.array([[1, 1.0, 2.0, 5.0, 5.0]])  # aligned: bins centred on pixels 1..4, 2..4
    for got in _in_place_and_grouped(monkeypatch, x, rois, (3, 4), sampling_ratio=1, aligned=True):
        np.testing.assert_array_equal(got[0], x[1, :, 2:5, 1:5])


def test_multiscale_average_in_groups_equals_in_place(rng, monkeypatch):
    maps = [rng.standard_normal((2, 6, 32 // f, 40 // f)) for f in (1, 2, 4, 8)]
    rois = random_boxes(rng, 30, 2, 128, 160, 1.0, margin=8, min_size=2)
    scales = (1 / 4, 1 / 8, 1 / 16, 1 / 32)
    monkeypatch.setattr(_layout, "CHANNEL_GROUP", 4)
    monkeypatch.setattr(_layout, "GROUPED_MAP_FRACTION", float("inf"))
    in_place = roilib.multiscale_roi_align(maps, rois, (3, 4), scales, 2)
    monkeypatch.setattr(_layout, "GROUPED_MAP_FRACTION", 0.0)
    grouped = roilib.multiscale_roi_align(maps, rois, (3, 4), scales, 2)
    assert in_place.any()
    np.testing.assert_allclose(grouped, in_place, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("view", ["channels-last", "reversed columns"])
def test_roi_align_average_of_a_strided_map_equals_a_contiguous_one(rng, monkeypatch, view):
    x = rng.standard_normal(ALIGN_SHAPE)
    if view == "channels-last":
        strided = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    else:
        strided = np.ascontiguousarray(x[..., ::-1])[..., ::-1]
    assert not strided.flags.c_contiguous
    rois = _align_boxes(rng)
    expected = roilib.roi_align(x, rois, (3, 4), ALIGN_SCALE, 2, True)
    for got in _in_place_and_grouped(monkeypatch, strided, rois, (3, 4), ALIGN_SCALE, 2, True):
        np.testing.assert_allclose(got, expected, rtol=1e-13, atol=1e-13)


def test_the_compact_bench_table_fits_a_book_page_and_keeps_the_ratios():
    from roilib import bench, bench_record

    full = bench.format_table(bench_record.TABLE_ROWS).splitlines()
    compact = bench.format_table(bench_record.TABLE_ROWS, compact=True).splitlines()
    assert max(map(len, compact)) < 80 < max(map(len, full))
    assert "MiB" not in compact[0] and "sum diff" not in compact[0]
    for short, long in zip(compact[2:], full[2:]):
        # same op, times and ratio; the memory ratio is the full table's "mem x"
        assert short.split()[:-1] == long.split()[:len(short.split()) - 1]
        assert short.split()[-1] == long.split()[-2]
