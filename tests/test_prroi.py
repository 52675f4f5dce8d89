"""Precise RoI Pooling (NumPy reference): exact integrals, convergence, both gradients."""
import numpy as np
import pytest

import roilib
from roilib.geometry_prroi import hat, hat_integral

from helpers import directional_derivative


def _map(rng, shape=(2, 3, 10, 12), dtype=np.float64):
    return rng.standard_normal(shape).astype(dtype)


def _inside_boxes(rng, n=10, height=10, width=12, min_size=1.0):
    """Boxes with corners inside [0, W-1] x [0, H-1], generic (non-integer) coordinates."""
    x1 = rng.uniform(0, width - 1 - min_size, n)
    y1 = rng.uniform(0, height - 1 - min_size, n)
    x2 = rng.uniform(x1 + min_size, width - 1)
    y2 = rng.uniform(y1 + min_size, height - 1)
    return np.stack([rng.integers(0, 2, n), x1, y1, x2, y2], axis=1)


def _any_boxes(rng, n=12, height=10, width=12):
    """Boxes inside, across the border and in the one-cell ramp outside the map."""
    x1, y1 = rng.uniform(-2.5, width, n), rng.uniform(-2.5, height, n)
    return np.stack([rng.integers(0, 2, n), x1, y1, x1 + rng.uniform(0.5, 8, n), y1 + rng.uniform(0.5, 8, n)], axis=1)


# -- the integral -------------------------------------------------------------------------


def test_hat_integral_equals_fine_quadrature(rng):
    lo = rng.uniform(-3, 3, 50)
    hi = lo + rng.uniform(0, 3, 50)
    j = rng.integers(-2, 3, 50)
    t = np.linspace(0, 1, 200001)
    for a, b, jj, exact in zip(lo, hi, j, hat_integral(lo, hi, j)):
        s = a + (b - a) * t
        assert np.isclose(np.trapezoid(hat(s - jj), s), exact, rtol=0, atol=1e-9)


def test_hat_integral_over_the_whole_support_is_one():
    assert hat_integral(np.array([-5.0]), np.array([5.0]), np.array([0]))[0] == 1.0


def test_every_bin_of_a_linear_map_equals_the_value_at_its_centre(rng):
    a, b, c = 0.3, -0.7, 1.5
    h, w = 10, 12
    x = (a * np.arange(h)[:, None] + b * np.arange(w)[None, :] + c)[None, None]
    rois = _inside_boxes(rng) * [0, 1, 1, 1, 1]
    out = roilib.prroi_pool(x, rois, (3, 4))[:, 0]
    cy = rois[:, 2, None] + (np.arange(3) + 0.5) * (rois[:, 4] - rois[:, 2])[:, None] / 3
    cx = rois[:, 1, None] + (np.arange(4) + 0.5) * (rois[:, 3] - rois[:, 1])[:, None] / 4
    np.testing.assert_allclose(out, a * cy[:, :, None] + b * cx[:, None, :] + c, rtol=0, atol=1e-12)


def test_one_pixel_map_by_hand():
    # a single pixel of value 1 at (0, 0): the interpolant is k(y) k(x) on [-1, 1]^2
    x = np.ones((1, 1, 1, 1))
    rois = np.array([[0, -1.0, -1.0, 1.0, 1.0], [0, 0.0, 0.0, 1.0, 1.0], [0, -0.5, -0.5, 0.5, 0.5], [0, 1.0, 1.0, 3.0, 3.0]])
    out = roilib.prroi_pool(x, rois, 1)[:, 0, 0, 0]
    # integral 1 over area 4; 1/4 over area 1; (3/4)^2 over area 1; nothing beyond the ramp
    np.testing.assert_allclose(out, [0.25, 0.25, 0.5625, 0.0], atol=1e-15)


def test_degenerate_and_inverted_boxes_output_zero(rng):
    rois = np.array([[0, 3.0, 3.0, 3.0, 6.0], [0, 3.0, 3.0, 6.0, 3.0], [1, 6.0, 6.0, 2.0, 2.0]])
    assert not roilib.prroi_pool(_map(rng), rois, 2).any()


