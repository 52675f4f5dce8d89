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
