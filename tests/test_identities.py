"""Exact identities every implementation must satisfy: adjointness, finite differences,
RoIWarp = RoIAlign on grid-aligned boxes, SPP levels as pooling windows."""
import numpy as np
import pytest

import roilib
from helpers import directional_derivative, random_boxes

SHAPE = (2, 3, 11, 13)
SCALE = 0.5


def _setup(rng, margin=2.0, min_size=1.5):
    x = rng.standard_normal(SHAPE)
    rois = random_boxes(rng, 7, SHAPE[0], SHAPE[2], SHAPE[3], SCALE, margin=margin, min_size=min_size)
    return x, rois


@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 1, 2, 3])
def test_avg_roi_align_backward_is_the_adjoint_of_forward(rng, aligned, sampling_ratio):
    x, rois = _setup(rng)
    kw = dict(output_size=(3, 4), spatial_scale=SCALE, sampling_ratio=sampling_ratio, aligned=aligned)
    g = rng.standard_normal((rois.shape[0], SHAPE[1], 3, 4))
    lhs = np.vdot(roilib.roi_align(x, rois, **kw), g)
    rhs = np.vdot(x, roilib.roi_align_backward(g, x, rois, **kw))
    assert lhs == pytest.approx(rhs, rel=1e-12, abs=1e-12)


def test_avg_spp_backward_is_the_adjoint_of_forward(rng):
    x = rng.standard_normal(SHAPE)
    g = rng.standard_normal((SHAPE[0], SHAPE[1] * (9 + 4 + 1)))
    lhs = np.vdot(roilib.spp(x, (3, 2, 1), "avg"), g)
    rhs = np.vdot(x, roilib.spp_backward(g, x, (3, 2, 1), "avg"))
    assert lhs == pytest.approx(rhs, rel=1e-12)


