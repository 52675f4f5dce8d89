"""RoIWarp is MNC's RoI warping layer: a transliteration of its rules, hand cases and
finite differences.

``mnc_warp`` below is written from the rules of MNC's layer (``daijifeng001/caffe-mnc``,
``src/caffe/layers/roi_warping_layer.cu``) as plain scalar loops, independently of
roilib's vectorised reference and of its kernels. It keeps the layer's own float
behaviour: the steps ``1 / ceil(roi / P)`` are added one at a time in the layer's
float type.
"""
import importlib
import math

import numpy as np
import pytest

import roilib
import roilib.reference as ref
from roilib.reference._layout import channels_last
from roilib.reference.roi_warp import warp_at_corners

from helpers import random_boxes

FLT_MAX = 3.4028234663852886e38


def _c_round(v):
    """C's round(): half away from zero."""
    return math.copysign(math.floor(abs(v) + 0.5), v) if abs(v) < 2**52 else v


def _bilinear(plane, h, w, t):
    """MNC's read of one sample: None when it is more than half a cell outside."""
    height, width = plane.shape
    if h < -0.5 or h > height - 0.5 or w < -0.5 or w > width - 0.5:
        return None
    h, w = (t(0) if h <= 0 else h), (t(0) if w <= 0 else w)
    h_low, w_low = int(h), int(w)
    if h_low >= height - 1:
        h_low = h_high = height - 1
        h = t(h_low)
    else:
        h_high = h_low + 1
    if w_low >= width - 1:
        w_low = w_high = width - 1
        w = t(w_low)
    else:
        w_high = w_low + 1
    lh, lw = t(h - h_low), t(w - w_low)
    hh, hw = t(1) - lh, t(1) - lw
    v1, v2 = t(plane[h_low, w_low]), t(plane[h_low, w_high])
    v3, v4 = t(plane[h_high, w_low]), t(plane[h_high, w_high])
    return (hh * hw) * v1 + (hh * lw) * v2 + (lh * hw) * v3 + (lh * lw) * v4


def mnc_warp(x, rois, pooled, scale):
    """MNC's forward, one output element at a time."""
    t = np.float32 if x.dtype in (np.float16, np.float32) else np.float64
    ph_n, pw_n = pooled
    out = np.zeros((len(rois), x.shape[1], ph_n, pw_n))
    for k, roi in enumerate(rois):
        b = int(roi[0])
        x1, y1, x2, y2 = (t(_c_round(float(t(c) * t(scale)))) for c in roi[1:])
        roi_w, roi_h = max(x2 - x1, t(0)), max(y2 - y1, t(0))
        bin_w, bin_h = roi_w / t(pw_n), roi_h / t(ph_n)
        ratio_h, ratio_w = int(math.ceil(roi_h / t(ph_n))), int(math.ceil(roi_w / t(pw_n)))
        step_h = t(1.0 / ratio_h) if ratio_h else None
        step_w = t(1.0 / ratio_w) if ratio_w else None
        for c in range(x.shape[1]):
            plane = x[b, c].astype(t)
            for ph in range(ph_n):
                for pw in range(pw_n):
                    best, found = t(-FLT_MAX), False
                    fph = t(ph)
                    while fph <= ph + 1:
                        fpw = t(pw)
                        while fpw <= pw + 1:
                            val = _bilinear(plane, y1 + fph * bin_h, x1 + fpw * bin_w, t)
                            if val is not None and val > best:
                                best, found = val, True
                            if step_w is None:
                                break
                            fpw = t(fpw + step_w)
                        if step_h is None:
                            break
                        fph = t(fph + step_h)
                    out[k, c, ph, pw] = best if found else 0
    return out


