"""Position-sensitive RoIPool and RoIAlign (R-FCN): hand-computed values, adjointness,
finite differences, bad inputs, and the kernels built for the CPU against the reference.

Parity with torchvision is in tests/test_family_parity.py.
"""
import os
import shutil

import numpy as np
import pytest

import roilib
from roilib.family import ps_channel, ps_roi_pool_bins
from helpers import directional_derivative, random_boxes

# 1 image, C_out = 1, a 2 x 2 output: four channel groups of one channel each.
# Channel c holds 10 c + (4 r + col) on a 4 x 4 map: bilinear on it is exact.
HAND = (10.0 * np.arange(4)[:, None, None] + np.arange(16.0).reshape(4, 4))[None]


def _ps_case(rng, dtype=np.float64, c_out=2, size=(3, 2), shape=(2, 9, 11)):
    n, h, w = shape
    x = rng.standard_normal((n, c_out * size[0] * size[1], h, w)).astype(dtype)
    rois = np.concatenate([
        random_boxes(rng, 8, n, h, w, 0.5, margin=2.0),
        [[0, -6.0, -4.0, 30.0, 26.0], [1, 4.0, 4.0, 4.0, 4.0], [0, 14.0, 3.0, 6.0, 12.0], [1, 16.0, 14.0, 21.0, 17.6]],
    ])
    return x, rois


# -- the channel mapping -----------------------------------------------------------------


def test_ps_channel_is_torchvisions_mapping():
    # c_in = (c * PH + ph) * PW + pw: output channel 1, bin (1, 0) of a 2 x 3 grid
    assert ps_channel(2, (2, 3))[1, 1, 0] == (1 * 2 + 1) * 3 + 0


# -- hand-computed values -----------------------------------------------------------------


def test_ps_roi_pool_by_hand_the_last_row_and_column_are_never_read():
    # box [0, 4] x [0, 4]: bin edges 0, 2, 4, clipped to H - 1 = 3, so the second bins
    # are [2, 3): ch0 mean{0,1,4,5}; ch1 rows 0-1 col 2 {2, 6} + 10; ch2 row 2 cols 0-1
    # {8, 9} + 20; ch3 pixel (2, 2) = 10 + 30
    out = roilib.ps_roi_pool(HAND, np.array([[0, 0.0, 0.0, 4.0, 4.0]]), 2)
    np.testing.assert_array_equal(out[0, 0], [[2.5, 14.0], [28.5, 40.0]])


def test_ps_roi_pool_by_hand_overlapping_bins():
    # box [0, 3]: length 3, bins [0, 2) and [1, 3)
    out = roilib.ps_roi_pool(HAND, np.array([[0, 0.0, 0.0, 3.0, 3.0]]), 2)
    np.testing.assert_array_equal(out[0, 0], [[2.5, 13.5], [26.5, 37.5]])


def test_ps_roi_align_by_hand_one_sample_per_bin():
    # aligned box [0.5, 2.5] - 0.5 = [0, 2]: bin centres 0.5 and 1.5; the map is linear
    # (4 y + x per channel), so each value is 4 y + x + 10 c
    out = roilib.ps_roi_align(HAND, np.array([[0, 0.5, 0.5, 2.5, 2.5]]), 2, 1.0, 1)
    np.testing.assert_allclose(out[0, 0], [[2.5, 13.5], [26.5, 37.5]], rtol=0, atol=1e-12)


def test_ps_roi_pool_bins_clip_to_size_minus_one():
    bins = ps_roi_pool_bins(np.array([[0, 0.0, 0.0, 4.0, 4.0]]), (2, 2), 1.0, 4, 4)
    assert bins.hend.tolist() == [[2, 3]] and bins.wstart.tolist() == [[0, 2]]


def test_ps_roi_align_zero_size_box_outputs_zero_not_nan():
    out = roilib.ps_roi_align(HAND, np.array([[0, 1.0, 1.0, 1.0, 3.0]]), 2, 1.0, -1)
    assert np.array_equal(out, np.zeros_like(out))


