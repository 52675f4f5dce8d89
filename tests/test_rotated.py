"""Rotated RoIAlign (NumPy reference): identities, hand cases, gradients, bad input."""
import numpy as np
import pytest

import roilib
from roilib.geometry import roi_align_boxes, sample_points
from roilib.geometry_rotated import (
    roi_align_rotated_boxes,
    rotated_corners,
    rotated_sample_points,
    rotated_samples,
    to_axis_aligned,
)

from helpers import directional_derivative


def _map(rng, shape=(2, 3, 12, 14), dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def _dyadic_boxes(angle=0.0):
    """Boxes whose corners and centres are exact binary fractions (no rounding anywhere)."""
    return np.array(
        [
            [0, 6.0, 5.0, 6.0, 4.0, angle],
            [1, 7.25, 6.5, 5.5, 3.0, angle],
            [0, 2.0, 3.0, 8.0, 8.0, angle],  # reaches past the top-left edge
            [1, 12.5, 10.5, 3.0, 4.0, angle],  # near the bottom-right corner
            [0, -3.0, 4.0, 2.0, 2.0, angle],  # left of the map
        ]
    )


def _random_boxes(rng, n=12, angle=None, height=12, width=14):
    cx, cy = rng.uniform(-1, width + 1, n), rng.uniform(-1, height + 1, n)
    w, h = rng.uniform(0.3, 9, n), rng.uniform(0.3, 9, n)
    a = rng.uniform(-180, 180, n) if angle is None else np.full(n, float(angle))
    return np.stack([rng.integers(0, 2, n), cx, cy, w, h, a], axis=1)


# -- identities -------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 4])
def test_angle_zero_puts_the_samples_exactly_where_aligned_roi_align_does(dtype, sampling_ratio):
    # dyadic boxes, bins and sample offsets: both computations are exact
    rois = _dyadic_boxes(0.0)
    rotated = roi_align_rotated_boxes(rois, (2, 4), 1.0, sampling_ratio, True, dtype)
    plain = roi_align_boxes(to_axis_aligned(rois), (2, 4), 1.0, sampling_ratio, True, dtype)
    for k in range(len(rois)):
        y, x = rotated_sample_points(rotated, k, (2, 4))
        ys = sample_points(plain.start_y[k], plain.bin_h[k], int(plain.grid_h[k]), 2, dtype)
        xs = sample_points(plain.start_x[k], plain.bin_w[k], int(plain.grid_w[k]), 4, dtype)
        np.testing.assert_array_equal(y, np.broadcast_to(ys[:, None], y.shape))
        np.testing.assert_array_equal(x, np.broadcast_to(xs[None, :], x.shape))


@pytest.mark.parametrize("dtype,atol", [(np.float32, 2e-6), (np.float64, 1e-14)])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
def test_angle_zero_equals_aligned_roi_align(rng, dtype, atol, sampling_ratio):
    # same samples and weights; only the order of the additions differs
    x, rois = _map(rng, dtype=dtype), _dyadic_boxes(0.0)
    rotated = roilib.roi_align_rotated(x, rois, (3, 4), 1.0, sampling_ratio)
    aligned = roilib.roi_align(x, to_axis_aligned(rois), (3, 4), 1.0, sampling_ratio, aligned=True)
    np.testing.assert_allclose(rotated, aligned, rtol=0, atol=atol)


@pytest.mark.parametrize("spatial_scale", [1.0, 0.25])
def test_angle_zero_matches_aligned_roi_align_on_random_boxes(rng, spatial_scale):
    # corners computed two ways (cx - w/2 vs box start) round differently: last bits only
    x, rois = _map(rng), _random_boxes(rng, angle=0.0)
    rois[:, 1:5] /= spatial_scale
    rotated = roilib.roi_align_rotated(x, rois, (3, 4), spatial_scale, 2)
    aligned = roilib.roi_align(x, to_axis_aligned(rois), (3, 4), spatial_scale, 2, aligned=True)
    np.testing.assert_allclose(rotated, aligned, rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype,atol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_half_turn_flips_the_output_in_both_axes(rng, dtype, atol):
    x, rois = _map(rng, dtype=dtype), _random_boxes(rng)
    turned = rois.copy()
    turned[:, 5] += 180.0
    a = roilib.roi_align_rotated(x, rois, (3, 4), 1.0, 2)
    b = roilib.roi_align_rotated(x, turned, (3, 4), 1.0, 2)
    np.testing.assert_allclose(b, a[..., ::-1, ::-1], rtol=0, atol=atol)


def test_full_turn_changes_nothing(rng):
    x, rois = _map(rng), _random_boxes(rng)
    turned = rois.copy()
    turned[:, 5] -= 360.0
    np.testing.assert_allclose(
        roilib.roi_align_rotated(x, turned, 3, 1.0, 2), roilib.roi_align_rotated(x, rois, 3, 1.0, 2), atol=1e-12
    )


def test_list_of_per_image_boxes_equals_batch_index_format(rng):
    x, rois = _map(rng), _random_boxes(rng)
    order = np.argsort(rois[:, 0], kind="stable")
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    np.testing.assert_array_equal(
        roilib.roi_align_rotated(x, per_image, 2, 1.0, 2), roilib.roi_align_rotated(x, rois[order], 2, 1.0, 2)
    )


# -- hand cases -------------------------------------------------------------------------


def test_quarter_turn_by_hand():
    # X[i, j] = 10 i + j is linear, so each bin (one sample) reads the value at its centre.
    # aligned: the centre (2, 2) in image pixels is (1.5, 1.5) in index coordinates. At 0
    # degrees the two bins along the width sit at x = 1.5 -/+ 0.5 on row 1.5: 16 and 17.
    # At +90 degrees (counter-clockwise on the image, y down) the width axis points up:
    # the first bin is below the centre (y = 2), the second above (y = 1), both at x = 1.5.
    x = (10.0 * np.arange(4)[:, None] + np.arange(4)[None, :])[None, None]
    flat = roilib.roi_align_rotated(x, np.array([[0, 2.0, 2.0, 2.0, 2.0, 0.0]]), (1, 2), 1.0, 1)
    turned = roilib.roi_align_rotated(x, np.array([[0, 2.0, 2.0, 2.0, 2.0, 90.0]]), (1, 2), 1.0, 1)
    np.testing.assert_allclose(flat[0, 0], [[16.0, 17.0]], atol=1e-12)
    np.testing.assert_allclose(turned[0, 0], [[21.5, 11.5]], atol=1e-12)


def test_quarter_turn_reads_the_transposed_box_on_a_linear_map(rng):
    # on f(y, x) = a y + b x + c every bin of an inside box is f at the bin's rotated centre
    a, b, c = 0.7, -1.3, 2.0
    h, w = 16, 18
    x = (a * (np.arange(h)[:, None] + 0.5) + b * (np.arange(w)[None, :] + 0.5) + c)[None, None]
    box = np.array([[0, 9.0, 8.0, 7.0, 5.0, 90.0]])  # 7 wide, 5 high, turned upright
    out = roilib.roi_align_rotated(x, box, (5, 7), 1.0, 2)[0, 0]
    yy = -2.5 + np.arange(5) + 0.5  # bin centres in the box frame
    xx = -3.5 + np.arange(7) + 0.5
    y_img = 8.0 - xx[None, :] + 0 * yy[:, None]  # y = yy cos - xx sin + cy, cos 0, sin 1
    x_img = 9.0 + yy[:, None] + 0 * xx[None, :]
    np.testing.assert_allclose(out, a * y_img + b * x_img + c, atol=1e-12)


def test_rotated_corners_of_a_quarter_turn():
    corners = rotated_corners([0, 10.0, 20.0, 4.0, 2.0, 90.0], aligned=False)
    # (-w/2, -h/2) = (-2, -1) in the box frame goes to x = cx + yy = 9, y = cy - xx = 22
    np.testing.assert_allclose(corners, [[9, 22], [9, 18], [11, 18], [11, 22]], atol=1e-12)


def test_samples_beyond_one_pixel_outside_the_map_are_invalid():
    # a 4-wide box centred half a pixel left of the map, one sample per bin: x = -2 and 0
    boxes = roi_align_rotated_boxes(np.array([[0, -0.5, 3.0, 4.0, 1.0, 0.0]]), (1, 2), 1.0, 1, True)
    s = rotated_samples(boxes, 0, (1, 2), 6, 6)
    np.testing.assert_array_equal(s.x, [[-2.0, 0.0]])
    np.testing.assert_array_equal(s.valid, [[False, True]])
    assert not s.weight[0, 0].any()


def test_unaligned_raises_small_boxes_to_one_pixel_about_the_centre():
    boxes = roi_align_rotated_boxes(np.array([[0, 5.0, 5.0, 0.2, 3.0, 30.0]]), (2, 2), 1.0, -1, aligned=False)
    assert boxes.width[0] == 1.0 and boxes.height[0] == 3.0
    assert boxes.cx[0] == 5.0  # no half-pixel shift


def test_unaligned_at_angle_zero_equals_unaligned_roi_align_for_boxes_over_one_pixel(rng):
    x, rois = _map(rng), _random_boxes(rng, angle=0.0)
    rois[:, 3:5] = np.maximum(rois[:, 3:5], 1.5)
    rotated = roilib.roi_align_rotated(x, rois, (2, 3), 1.0, 2, aligned=False)
    plain = roilib.roi_align(x, to_axis_aligned(rois), (2, 3), 1.0, 2, aligned=False)
    np.testing.assert_allclose(rotated, plain, atol=1e-12)


def test_no_boxes_gives_an_empty_output(rng):
    out = roilib.roi_align_rotated(_map(rng), np.zeros((0, 6)), (3, 2))
    assert out.shape == (0, 3, 3, 2)


def test_box_far_outside_outputs_zero(rng):
    out = roilib.roi_align_rotated(_map(rng), np.array([[0, -40.0, -40.0, 5.0, 5.0, 33.0]]), 2)
    assert not out.any()


def test_float16_input_gives_float16_output_close_to_float32(rng):
    x, rois = _map(rng, dtype=np.float32), _random_boxes(rng)
    half = roilib.roi_align_rotated(x.astype(np.float16), rois, 3, 1.0, 2)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, roilib.roi_align_rotated(x, rois, 3, 1.0, 2), atol=2e-2)


# -- gradients --------------------------------------------------------------------------


@pytest.mark.parametrize("aligned", [True, False])
def test_backward_is_the_adjoint_of_the_forward(rng, aligned):
    x, rois = _map(rng), _random_boxes(rng)
    g = rng.standard_normal((len(rois), 3, 3, 4))
    out = roilib.roi_align_rotated(x, rois, (3, 4), 1.0, -1, aligned)
    grad = roilib.roi_align_rotated_backward(g, x, rois, (3, 4), 1.0, -1, aligned)
    assert np.isclose((out * g).sum(), (grad * x).sum(), rtol=1e-12)


def test_input_gradient_matches_finite_differences(rng):
    x, rois = _map(rng), _random_boxes(rng)
    g = rng.standard_normal((len(rois), 3, 2, 2))
    d = rng.standard_normal(x.shape)

    def loss(inp):
        return float((roilib.roi_align_rotated(inp, rois, 2, 1.0, 2) * g).sum())

    grad = roilib.roi_align_rotated_backward(g, x, rois, 2, 1.0, 2)
    assert np.isclose(directional_derivative(loss, x, d, 1e-4), (grad * d).sum(), rtol=1e-8)


@pytest.mark.parametrize("aligned,sampling_ratio", [(True, 2), (True, -1), (False, 2)])
def test_box_gradient_matches_finite_differences(rng, aligned, sampling_ratio):
    x = _map(rng)
    rois = _random_boxes(rng, n=8)
    rois[:, 3:5] = np.maximum(rois[:, 3:5], 1.2)  # away from the raise to 1 of aligned=False
    g = rng.standard_normal((len(rois), 3, 3, 2))
    grad = roilib.roi_align_rotated_rois_backward(g, x, rois, (3, 2), 0.5, sampling_ratio, aligned)
    for k in range(len(rois)):
        for col in range(1, 6):
            def loss(r, k=k):
                return float((roilib.roi_align_rotated(x, r, (3, 2), 0.5, sampling_ratio, aligned)[k] * g[k]).sum())

            e = np.zeros_like(rois)
            e[k, col] = 1.0
            fd = directional_derivative(loss, rois, e, 1e-6)
            assert np.isclose(grad[k, col], fd, rtol=1e-5, atol=1e-7), (k, col, grad[k, col], fd)


def test_box_gradient_at_angle_zero_equals_roi_align_s(rng):
    # d/dcx = d/dx1 + d/dx2 and d/dw = (d/dx2 - d/dx1) / 2 for the axis-aligned box
    x, rois = _map(rng), _random_boxes(rng, angle=0.0)
    g = rng.standard_normal((len(rois), 3, 2, 3))
    rotated = roilib.roi_align_rotated_rois_backward(g, x, rois, (2, 3), 1.0, 2)
    plain = roilib.roi_align_rois_backward(g, x, to_axis_aligned(rois), (2, 3), 1.0, 2, aligned=True)
    np.testing.assert_allclose(rotated[:, 1], plain[:, 1] + plain[:, 3], atol=1e-12)
    np.testing.assert_allclose(rotated[:, 2], plain[:, 2] + plain[:, 4], atol=1e-12)
    np.testing.assert_allclose(rotated[:, 3], (plain[:, 3] - plain[:, 1]) / 2, atol=1e-12)
    np.testing.assert_allclose(rotated[:, 4], (plain[:, 4] - plain[:, 2]) / 2, atol=1e-12)
    assert not rotated[:, 0].any()


def test_box_gradient_of_a_constant_map_is_zero_inside():
    x = np.full((1, 2, 20, 20), 2.0)
    rois = np.array([[0, 10.3, 9.7, 6.1, 4.2, 37.0]])
    grad = roilib.roi_align_rotated_rois_backward(np.ones((1, 2, 3, 3)), x, rois, 3, 1.0, 2)
    np.testing.assert_allclose(grad, 0, atol=1e-12)


# -- bad input --------------------------------------------------------------------------

X = np.zeros((2, 3, 8, 8), dtype=np.float32)


def test_axis_aligned_boxes_are_rejected_with_a_hint():
    with pytest.raises(ValueError, match=r"rois must have shape \(K, 6\).*axis-aligned"):
        roilib.roi_align_rotated(X, np.array([[0, 1, 1, 5, 5]], dtype=np.float32), 2)


@pytest.mark.parametrize("angle", [np.nan, np.inf, -np.inf])
def test_non_finite_angle_is_rejected(angle):
    with pytest.raises(ValueError, match=r"rois\[:, 5\] is the angle in degrees and must be finite; row 1"):
        roilib.roi_align_rotated(X, np.array([[0, 4, 4, 2, 2, 0], [0, 4, 4, 2, 2, angle]]), 2)


def test_non_finite_centre_is_rejected():
    with pytest.raises(ValueError, match=r"rois must be finite; row 0"):
        roilib.roi_align_rotated(X, np.array([[0, np.nan, 4, 2, 2, 0]]), 2)


def test_negative_size_is_rejected():
    with pytest.raises(ValueError, match=r"are the width and height and must be non-negative; row 0"):
        roilib.roi_align_rotated(X, np.array([[0, 4, 4, -2, 2, 0]]), 2)


def test_per_image_boxes_of_the_wrong_width_are_rejected():
    with pytest.raises(ValueError, match=r"rois\[0\] must have shape \(K_0, 5\)"):
        roilib.roi_align_rotated(X, [np.zeros((1, 4))], 2)


def test_batch_index_out_of_range_is_rejected():
    with pytest.raises(ValueError, match=r"batch index and must be in \[0, 2\)"):
        roilib.roi_align_rotated(X, np.array([[2, 4, 4, 2, 2, 0]]), 2)