def test_no_boxes_gives_an_empty_output(rng):
    assert roilib.prroi_pool(_map(rng), np.zeros((0, 5)), (2, 3)).shape == (0, 3, 2, 3)


def test_spatial_scale_scales_the_box(rng):
    x, rois = _map(rng), _any_boxes(rng)
    scaled = rois * [1, 4, 4, 4, 4]
    np.testing.assert_array_equal(roilib.prroi_pool(x, scaled, 2, 0.25), roilib.prroi_pool(x, rois, 2, 1.0))


def test_float16_input_gives_float16_output_close_to_float32(rng):
    x, rois = _map(rng, dtype=np.float32), _any_boxes(rng)
    half = roilib.prroi_pool(x.astype(np.float16), rois, 3)
    assert half.dtype == np.float16
    np.testing.assert_allclose(half, roilib.prroi_pool(x, rois, 3), atol=2e-2)


# -- RoIAlign's samples are a quadrature of the same integral ------------------------------


def convergence(x, rois, output_size, ratios):
    """Max |roi_align(aligned=False, sampling_ratio=n) - prroi_pool| for each n."""
    exact = roilib.prroi_pool(x, rois, output_size)
    return np.array(
        [np.abs(roilib.roi_align(x, rois, output_size, 1.0, n, aligned=False) - exact).max() for n in ratios]
    )


def test_roi_align_converges_to_prroi_pool_at_second_order(rng):
    x, rois = _map(rng), _inside_boxes(rng)
    ratios = np.array([2, 4, 8, 16, 32, 64])
    err = convergence(x, rois, (3, 4), ratios)
    slope = np.polyfit(np.log(ratios), np.log(err), 1)[0]
    assert err[-1] < 1e-3 * err[0]
    assert -2.4 < slope < -1.6  # the midpoint rule on a piecewise-linear function: O(n^-2)


def test_roi_align_does_not_converge_to_it_outside_the_map(rng):
    # RoIAlign clamps at the border; PrRoIPool lets the interpolant fall to 0
    x = np.ones((1, 1, 6, 6))
    rois = np.array([[0, -1.0, -1.0, 2.0, 2.0]])
    err = convergence(x, rois, 1, [64])
    assert err[0] > 0.1


# -- gradients ----------------------------------------------------------------------------


def test_input_backward_is_the_adjoint_of_the_forward(rng):
    x, rois = _map(rng), _any_boxes(rng)
    g = rng.standard_normal((len(rois), 3, 3, 4))
    out = roilib.prroi_pool(x, rois, (3, 4))
    grad = roilib.prroi_pool_backward(g, x, rois, (3, 4))
    assert np.isclose((out * g).sum(), (grad * x).sum(), rtol=1e-12)


def test_input_gradient_matches_finite_differences(rng):
    x, rois = _map(rng), _any_boxes(rng)
    g = rng.standard_normal((len(rois), 3, 2, 3))
    d = rng.standard_normal(x.shape)

    def loss(inp):
        return float((roilib.prroi_pool(inp, rois, (2, 3)) * g).sum())

    grad = roilib.prroi_pool_backward(g, x, rois, (2, 3))
    assert np.isclose(directional_derivative(loss, x, d, 1e-4), (grad * d).sum(), rtol=1e-8)


@pytest.mark.parametrize("spatial_scale", [1.0, 0.5])
def test_box_gradient_matches_finite_differences(rng, spatial_scale):
    x, rois = _map(rng), _any_boxes(rng)
    rois[:, 1:] /= spatial_scale
    g = rng.standard_normal((len(rois), 3, 3, 2))
    grad = roilib.prroi_pool_rois_backward(g, x, rois, (3, 2), spatial_scale)
    for k in range(len(rois)):
        for col in range(1, 5):
            def loss(r, k=k):
                return float((roilib.prroi_pool(x, r, (3, 2), spatial_scale)[k] * g[k]).sum())

            e = np.zeros_like(rois)
            e[k, col] = 1.0
            fd = directional_derivative(loss, rois, e, 1e-5)
            assert np.isclose(grad[k, col], fd, rtol=1e-5, atol=1e-7), (k, col, grad[k, col], fd)