def test_no_boxes():
    out = roilib.ps_roi_align(HAND, np.zeros((0, 5)), 2)
    assert out.shape == (0, 1, 2, 2)
    grad = roilib.ps_roi_pool_backward(np.zeros((0, 1, 2, 2)), HAND, np.zeros((0, 5)), 2)
    assert np.array_equal(grad, np.zeros_like(HAND))


def test_output_group_reads_only_its_channel_group(rng):
    """Changing channel group (ph, pw) changes only bin (ph, pw) of each output channel."""
    x, rois = _ps_case(rng)
    base = roilib.ps_roi_align(x, rois, (3, 2), 0.5, 2)
    y = x.copy()
    y[:, ps_channel(2, (3, 2))[1, 2, 1]] += 1.0  # output channel 1, bin (2, 1)
    changed = roilib.ps_roi_align(y, rois, (3, 2), 0.5, 2) != base
    assert changed[:, 1, 2, 1].any()
    changed[:, 1, 2, 1] = False
    assert not changed.any()


# -- backward: adjointness and finite differences -------------------------------------------


@pytest.mark.parametrize("op", ["ps_roi_pool", "ps_roi_align"])
def test_backward_is_the_adjoint_of_the_forward(op, rng):
    x, rois = _ps_case(rng)
    fwd, bwd = getattr(roilib, op), getattr(roilib, op + "_backward")
    out = fwd(x, rois, (3, 2), 0.5)
    g = rng.standard_normal(out.shape)
    np.testing.assert_allclose(np.vdot(g, out), np.vdot(bwd(g, x, rois, (3, 2), 0.5), x), rtol=1e-12)


@pytest.mark.parametrize("op", ["ps_roi_pool", "ps_roi_align"])
def test_backward_matches_finite_differences(op, rng):
    x, rois = _ps_case(rng)
    fwd, bwd = getattr(roilib, op), getattr(roilib, op + "_backward")
    g = rng.standard_normal(fwd(x, rois, (3, 2), 0.5).shape)
    direction = rng.standard_normal(x.shape)
    numeric = directional_derivative(lambda z: np.vdot(g, fwd(z, rois, (3, 2), 0.5)), x, direction, 1e-3)
    np.testing.assert_allclose(np.vdot(bwd(g, x, rois, (3, 2), 0.5), direction), numeric, rtol=1e-8)


def test_float32_close_to_float64(rng):
    x, rois = _ps_case(rng)
    for op in (roilib.ps_roi_pool, roilib.ps_roi_align):
        np.testing.assert_allclose(op(x.astype(np.float32), rois, (3, 2), 0.5), op(x, rois, (3, 2), 0.5), atol=2e-6)


# -- the vectorised reference against direct loops ----------------------------------------
#
# The reference gathers every (box, bin) rectangle for all boxes at once (sorted runs of one
# shape, split into batches); these loops compute the same values one bin (and one sample)
# at a time from the shared geometry.