def _case(dtype, seed):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((2, 2, 9, 11)).astype(dtype)
    rois = [
        [0, 1.3, 2.2, 8.7, 7.1],
        [1, -3.0, -2.0, 14.0, 12.0],  # beyond the map on every side
        [0, 12.0, 1.0, 16.0, 5.0],  # right of the map
        [1, 4.0, 4.0, 4.2, 4.1],  # rounds to a point
        [0, 6.0, 7.0, 2.0, 1.0],  # inverted
        [1, 2.5, 1.5, 6.5, 7.5],  # half-pixel corners: C rounding
        [0, -0.5, -0.4, 10.4, 8.6],
    ]
    x1, y1 = rng.uniform(-2, 10, 8), rng.uniform(-2, 8, 8)
    extra = np.stack([rng.integers(0, 2, 8), x1, y1, x1 + rng.uniform(0, 9, 8), y1 + rng.uniform(0, 7, 8)], 1)
    return x, np.concatenate([np.array(rois), extra]).astype(np.float64)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pooled,scale", [((3, 4), 1.0), ((2, 2), 0.5), ((5, 3), 0.7), ((14, 14), 1.0)])
def test_matches_a_transliteration_of_mncs_rules(dtype, pooled, scale):
    x, rois = _case(dtype, seed=hash((pooled, scale)) % 1000)
    rois = rois.copy()
    rois[:, 1:] /= scale
    got = roilib.roi_warp(x, rois.astype(dtype), pooled, scale)
    expected = mnc_warp(x, rois.astype(dtype), pooled, scale)
    np.testing.assert_array_equal(got, expected.astype(dtype))


def test_hand_computed_bins():
    # value = 4y + x is bilinear, so each sample reads exactly 4y + x
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    box = np.array([[0, 0, 0, 3, 3]], dtype=np.float64)
    # one bin: roi 3, ceil(3/1) = 3 steps of 1/3: samples 0, 1, 2, 3 -> max at (3, 3)
    assert roilib.roi_warp(x, box, 1)[0, 0].tolist() == [[15.0]]
    # two bins: roi 3, bin 1.5, ceil(1.5) = 2 steps of 1/2 -> samples 0, .75, 1.5 | 1.5, 2.25, 3
    assert roilib.roi_warp(x, box, 2)[0, 0].tolist() == [[7.5, 9.0], [13.5, 15.0]]
    # corners are C-rounded without the +1: (0.4, 0.4, 2.6, 3.4) -> (0, 0, 3, 3)
    assert roilib.roi_warp(x, np.array([[0, 0.4, 0.4, 2.6, 3.4]]), 2)[0, 0].tolist() == [[7.5, 9.0], [13.5, 15.0]]
    # 2.5 rounds away from zero to 3 (NumPy's rint would give 2): samples 0 .. 3 again
    assert roilib.roi_warp(x, np.array([[0, 0, 0, 2.5, 2.5]]), 1)[0, 0].tolist() == [[15.0]]


def test_samples_outside_the_map_are_skipped_not_zero():
    x = -(np.arange(16, dtype=np.float64) + 1).reshape(1, 1, 4, 4)  # every value negative
    # x from -2 to 1: samples at x = -2, -1 (skipped), 0, 1 (read); y from 0 to 3
    got = roilib.roi_warp(x, np.array([[0, -2, 0, 1, 3]], dtype=np.float64), 1)
    assert got[0, 0, 0, 0] == -1.0  # reading 0 for the skipped samples would give 0
    # a box wholly outside: no sample counts, output 0
    assert roilib.roi_warp(x, np.array([[0, 6, 6, 9, 9]], dtype=np.float64), 2).tolist() == [[[[0.0, 0.0], [0.0, 0.0]]]]
    # half a cell is the limit: x from -1 to 0 in two bins of 1/2; the first bin's
    # samples are x = -1 (skipped) and x = -0.5, which still reads column 0
    assert roilib.roi_warp(x, np.array([[0, -1, 0, 0, 0]], dtype=np.float64), (1, 2))[0, 0].tolist() == [[-1.0, -1.0]]


def test_mnc_network_shape():
    # MNC: 14x14 warp at scale 1/16, then 2x2 stride-2 max pooling to 7x7
    x = np.random.default_rng(0).standard_normal((1, 3, 40, 50))
    rois = np.array([[0, 100, 60, 500, 380]], dtype=np.float64)
    warped = roilib.roi_warp(x, rois, 14, 1 / 16)
    pooled = warped.reshape(1, 3, 7, 2, 7, 2).max(axis=(3, 5))
    assert warped.shape == (1, 3, 14, 14) and pooled.shape == (1, 3, 7, 7)