def _input_gradient_matches_finite_differences(rng, forward, backward, out_shape):
    x = rng.standard_normal(SHAPE)
    g = rng.standard_normal(out_shape)
    d = rng.standard_normal(SHAPE)
    numeric = directional_derivative(lambda z: np.vdot(forward(z), g), x, d, 1e-6)
    analytic = np.vdot(backward(g, x), d)
    assert analytic == pytest.approx(numeric, rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_input_gradient_matches_finite_differences(rng, mode, aligned):
    _, rois = _setup(rng)
    kw = dict(output_size=(3, 2), spatial_scale=SCALE, sampling_ratio=-1, aligned=aligned, mode=mode)
    _input_gradient_matches_finite_differences(
        rng,
        lambda z: roilib.roi_align(z, rois, **kw),
        lambda g, z: roilib.roi_align_backward(g, z, rois, **kw),
        (rois.shape[0], SHAPE[1], 3, 2),
    )


def test_roi_pool_input_gradient_matches_finite_differences(rng):
    _, rois = _setup(rng)
    _input_gradient_matches_finite_differences(
        rng,
        lambda z: roilib.roi_pool(z, rois, 3, SCALE),
        lambda g, z: roilib.roi_pool_backward(g, z, rois, 3, SCALE),
        (rois.shape[0], SHAPE[1], 3, 3),
    )


@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_warp_input_gradient_matches_finite_differences(rng, sampling_ratio):
    _, rois = _setup(rng)
    _input_gradient_matches_finite_differences(
        rng,
        lambda z: roilib.roi_warp(z, rois, 3, SCALE, sampling_ratio),
        lambda g, z: roilib.roi_warp_backward(g, z, rois, 3, SCALE, sampling_ratio),
        (rois.shape[0], SHAPE[1], 3, 3),
    )


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_spp_input_gradient_matches_finite_differences(rng, mode):
    levels = (4, 2, 1)
    _input_gradient_matches_finite_differences(
        rng,
        lambda z: roilib.spp(z, levels, mode),
        lambda g, z: roilib.spp_backward(g, z, levels, mode),
        (SHAPE[0], SHAPE[1] * 21),
    )


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("aligned", [False, True])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_box_gradient_matches_finite_differences(rng, mode, aligned, sampling_ratio):
    # boxes partly outside the map too: samples there are constant (0 or clamped) and
    # the derivative must say so
    x, rois = _setup(rng, margin=1.5, min_size=2.0)
    kw = dict(output_size=(3, 2), spatial_scale=SCALE, sampling_ratio=sampling_ratio, aligned=aligned, mode=mode)
    g = rng.standard_normal((rois.shape[0], SHAPE[1], 3, 2))
    grad = roilib.roi_align_rois_backward(g, x, rois, **kw)
    assert grad.shape == rois.shape and np.all(grad[:, 0] == 0)
    for k in range(rois.shape[0]):
        for j in range(1, 5):
            d = np.zeros_like(rois)
            d[k, j] = 1.0
            numeric = directional_derivative(lambda r: np.vdot(roilib.roi_align(x, r, **kw), g), rois, d, 1e-6)
            assert grad[k, j] == pytest.approx(numeric, rel=1e-5, abs=1e-7), (k, j)


def test_roi_align_box_gradient_uses_the_clamped_size_for_tiny_unaligned_boxes(rng):
    # roi_h < 1 is raised to 1: the far corner stops mattering
    x = rng.standard_normal(SHAPE)
    rois = np.array([[0, 6.3, 5.1, 6.9, 5.6]]) / SCALE
    rois[0, 0] = 0
    kw = dict(output_size=2, spatial_scale=SCALE, sampling_ratio=2, aligned=False)
    g = rng.standard_normal((1, SHAPE[1], 2, 2))
    grad = roilib.roi_align_rois_backward(g, x, rois, **kw)
    assert grad[0, 3] == 0 and grad[0, 4] == 0
    d = np.zeros_like(rois)
    d[0, 1] = 1
    numeric = directional_derivative(lambda r: np.vdot(roilib.roi_align(x, r, **kw), g), rois, d, 1e-6)
    assert grad[0, 1] == pytest.approx(numeric, rel=1e-6)


def test_roi_warp_rounds_the_box_like_roi_pool(rng):
    x = rng.standard_normal(SHAPE)
    rois = np.array([[0, 2.4, 3.6, 15.5, 12.49]])  # at scale 1: corners round to 2, 4, 16, 12
    on_grid = np.array([[0, 2, 4, 16, 12]], dtype=float)
    np.testing.assert_array_equal(roilib.roi_warp(x, rois, 3), roilib.roi_warp(x, on_grid, 3))


def test_spp_one_by_one_level_is_the_global_max(rng):
    x = rng.standard_normal(SHAPE)
    np.testing.assert_array_equal(roilib.spp(x, (1,)), x.max(axis=(2, 3)))


def test_spp_one_by_one_avg_level_is_the_global_mean(rng):
    x = rng.standard_normal(SHAPE)
    np.testing.assert_allclose(roilib.spp(x, (1,), "avg"), x.mean(axis=(2, 3)), rtol=1e-13)


def test_spp_concatenates_levels_in_order_channel_major(rng):
    x = rng.standard_normal(SHAPE)
    n, c = SHAPE[:2]
    both = roilib.spp(x, (2, 1))
    np.testing.assert_array_equal(both[:, : c * 4], roilib.spp(x, (2,)))
    np.testing.assert_array_equal(both[:, c * 4 :], roilib.spp(x, (1,)))
    level = roilib.spp(x, (2,)).reshape(n, c, 2, 2)
    # top-left cell of a 2x2 pyramid on 11 rows, 13 columns: rows [0, 6), columns [0, 7)
    np.testing.assert_array_equal(level[:, :, 0, 0], x[:, :, :6, :7].max(axis=(2, 3)))


@pytest.mark.parametrize("n", [1, 2, 3, 4, 6])
def test_roi_pool_on_the_whole_map_is_one_spp_level(rng, n):
    x = rng.standard_normal(SHAPE)
    h, w = SHAPE[2:]
    rois = np.array([[b, 0, 0, w - 1, h - 1] for b in range(SHAPE[0])], dtype=float)
    pooled = roilib.roi_pool(x, rois, n, 1.0)
    np.testing.assert_array_equal(pooled.reshape(SHAPE[0], -1), roilib.spp(x, (n,)))


def test_roi_pool_backward_sends_each_gradient_to_its_argmax(rng):
    x = rng.standard_normal((1, 1, 4, 4))
    rois = np.array([[0, 0, 0, 3, 3]], float)
    g = np.ones((1, 1, 1, 1))
    grad = roilib.roi_pool_backward(g, x, rois, 1)
    expected = np.zeros_like(x)
    expected.reshape(-1)[np.argmax(x)] = 1
    np.testing.assert_array_equal(grad, expected)