def _loop_ps_roi_pool(x, rois, size, scale, g=None):
    """PS-RoIPool by a loop over bins: the forward, or with ``g`` the backward."""
    dt = np.float64 if x.dtype == np.float64 else np.float32
    bins = ps_roi_pool_bins(rois.astype(dt), size, scale, x.shape[2], x.shape[3], dt)
    ch = ps_channel(x.shape[1] // (size[0] * size[1]), size)
    out = np.zeros((len(rois), ch.shape[0]) + size)
    grad = np.zeros(x.shape)
    for k in range(len(rois)):
        for i in range(size[0]):
            for j in range(size[1]):
                hs, he, ws, we = bins.hstart[k, i], bins.hend[k, i], bins.wstart[k, j], bins.wend[k, j]
                if he <= hs or we <= ws:
                    continue
                cin, img = ch[:, i, j], int(rois[k, 0])
                area = (he - hs) * (we - ws)
                out[k, :, i, j] = x[img, cin, hs:he, ws:we].astype(np.float64).sum(axis=(1, 2)) / area
                if g is not None:
                    grad[img, cin, hs:he, ws:we] += g[k, :, i, j, None, None] / area
    return out if g is None else grad


def _loop_ps_roi_align(x, rois, size, scale, ratio, g=None):
    """PS-RoIAlign by a loop over samples (``bilinear_corners``): forward, or backward."""
    from roilib.geometry import bilinear_corners, roi_align_boxes, sample_points

    dt = np.float64 if x.dtype == np.float64 else np.float32
    geo = roi_align_boxes(rois.astype(dt), size, scale, ratio, True, dt)
    ch = ps_channel(x.shape[1] // (size[0] * size[1]), size)
    out = np.zeros((len(rois), ch.shape[0]) + size)
    grad = np.zeros(x.shape)
    for k in range(len(rois)):
        img = int(rois[k, 0])
        ys = sample_points(geo.start_y[k], geo.bin_h[k], int(geo.grid_h[k]), size[0], dt).reshape(size[0], -1)
        xs = sample_points(geo.start_x[k], geo.bin_w[k], int(geo.grid_w[k]), size[1], dt).reshape(size[1], -1)
        for i in range(size[0]):
            for j in range(size[1]):
                cin = ch[:, i, j]
                for y in ys[i]:
                    for xx in xs[j]:
                        b = bilinear_corners(y, xx, x.shape[2], x.shape[3], dt)
                        for a, r in enumerate((b.y_low, b.y_high)):
                            for c, col in enumerate((b.x_low, b.x_high)):
                                w = float(b.weights[a, c]) / geo.count[k]
                                out[k, :, i, j] += w * x[img, cin, r, col]
                                if g is not None:
                                    grad[img, cin, r, col] += w * g[k, :, i, j]
    return out if g is None else grad


def _odd_boxes(n_images):
    """Boxes off the map, across its edges, of zero or inverted size, in the last image."""
    last = n_images - 1
    return np.array([
        [last, -20.0, -20.0, -8.0, -6.0], [0, 40.0, 3.0, 60.0, 9.0], [last, -5.0, 2.0, 7.0, 30.0],
        [0, 3.0, 3.0, 3.0, 3.0], [last, 9.0, 5.0, 4.0, 12.0], [0, 0.0, 0.0, 22.0, 18.0],
    ])


LOOP_TOL = {np.float16: 2e-3, np.float32: 2e-5, np.float64: 1e-12}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_ps_roi_pool_matches_a_loop_over_bins(dtype, rng):
    x, rois = _ps_case(rng, dtype)
    rois = np.concatenate([rois, _odd_boxes(2)])
    out = roilib.ps_roi_pool(x, rois, (3, 2), 0.5)
    assert out.dtype == dtype
    np.testing.assert_allclose(out, _loop_ps_roi_pool(x, rois, (3, 2), 0.5), rtol=0, atol=LOOP_TOL[dtype])
    g = rng.standard_normal(out.shape).astype(dtype)
    grad = roilib.ps_roi_pool_backward(g, x, rois, (3, 2), 0.5)
    assert grad.dtype == dtype
    np.testing.assert_allclose(grad, _loop_ps_roi_pool(x, rois, (3, 2), 0.5, g), rtol=0, atol=LOOP_TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2])
def test_ps_roi_align_matches_a_loop_over_samples(dtype, sampling_ratio, rng):
    x, rois = _ps_case(rng, dtype)
    rois = np.concatenate([rois, _odd_boxes(2)])
    out = roilib.ps_roi_align(x, rois, (3, 2), 0.5, sampling_ratio)
    assert out.dtype == dtype
    expected = _loop_ps_roi_align(x, rois, (3, 2), 0.5, sampling_ratio)
    np.testing.assert_allclose(out, expected, rtol=0, atol=LOOP_TOL[dtype])
    g = rng.standard_normal(out.shape).astype(dtype)
    grad = roilib.ps_roi_align_backward(g, x, rois, (3, 2), 0.5, sampling_ratio)
    assert grad.dtype == dtype
    expected = _loop_ps_roi_align(x, rois, (3, 2), 0.5, sampling_ratio, g)
    np.testing.assert_allclose(grad, expected, rtol=0, atol=LOOP_TOL[dtype])


@pytest.mark.parametrize("chunk", [None, 1])
def test_ps_roi_pool_sums_a_bin_in_torchvisions_order(chunk, rng, monkeypatch):
    """float32: each bin's pixels added one after another in float32, then / area, for
    bins of every size, however the rectangles are batched."""
    from roilib.reference import ps_roi

    if chunk:
        monkeypatch.setattr(ps_roi, "CHUNK", chunk)
    x = (rng.standard_normal((1, 8, 20, 20)) * 1e3).astype(np.float32)
    rois = np.array([[0, 0.0, 0.0, 19.0, 19.0], [0, 2.0, 3.0, 9.0, 5.0], [0, 1.0, 1.0, 4.0, 13.0]])
    out = roilib.ps_roi_pool(x, rois, 2)
    bins = ps_roi_pool_bins(rois, (2, 2), 1.0, 20, 20, np.float32)
    ch = ps_channel(2, (2, 2))
    for k in range(len(rois)):
        for i in range(2):
            for j in range(2):
                rows = range(bins.hstart[k, i], bins.hend[k, i])
                cols = range(bins.wstart[k, j], bins.wend[k, j])
                for c in range(2):
                    total = np.float32(0)
                    for r in rows:
                        for col in cols:
                            total = np.float32(total + x[0, ch[c, i, j], r, col])
                    assert out[k, c, i, j] == total / np.float32(len(rows) * len(cols))


@pytest.mark.parametrize("op", ["ps_roi_pool", "ps_roi_align"])
def test_small_batches_give_the_same_result(op, rng, monkeypatch):
    """Runs split into many batches (one rectangle, or a few pixels, each) change nothing."""
    from roilib.reference import ps_roi

    x, rois = _ps_case(rng, np.float32)
    rois = np.concatenate([rois, _odd_boxes(2)])
    fwd, bwd = getattr(roilib, op), getattr(roilib, op + "_backward")
    out = fwd(x, rois, (3, 2), 0.5)
    g = rng.standard_normal(out.shape).astype(np.float32)
    grad = bwd(g, x, rois, (3, 2), 0.5)
    monkeypatch.setattr(ps_roi, "SMALL", 0)  # the backward's batches too, not its few-box path
    for chunk in (1, 37):
        monkeypatch.setattr(ps_roi, "CHUNK", chunk)
        np.testing.assert_array_equal(fwd(x, rois, (3, 2), 0.5), out)
        np.testing.assert_allclose(bwd(g, x, rois, (3, 2), 0.5), grad, rtol=0, atol=1e-6)


BACKWARD_PATH_TOL = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-13}


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    "op, kw", [("ps_roi_pool", {}), ("ps_roi_align", {}), ("ps_roi_align", dict(sampling_ratio=2))]
)
def test_backward_few_boxes_path_matches_the_planned_one(op, kw, dtype, rng, monkeypatch):
    """The few-box backward (pixels enumerated without the plan's sort) against the planned
    one: overlapping boxes, boxes off the map, across its edges, empty, in image 1."""
    from roilib.reference import ps_roi

    x, rois = _ps_case(rng, dtype, shape=(3, 9, 11))
    rois = np.concatenate([rois, _odd_boxes(3), [[2, 1.0, 2.0, 8.0, 7.0], [2, 1.0, 2.0, 8.0, 7.0]]])
    bwd = getattr(roilib, op + "_backward")
    g = rng.standard_normal((len(rois), 2, 3, 2)).astype(dtype)
    few = bwd(g, x, rois, (3, 2), 0.5, **kw)
    assert few.dtype == dtype and few[2].any()
    for chunk in (1,):  # one channel a call (by default both in one): the same adds
        monkeypatch.setattr(ps_roi, "CHUNK", chunk)
        np.testing.assert_array_equal(bwd(g, x, rois, (3, 2), 0.5, **kw), few)
    monkeypatch.undo()
    monkeypatch.setattr(ps_roi, "SMALL", 0)
    planned = bwd(g, x, rois, (3, 2), 0.5, **kw)
    tol = BACKWARD_PATH_TOL[dtype]
    np.testing.assert_allclose(few.astype(np.float64), planned.astype(np.float64), rtol=0, atol=tol)
    for k in (0, 1):  # no boxes; one box
        monkeypatch.setattr(ps_roi, "SMALL", 1 << 15)
        few = bwd(g[:k], x, rois[:k], (3, 2), 0.5, **kw)
        monkeypatch.setattr(ps_roi, "SMALL", 0)
        np.testing.assert_array_equal(few, bwd(g[:k], x, rois[:k], (3, 2), 0.5, **kw))