def test_input_gradient_is_bilinear_weights_of_the_winner():
    x = np.arange(16, dtype=np.float64).reshape(1, 1, 4, 4)
    box = np.array([[0, 0, 0, 3, 3]], dtype=np.float64)
    g = np.ones((1, 1, 2, 2))
    grad = roilib.roi_warp_backward(g, x, box, 2)[0, 0]
    # winners (1.5, 1.5), (1.5, 3), (3, 1.5), (3, 3): quarter weights on 4 pixels, halves on 2
    expected = np.zeros((4, 4))
    expected[1:3, 1:3] += 0.25
    expected[1:3, 3] += 0.5
    expected[3, 1:3] += 0.5
    expected[3, 3] += 1
    np.testing.assert_array_equal(grad, expected)


@pytest.mark.parametrize("pooled", [(3, 3), (2, 4)])
def test_corner_gradient_matches_finite_differences(pooled):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 12, 14))
    rois = np.array([[0, 0, 0, 0, 0]] * 3, dtype=np.float64)
    # generic corners inside the map, box sizes whose ceil(roi / P) is not at a jump
    corners = np.array([[1.37, 2.21, 9.13, 8.62], [3.41, 1.18, 12.07, 10.33], [2.2, 3.3, 6.9, 9.4]])
    g = rng.standard_normal((3, 2) + pooled)
    _, corner_gradient = warp_at_corners(x, rois, corners, pooled)
    analytic = corner_gradient(g)
    assert (analytic[:, 0] == 0).all()
    eps = 1e-6
    for k in range(3):
        for j in range(4):
            d = np.zeros_like(corners)
            d[k, j] = eps
            up = np.vdot(warp_at_corners(x, rois, corners + d, pooled)[0](), g)
            down = np.vdot(warp_at_corners(x, rois, corners - d, pooled)[0](), g)
            assert analytic[k, j + 1] == pytest.approx((up - down) / (2 * eps), rel=1e-6, abs=1e-8)


def test_box_gradient_treats_rounding_as_the_identity():
    """d/d(image corner) = s * one-sided d/d(rounded map corner), as MNC's layer does."""
    rng = np.random.default_rng(5)
    s = 0.25
    x = rng.standard_normal((1, 2, 12, 14))
    rois = np.array([[0, 6.3, 9.1, 41.2, 38.7], [0, 13.0, 5.2, 50.4, 30.9]])
    g = rng.standard_normal((2, 2, 3, 3))
    got = roilib.roi_warp_rois_backward(g, x, rois, 3, s)
    q = np.array([[_c_round(c * s) for c in r[1:]] for r in rois])
    eps = 1e-7
    for k in range(2):
        for j in range(4):
            d = np.zeros_like(q)
            d[k, j] = eps
            up = np.vdot(warp_at_corners(x, rois, q + d, 3)[0](), g)
            here = np.vdot(warp_at_corners(x, rois, q, 3)[0](), g)
            # rounded corners put samples on whole coordinates: the right-hand slope
            assert got[k, j + 1] == pytest.approx(s * (up - here) / eps, rel=1e-5, abs=1e-6)


def test_box_gradient_is_zero_for_a_box_outside_the_map():
    x = np.random.default_rng(6).standard_normal((1, 1, 5, 5))
    g = np.ones((1, 1, 2, 2))
    assert not roilib.roi_warp_rois_backward(g, x, np.array([[0, 20, 20, 30, 30.0]]), 2).any()


def test_float32_steps_are_accumulated_like_the_layer():
    # roi 3 in one bin: 1/3 added three times in float32 may or may not reach 1 exactly;
    # the transliteration decides the same way as roilib for any box size up to 40
    x = np.random.default_rng(7).standard_normal((1, 1, 44, 44)).astype(np.float32)
    rois = np.array([[0, 1, 1, 1 + n, 1 + n] for n in range(1, 41)], dtype=np.float32)
    np.testing.assert_array_equal(roilib.roi_warp(x, rois, (1, 1)), mnc_warp(x, rois, (1, 1), 1.0).astype(np.float32))
    np.testing.assert_array_equal(roilib.roi_warp(x, rois, (3, 3)), mnc_warp(x, rois, (3, 3), 1.0).astype(np.float32))


