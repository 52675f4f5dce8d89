"""RoIWarp is MNC's RoI warping layer: a transliteration of its rules, hand cases and
finite differences.

``mnc_warp`` below is written from the rules of MNC's layer (``daijifeng001/caffe-mnc``,
``src/caffe/layers/roi_warping_layer.cu``) as plain scalar loops, independently of
roilib's vectorised reference and of its kernels. It keeps the layer's own float
behaviour: the steps ``1 / ceil(roi / P)`` are added one at a time in the layer's
float type.
"""
import math

import numpy as np
import pytest

import roilib
import roilib.reference as ref
from roilib.reference.roi_warp import warp_at_corners

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