def test_box_gradient_has_a_zero_batch_column_and_vanishes_for_empty_boxes(rng):
    x = _map(rng)
    rois = np.array([[1, 2.2, 3.1, 7.4, 8.3], [0, 4.0, 4.0, 4.0, 8.0]])
    grad = roilib.prroi_pool_rois_backward(np.ones((2, 3, 2, 2)), x, rois, 2)
    assert grad.shape == (2, 5) and not grad[:, 0].any() and grad[0, 1:].any() and not grad[1].any()


def test_box_gradient_of_a_constant_map_is_zero_inside():
    # moving a box inside a constant map changes nothing
    x = np.full((1, 2, 8, 8), 3.0)
    grad = roilib.prroi_pool_rois_backward(np.ones((1, 2, 2, 2)), x, np.array([[0, 1.3, 2.1, 5.9, 6.2]]), 2)
    np.testing.assert_allclose(grad, 0, atol=1e-12)


def iou_and_gradient(mask, box, object_area):
    """IoU of ``box`` with the object of ``mask``, its intersection read by PrRoIPool.

    ``inter = prroi_pool(mask) * area``, ``iou = inter / (area + object_area - inter)``;
    the gradient combines prroi_pool_rois_backward with the area's own derivative.
    """
    x1, y1, x2, y2 = box[0, 1:]
    area = (x2 - x1) * (y2 - y1)
    mean = roilib.prroi_pool(mask, box, 1)[0, 0, 0, 0]
    inter = mean * area
    union = area + object_area - inter
    d_mean = roilib.prroi_pool_rois_backward(np.ones((1, 1, 1, 1)), mask, box, 1)[0]
    d_area = np.array([0, -(y2 - y1), -(x2 - x1), y2 - y1, x2 - x1])
    d_inter = d_mean * area + mean * d_area
    d_iou = (d_inter * union - inter * (d_area - d_inter)) / union**2
    return inter / union, d_iou


def test_box_gradient_of_the_iou_matches_finite_differences():
    mask = np.zeros((1, 1, 20, 20))
    mask[0, 0, 6:14, 4:11] = 1.0
    box = np.array([[0, 3.3, 4.2, 9.1, 12.6]])
    _, grad = iou_and_gradient(mask, box, 56.0)
    for col in range(1, 5):
        e = np.zeros_like(box)
        e[0, col] = 1.0
        fd = directional_derivative(lambda b: iou_and_gradient(mask, b, 56.0)[0], box, e, 1e-6)
        assert np.isclose(grad[col], fd, rtol=1e-6, atol=1e-9)


def test_gradient_ascent_on_the_iou_moves_a_box_onto_the_object():
    # IoU-Net's refinement in miniature: the object fills rows 6..13, columns 4..10
    mask = np.zeros((1, 1, 20, 20))
    mask[0, 0, 6:14, 4:11] = 1.0
    object_area = 7.0 * 8.0  # its interpolant's integral
    box = np.array([[0, 6.5, 2.0, 13.0, 10.0]])
    before, _ = iou_and_gradient(mask, box, object_area)
    for _ in range(50):
        _, grad = iou_and_gradient(mask, box, object_area)
        box = box + 4.0 * grad
    after, _ = iou_and_gradient(mask, box, object_area)
    # it settles on the object's cells, [3.5, 10.5] x [5.5, 13.5], up to the ramps' pull
    assert before < 0.25 and after > 0.87
    np.testing.assert_allclose(box[0, 1:], [3.5, 5.5, 10.5, 13.5], atol=0.05)


# -- bad input ----------------------------------------------------------------------------


def test_rotated_boxes_are_rejected():
    x = np.zeros((1, 1, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"rois must have shape \(K, 5\)"):
        roilib.prroi_pool(x, np.zeros((1, 6), dtype=np.float32), 2)


def test_non_finite_box_is_rejected():
    x = np.zeros((1, 1, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match=r"rois must be finite"):
        roilib.prroi_pool_rois_backward(np.zeros((1, 1, 2, 2), np.float32), x, np.array([[0, 0, 0, np.inf, 1]]), 2)