def test_kernels_on_the_cpu_match_bitwise():
    cpu = pytest.importorskip("roilib.cuda.cpu")
    for dtype in (np.float32, np.float64):
        x, rois = _case(dtype, seed=9)
        rois = rois.astype(dtype)
        out = ref.roi_warp(x, rois, (3, 4), 1.0)
        np.testing.assert_array_equal(cpu.roi_warp(x, rois, (3, 4), 1.0), out)
        g = np.random.default_rng(1).standard_normal(out.shape).astype(dtype)
        expected = ref.roi_warp_backward(g, x, rois, (3, 4), 1.0)
        for deterministic in (True, False):
            got = cpu.roi_warp_backward(g, x, rois, (3, 4), 1.0, deterministic=deterministic)
            np.testing.assert_array_equal(got, expected)
        box = cpu.roi_warp_rois_backward(g, x, rois, (3, 4), 1.0)
        np.testing.assert_allclose(box, ref.roi_warp_rois_backward(g, x, rois, (3, 4), 1.0), rtol=1e-5, atol=1e-5)


# -- the vectorised evaluation (issue 13) against the one-box-at-a-time formulation --------
#
# roi_warp and roi_warp_backward evaluate many boxes at once (distinct sample positions,
# gathered map cells, blocks, channel passes, one np.add.at per block); the box gradient
# still walks the boxes one at a time (_boxes). Below, that per-box path and the scatter
# the reference used before (output order: box, channel, bin row, bin column, corner)
# are the oracle: forward and input gradient must agree with them bit for bit, in every
# layout the vectorised code can choose.

rw = importlib.import_module("roilib.reference.roi_warp")


def one_box_at_a_time(x, rois, pooled, scale, sampling_ratio):
    """(forward, backward(g)) of the per-box formulation."""
    xl = channels_last(x)
    n, c, h, w = x.shape
    corners = rw.rounded_corners(rois, scale, xl.dtype)
    boxes = list(rw._boxes(xl, rois, corners, pooled, sampling_ratio))
    out = np.zeros((len(rois), c) + pooled, dtype=x.dtype)
    for box in boxes:
        out[box.k] = box.out.transpose(2, 0, 1)

    def winner(box, axis):  # flat index into a (P, n) field of the winning sample
        p = box.out.shape[axis]
        if axis == 0:
            return np.arange(p)[:, None, None] * (box.ys.grid + 1) + np.maximum(box.win_y, 0)
        return np.arange(p)[None, :, None] * (box.xs.grid + 1) + np.maximum(box.win_x, 0)

    def backward(g):
        grad = np.zeros(n * c * h * w, dtype=xl.dtype)
        chan = np.arange(c)[None, None, :, None]
        for box in boxes:
            py, px = winner(box, 0), winner(box, 1)
            ylo, yhi, wly, why = (a.take(py) for a in (box.ty.lo, box.ty.hi, box.ty.wlo, box.ty.whi))
            xlo, xhi, wlx, whx = (a.take(px) for a in (box.tx.lo, box.tx.hi, box.tx.wlo, box.tx.whi))
            gk = g[box.k].transpose(1, 2, 0).astype(xl.dtype)
            rows = np.stack([ylo, ylo, yhi, yhi], axis=-1)
            cols = np.stack([xlo, xhi, xlo, xhi], axis=-1)
            adds = np.stack([gk * (wly * wlx), gk * (wly * whx), gk * (why * wlx), gk * (why * whx)], axis=-1)
            flat = ((box.image * c + chan) * h + rows) * w + cols
            won = np.broadcast_to((box.win_y >= 0)[..., None], flat.shape)
            order = (2, 0, 1, 3)  # (C, PH, PW, corner)
            keep = np.transpose(won, order)
            np.add.at(grad, np.transpose(flat, order)[keep], np.transpose(adds, order)[keep])
        return grad.reshape(x.shape).astype(x.dtype)

    return out, backward