def test_backward_few_boxes_path_is_taken_below_its_size_only(rng, monkeypatch):
    """The path choice follows ``SMALL`` (candidates: rectangles times the largest grid)."""
    from roilib.reference import ps_roi

    calls = []
    original = ps_roi._by_area
    monkeypatch.setattr(ps_roi, "_by_area", lambda *a: calls.append(1) or original(*a))
    x, rois = _ps_case(rng)
    g = rng.standard_normal((len(rois), 2, 3, 2))
    roilib.ps_roi_pool_backward(g, x, rois, (3, 2), 0.5)
    assert calls == [1]
    monkeypatch.setattr(ps_roi, "SMALL", 0)
    roilib.ps_roi_pool_backward(g, x, rois, (3, 2), 0.5)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize(
    "op, kw", [("ps_roi_pool", {}), ("ps_roi_align", {}), ("ps_roi_align", dict(sampling_ratio=2))]
)
def test_forward_few_boxes_path_matches_the_planned_one_bit_for_bit(op, kw, dtype, rng, monkeypatch):
    """The few-box forward (pixels listed by area, summed one pixel position at a time)
    adds each rectangle's pixels in the planned path's order: equal bits, for overlapping
    boxes, boxes off the map, across its edges, empty, in other images, no boxes and one
    box, all channels in one gather or one channel a gather."""
    from roilib.reference import ps_roi

    fwd = getattr(roilib, op)
    for n in (3, 1):  # boxes in several images; all in one (a gather along a view's rows)
        x, rois = _ps_case(rng, dtype, shape=(n, 9, 11))
        rois = np.concatenate([rois, _odd_boxes(n), [[n - 1, 1.0, 2.0, 8.0, 7.0]] * 2])
        rois[:, 0] = np.minimum(rois[:, 0], n - 1)
        for k in (len(rois), 0, 1):
            few = fwd(x, rois[:k], (3, 2), 0.5, **kw)
            assert few.dtype == dtype and few.shape == (k, 2, 3, 2)
            monkeypatch.setattr(ps_roi, "CHUNK", 1)  # one channel a gather
            np.testing.assert_array_equal(fwd(x, rois[:k], (3, 2), 0.5, **kw), few)
            monkeypatch.setattr(ps_roi, "SMALL", 0)  # the planned path
            np.testing.assert_array_equal(fwd(x, rois[:k], (3, 2), 0.5, **kw), few)
            monkeypatch.undo()