def assert_bitwise(got, expected):
    """Equal, dtype and sign of zero included (NaN equal to NaN)."""
    assert got.dtype == expected.dtype and got.shape == expected.shape
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_array_equal(np.signbit(got), np.signbit(expected))


def check_against_one_box_at_a_time(x, rois, pooled, scale, sampling_ratio, seed=0):
    out = roilib.roi_warp(x, rois, pooled, scale, sampling_ratio)
    expected, backward = one_box_at_a_time(x, rois, pooled, scale, sampling_ratio)
    assert_bitwise(out, expected)
    g = np.random.default_rng(seed).standard_normal(out.shape).astype(x.dtype)
    assert_bitwise(roilib.roi_warp_backward(g, x, rois, pooled, scale, sampling_ratio), backward(g))


def _edge_boxes(rng, n_images, height, width, scale, n_random=10):
    """Boxes off the map, across its border, tiny, flat, inverted, huge, on the last
    pixel, any batch index, then random ones; in image pixels."""
    h, w = height, width
    fixed = [
        [0, 1.3, 2.2, 8.7, 9.1],
        [n_images - 1, -3.0, -2.0, w + 4.0, h + 3.0],  # covers the map and more
        [0, w + 2.0, 1.0, w + 6.0, 5.0],  # right of the map
        [n_images - 1, -8.0, -6.0, -1.5, -1.2],  # above and left of the map
        [0, 4.0, 4.0, 4.2, 4.1],  # tiny
        [n_images - 1, 5.0, 3.0, 5.0, 3.0],  # zero size
        [0, 6.0, 7.0, 2.0, 1.0],  # inverted
        [n_images - 1, w - 1.2, h - 1.1, w - 0.2, h - 0.3],  # last pixel
        [0, -0.5, -0.5, w - 0.5, h - 0.5],  # half a cell outside
        [n_images - 1, -60.0, -40.0, 3 * w, 3 * h],  # huge: many samples skipped
    ]
    random = random_boxes(rng, n_random, n_images, h, w, 1.0, margin=2)
    rois = np.concatenate([np.array(fixed, dtype=np.float64), random])
    rois[:, 1:] /= scale
    return rois


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
@pytest.mark.parametrize("pooled,scale", [((3, 4), 1.0), ((2, 2), 0.5), ((5, 3), 0.7)])
def test_vectorised_warp_matches_one_box_at_a_time(rng, dtype, sampling_ratio, pooled, scale):
    x = rng.standard_normal((2, 5, 9, 11)).astype(dtype)
    rois = _edge_boxes(rng, 2, 9, 11, scale)
    check_against_one_box_at_a_time(x, rois, pooled, scale, sampling_ratio)


def _force(monkeypatch, **values):
    for name, value in values.items():
        monkeypatch.setattr(rw, name, value)


# every layout choice of the vectorised code, forced one way and the other
LAYOUTS = {
    "whole map, one pass, big blocks": dict(_DENSE_CELLS=-1.0),
    "gathered cells, one pass": dict(_DENSE_CELLS=2.0),
    "whole map, passes of 16 channels, one box per block": dict(
        _DENSE_CELLS=-1.0, _SOURCE_FRACTION=0.0, _MIN_SOURCE_BYTES=1, _GRAD_PASS_BYTES=1, _BLOCK_ELEMENTS=1
    ),
    "gathered cells, passes of 16 channels, small blocks and runs": dict(
        _DENSE_CELLS=2.0, _SOURCE_FRACTION=0.0, _MIN_SOURCE_BYTES=1, _GRAD_PASS_BYTES=1, _BLOCK_ELEMENTS=2000,
        _GRAD_BOXES=3,
    ),
    "winners by reductions": dict(_TAP_LOOP=0),
    "winners tap by tap": dict(_TAP_LOOP=10**6),
    "samples stored in coordinate order": dict(_tap_order=lambda taps: np.arange(int(taps.max()) + 1)),
}


@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_every_layout_matches_one_box_at_a_time(rng, monkeypatch, layout, dtype):
    # (gathered cells: float32 and float64 add into the result directly, float16 into a
    # float32 gradient of the cells first)
    _force(monkeypatch, **LAYOUTS[layout])
    x = rng.standard_normal((2, 37, 8, 10)).astype(dtype)  # 37 channels: a short last pass
    rois = _edge_boxes(rng, 2, 8, 10, 0.5, n_random=14)
    for sampling_ratio in (-1, 2, 4):  # 4: bins of 25 samples
        check_against_one_box_at_a_time(x, rois, (3, 2), 0.5, sampling_ratio)


def test_boxes_of_many_step_counts_keep_the_box_order_of_the_adds(rng, monkeypatch):
    # adaptive steps: neighbouring boxes have different step counts, so each run of boxes
    # mixes groups whose boxes interleave; overlapping boxes add to the same pixels, and
    # the sums must come out in box order anyway (integer-valued map: many equal maxima)
    _force(monkeypatch, _GRAD_BOXES=5)
    x = rng.integers(-2, 3, (1, 3, 12, 14)).astype(np.float32)
    x1, y1 = rng.uniform(0, 6, 40), rng.uniform(0, 5, 40)
    size = rng.uniform(0.5, 8, 40)
    rois = np.stack([np.zeros(40), x1, y1, x1 + size, y1 + size * 0.8], axis=1)
    check_against_one_box_at_a_time(x, rois, (2, 3), 1.0, -1)
    check_against_one_box_at_a_time(x, rois, (2, 3), 1.0, 3)


@pytest.mark.filterwarnings("ignore:invalid value encountered in multiply:RuntimeWarning")
def test_signed_zeros_nan_and_infinities(rng):
    # +0 and -0 tie: the first in the layer's order is the output; NaN samples never win;
    # an infinite gradient on a bin with no winner routes nothing
    x = rng.choice(np.array([0.0, -0.0, 1.0, -1.0, np.nan, -np.inf], dtype=np.float32), (2, 4, 7, 9))
    x[:, 0] = rng.choice(np.array([0.0, -0.0], dtype=np.float32), (2, 7, 9))
    rois = _edge_boxes(rng, 2, 7, 9, 1.0)
    out = roilib.roi_warp(x, rois, (3, 3), 1.0, 2)
    expected, backward = one_box_at_a_time(x, rois, (3, 3), 1.0, 2)
    assert_bitwise(out, expected)
    assert np.signbit(out[:, 0]).any() and (out[:, 0] == 0).all()
    g = rng.choice(np.array([1.0, -2.0, np.inf], dtype=np.float32), out.shape)
    # (-)inf times a zero weight is NaN, in both
    assert_bitwise(roilib.roi_warp_backward(g, x, rois, (3, 3), 1.0, 2), backward(g))


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_no_boxes_and_no_channels(dtype):
    x = np.ones((2, 3, 5, 6), dtype=dtype)
    none = np.zeros((0, 5), dtype=dtype)
    assert roilib.roi_warp(x, none, (2, 3), 0.5).shape == (0, 3, 2, 3)
    grad = roilib.roi_warp_backward(np.zeros((0, 3, 2, 3), dtype), x, none, (2, 3), 0.5)
    assert grad.shape == x.shape and grad.dtype == x.dtype and not grad.any()
    empty = np.ones((1, 0, 5, 6), dtype=dtype)
    box = np.array([[0, 1, 1, 4, 4]], dtype=dtype)
    assert roilib.roi_warp(empty, box, 2).shape == (1, 0, 2, 2)
    assert roilib.roi_warp_backward(np.zeros((1, 0, 2, 2), dtype), empty, box, 2).shape == empty.shape