def test_align_rects_take_both_axes_in_one_call_with_each_axis_own_result(rng):
    """A square output takes rows and columns in one call of ``_spans`` (each row with its
    own map size): the same runs and weights, bit for bit, as one call per axis."""
    from roilib.geometry import roi_align_boxes
    from roilib.reference import ps_roi

    _, rois = _ps_case(rng, shape=(3, 9, 11))
    rois = np.concatenate([rois, _odd_boxes(3)])
    for sampling_ratio in (2, -1):
        rects = ps_roi._align_rects(rois, (3, 3), 0.5, sampling_ratio, 9, 11, np.float64)
        geo = roi_align_boxes(rois, (3, 3), 0.5, sampling_ratio, True, np.float64)
        row0, rows, row_weight = ps_roi._spans(geo.start_y, geo.bin_h, geo.grid_h, 3, 9, np.float64)
        col0, cols, col_weight = ps_roi._spans(geo.start_x, geo.bin_w, geo.grid_w, 3, 11, np.float64)
        row_weight /= np.repeat(geo.count.astype(np.float64), 3)
        for got, want in ((rects.row0, row0), (rects.rows, rows), (rects.col0, col0), (rects.cols, cols)):
            np.testing.assert_array_equal(got, want)
        # the joint call pads the shorter axis' weights with zero rows
        for got, want in ((rects.row_weight, row_weight), (rects.col_weight, col_weight)):
            np.testing.assert_array_equal(got[: len(want)], want)
            assert not got[len(want) :].any()