def test_float16_is_computed_in_float32(rng):
    x16 = rng.standard_normal((2, 3, 9, 11)).astype(np.float16)
    rois = _edge_boxes(rng, 2, 9, 11, 0.5)
    out = roilib.roi_warp(x16, rois, (3, 3), 0.5, 2)
    expected = roilib.roi_warp(x16.astype(np.float32), rois, (3, 3), 0.5, 2)
    assert out.dtype == np.float16
    np.testing.assert_array_equal(out, expected.astype(np.float16))
    g = rng.standard_normal(out.shape).astype(np.float16)
    grad = roilib.roi_warp_backward(g, x16, rois, (3, 3), 0.5, 2)
    expected = roilib.roi_warp_backward(g.astype(np.float32), x16.astype(np.float32), rois, (3, 3), 0.5, 2)
    assert grad.dtype == np.float16
    np.testing.assert_array_equal(grad, expected.astype(np.float16))


def test_warp_steps_and_bins_are_warp_axis(rng):
    # the vectorised geometry (warp_bins for many boxes, warp_steps once per step count)
    # gives warp_axis's positions box by box
    from roilib.geometry import warp_axis, warp_bins, warp_steps

    for dtype in (np.float32, np.float64):
        starts = np.round(rng.uniform(-5, 30, 50)).astype(dtype)
        ends = starts + np.round(rng.uniform(-3, 60, 50)).astype(dtype)
        for n_bins, ratio in ((7, 2), (3, -1), (5, 3), (1, -1)):
            bin_size, grid, flat = warp_bins(starts, ends, n_bins, ratio, dtype)
            for k in range(50):
                axis = warp_axis(starts[k], ends[k], n_bins, ratio, dtype)
                frac, present = warp_steps(n_bins, int(grid[k]), dtype)
                assert axis.grid == grid[k] and axis.flat == flat[k]
                np.testing.assert_array_equal(axis.frac, frac)
                np.testing.assert_array_equal(axis.present, present)
                np.testing.assert_array_equal(axis.coord, starts[k] + frac * bin_size[k])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n_bins,grid", [(7, 2), (3, 4), (5, 3), (4, 1), (1, 2), (2, 0)])
def test_stored_samples_are_the_bins_taps_each_a_contiguous_run_where_possible(
    rng, monkeypatch, dtype, n_bins, grid
):
    # the distinct positions are stored in a tap-friendly order: tap j of bin p must read
    # what it reads with the positions in coordinate order, and with steps that end
    # exactly on the next bin's start (g = 1, 2, 4) every tap is a slice of step 1
    starts = np.round(rng.uniform(-8, 45, 9)).astype(dtype)  # some off the map
    bin_size = rng.uniform(0.2, 9, 9).astype(dtype)
    axis = rw._axis_grid(starts, bin_size, n_bins, grid, 40, dtype)
    monkeypatch.setattr(rw, "_tap_order", lambda taps: np.arange(int(taps.max()) + 1))
    plain = rw._axis_grid(starts, bin_size, n_bins, grid, 40, dtype)
    for field in ("read", "lo", "hi", "wlo", "whi"):
        got, expected = getattr(axis, field), getattr(plain, field)
        np.testing.assert_array_equal(got[:, axis.taps], expected[:, plain.taps])
    for j, pick in enumerate(axis.picks):
        np.testing.assert_array_equal(np.arange(axis.read.shape[1])[pick], axis.taps[:, j])
    if grid in (1, 2, 4) or n_bins == 1:
        assert all(isinstance(pick, slice) and pick.step in (None, 1) for pick in axis.picks)


def test_tap_order_groups_positions_by_their_remainder_or_keeps_them():
    regular = np.array([[0, 1, 2], [2, 3, 4], [4, 5, 6]])  # g = 2: shared ends
    np.testing.assert_array_equal(rw._tap_order(regular), [0, 2, 4, 6, 1, 3, 5])
    unshared = np.array([[0, 1, 2], [3, 4, 5]])  # steps that stop short of the next bin
    np.testing.assert_array_equal(rw._tap_order(unshared), [0, 3, 1, 4, 2, 5])
    irregular = np.array([[0, 1, 0], [2, 3, 4]])  # an absent last sample in bin 0
    np.testing.assert_array_equal(rw._tap_order(irregular), np.arange(5))
    np.testing.assert_array_equal(rw._tap_order(np.array([[0, 1, 2]])), np.arange(3))