def test_forward_few_boxes_path_is_taken_below_its_size_only(rng, monkeypatch):
    """The forward, like the backward, lists the pixels by area only up to ``SMALL`` candidates."""
    from roilib.reference import ps_roi

    calls = []
    original = ps_roi._by_area
    monkeypatch.setattr(ps_roi, "_by_area", lambda *a: calls.append(1) or original(*a))
    x, rois = _ps_case(rng)
    roilib.ps_roi_align(x, rois, (3, 2), 0.5)
    assert calls == [1]
    monkeypatch.setattr(ps_roi, "SMALL", 0)
    roilib.ps_roi_align(x, rois, (3, 2), 0.5)
    assert calls == [1]


@pytest.mark.parametrize("op", ["ps_roi_pool", "ps_roi_align"])
def test_backward_adds_up_boxes_that_cover_the_same_pixels(op, rng):
    """Twenty copies of a box (every pixel repeated in the scatter) give twenty times its gradient."""
    x = rng.standard_normal((2, 8, 7, 9))
    box = np.array([[1, 1.3, 0.7, 7.6, 5.2]])
    g = rng.standard_normal((1, 2, 2, 2))
    bwd = getattr(roilib, op + "_backward")
    once = bwd(g, x, box, 2, 1.0)
    twenty = bwd(np.repeat(g, 20, axis=0), x, np.repeat(box, 20, axis=0), 2, 1.0)
    np.testing.assert_allclose(twenty, 20 * once, rtol=1e-12, atol=1e-12)
    assert not once[0].any() and once[1].any()  # batch index 1: image 0 untouched


@pytest.mark.parametrize("op", ["ps_roi_pool", "ps_roi_align"])
@pytest.mark.parametrize("boxes", [1, 5])
def test_arguments_are_left_unchanged(op, boxes, rng):
    x, rois = _ps_case(rng)
    rois = rois[:boxes]
    g = rng.standard_normal((boxes, 2, 3, 2))
    copies = [a.copy() for a in (x, rois, g)]
    getattr(roilib, op)(x, rois, (3, 2), 0.5)
    getattr(roilib, op + "_backward")(g, x, rois, (3, 2), 0.5)
    for a, b in zip((x, rois, g), copies):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("op", ["ps_roi_pool", "ps_roi_align"])
def test_boxes_off_the_map_output_zero_and_route_no_gradient(op):
    x = np.ones((1, 4, 5, 5), dtype=np.float32)
    rois = np.array([[0, 40.0, 40.0, 60.0, 50.0], [0, -30.0, -30.0, -10.0, -12.0]])
    out = getattr(roilib, op)(x, rois, 2)
    assert out.shape == (2, 1, 2, 2) and not out.any()
    assert not getattr(roilib, op + "_backward")(np.ones_like(out), x, rois, 2).any()


@pytest.mark.parametrize("op", ["ps_roi_pool", "ps_roi_align"])
def test_no_boxes_in_either_direction(op):
    x = np.ones((2, 8, 5, 5), dtype=np.float32)
    out = getattr(roilib, op)(x, np.zeros((0, 5)), 2)
    assert out.shape == (0, 2, 2, 2) and out.dtype == np.float32
    grad = getattr(roilib, op + "_backward")(out, x, np.zeros((0, 5)), 2)
    assert grad.shape == x.shape and grad.dtype == np.float32 and not grad.any()


@pytest.mark.parametrize("op", ["ps_roi_pool", "ps_roi_align"])
def test_a_strided_input_gives_the_same_result(op, rng):
    x, rois = _ps_case(rng)
    strided = np.asfortranarray(x)
    fwd = getattr(roilib, op)
    np.testing.assert_array_equal(fwd(strided, rois, (3, 2), 0.5), fwd(x, rois, (3, 2), 0.5))


# -- the benchmark's R-FCN rows ------------------------------------------------------------


def test_bench_ps_rows_take_the_tables_number_of_boxes(monkeypatch):
    """``python -m roilib.bench`` measures the ps rows at every number of boxes of the
    table (715 and 16 by default), on R-FCN's map."""
    from roilib import bench

    monkeypatch.setattr(bench, "_measure", lambda spec, threads: dict(spec))
    rows = bench.run_cpu(1, 1, (715, 16), only="ps_")
    assert [(r["op"], r["boxes"], r["pass_"]) for r in rows] == [
        (op, n, p) for n in (715, 16) for op in ("ps_roi_align", "ps_roi_pool") for p in ("forward", "backward")
    ]
    for op in ("ps_roi_pool", "ps_roi_align"):
        kwargs = next(c[2] for c in bench.CASES if c[1] == op)
        out = bench._runner("roilib", op, kwargs, False, 5, 0, None)()
        assert out.shape == (5, bench.RFCN_CLASSES, 7, 7)


# -- bad inputs ---------------------------------------------------------------------------


@pytest.mark.parametrize("op", [roilib.ps_roi_pool, roilib.ps_roi_align])
def test_channels_not_divisible_by_bins(op):
    x = np.zeros((1, 10, 5, 5))
    with pytest.raises(ValueError, match=r"input has 10 channels, which is not a multiple of PH \* PW = 2 \* 2 = 4"):
        op(x, np.array([[0, 1.0, 1.0, 3.0, 3.0]]), 2)


def test_grad_output_must_have_the_output_channels():
    x = np.zeros((1, 8, 5, 5))
    with pytest.raises(ValueError, match=r"grad_output must have the forward output's shape \(1, 2, 2, 2\)"):
        roilib.ps_roi_align_backward(np.zeros((1, 8, 2, 2)), x, np.array([[0, 1.0, 1.0, 3.0, 3.0]]), 2)


# -- the kernels on the CPU ------------------------------------------------------------------

needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
KERNEL_TOL = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-13}


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_kernel_ps_roi_align_matches_reference(dtype, sampling_ratio, rng):
    from roilib.cuda import cpu

    x, rois = _ps_case(rng, dtype)
    out = cpu.ps_roi_align(x, rois, (3, 2), 0.5, sampling_ratio)
    ref = roilib.ps_roi_align(x, rois, (3, 2), 0.5, sampling_ratio)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=0, atol=KERNEL_TOL[dtype])
    g = rng.standard_normal(out.shape).astype(dtype)
    grad = cpu.ps_roi_align_backward(g, x, rois, (3, 2), 0.5, sampling_ratio)
    ref = roilib.ps_roi_align_backward(g, x, rois, (3, 2), 0.5, sampling_ratio)
    np.testing.assert_allclose(grad.astype(np.float64), ref.astype(np.float64), rtol=0, atol=KERNEL_TOL[dtype])


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_kernel_ps_roi_pool_matches_reference(dtype, rng):
    from roilib.cuda import cpu

    x, rois = _ps_case(rng, dtype)
    out = cpu.ps_roi_pool(x, rois, (3, 2), 0.5)
    np.testing.assert_allclose(out.astype(np.float64), roilib.ps_roi_pool(x, rois, (3, 2), 0.5).astype(np.float64),
                               rtol=0, atol=KERNEL_TOL[dtype])
    g = rng.standard_normal(out.shape).astype(dtype)
    grad = cpu.ps_roi_pool_backward(g, x, rois, (3, 2), 0.5)
    ref = roilib.ps_roi_pool_backward(g, x, rois, (3, 2), 0.5)
    np.testing.assert_allclose(grad.astype(np.float64), ref.astype(np.float64), rtol=0, atol=KERNEL_TOL[dtype])


@needs_cxx
def test_kernel_backward_refuses_deterministic_without_a_kernel():
    from roilib.cuda import cpu

    with pytest.raises(NotImplementedError, match="ps_roi_align_backward: no deterministic backward kernel"):
        cpu.ps_roi_align_backward(np.zeros((1, 1, 2, 2)), HAND, np.array([[0, 0, 0, 2.0, 2]]), 2, deterministic=True)
