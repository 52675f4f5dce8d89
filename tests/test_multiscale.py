"""Multi-scale RoIAlign (FPN): the level rule by hand at its boundaries, the fused call
against RoIAlign box by box, adjointness, bad inputs, and the kernels built for the CPU.

Parity with torchvision (levels, forward, backward) is in tests/test_family_parity.py.
"""
import os
import shutil

import numpy as np
import pytest

import roilib
from roilib.family import NO_LEVEL, fpn_levels, infer_scale, level_boundaries, level_range
from roilib.reference.multiscale import box_levels

SCALES = (1 / 4, 1 / 8, 1 / 16, 1 / 32)  # P2 .. P5


def _square(side, x0=10.0, y0=20.0, batch=0):
    return [batch, x0, y0, x0 + side, y0 + side]


def _pyramid(rng, dtype=np.float64, n=2, c=3, image_hw=(256, 320)):
    h, w = image_hw
    return [rng.standard_normal((n, c, int(h * s), int(w * s))).astype(dtype) for s in SCALES]


def _boxes(rng, n=2, k=20, image_hw=(256, 320)):
    h, w = image_hw
    cx, cy = rng.uniform(0, w, k), rng.uniform(0, h, k)
    side = np.exp(rng.uniform(np.log(4), np.log(600), (2, k)))
    boxes = np.stack([rng.integers(0, n, k), cx - side[0] / 2, cy - side[1] / 2, cx + side[0] / 2, cy + side[1] / 2], 1)
    extra = [_square(0.0), [1, 300.0, 10.0, 200.0, 90.0], [0, 280.0, 200.0, 180.0, 100.0], _square(224.0, batch=1), _square(520.0, batch=1)]
    return np.concatenate([boxes, extra])


# -- the level rule --------------------------------------------------------------------------


def test_level_range_from_scales():
    assert level_range(SCALES) == (2, 5)


@pytest.mark.parametrize(
    "side, level",
    [
        (224.0, 4),  # the canonical box: k0
        (224.0 * 2.0 ** -5e-7, 4),  # log2 is -5e-7; eps = 1e-6 lifts it back to k0
        (224.0 * 2.0 ** -2e-6, 3),  # -2e-6 + 1e-6 < 0: the level below
        (112.0, 3),
        (112.0 * (1 - 1e-3), 2),
        (448.0, 5),
        (448.0 * (1 - 1e-3), 4),
        (5000.0, 5),  # clamped to the coarsest map
        (3.0, 2),  # clamped to the finest map
    ],
)
def test_level_at_and_around_the_boundaries(side, level):
    got = fpn_levels(np.array([_square(side)]), 2, 5)
    assert got.tolist() == [level - 2]


def test_level_boundaries_are_where_the_level_changes():
    edges = level_boundaries(2, 5)
    np.testing.assert_allclose(edges, 224 * 2.0 ** (np.array([3, 4, 5]) - 4 - 1e-6))
    above = fpn_levels(np.array([_square(e * (1 + 1e-9)) for e in edges]), 2, 5)
    below = fpn_levels(np.array([_square(e * (1 - 1e-9)) for e in edges]), 2, 5)
    assert above.tolist() == [1, 2, 3] and below.tolist() == [0, 1, 2]


def test_zero_area_goes_to_the_finest_level_and_negative_area_to_none():
    rois = np.array([_square(0.0), [0, 30.0, 0.0, 10.0, 40.0], [0, 500.0, 600.0, 100.0, 200.0]])
    assert fpn_levels(rois, 2, 5).tolist() == [0, NO_LEVEL, 2]  # inverted in both: side 400, level 4


def test_one_map_takes_every_box():
    assert box_levels(np.array([[0, 30.0, 0.0, 10.0, 40.0]]), [0.125]).tolist() == [0]


def test_canonical_scale_and_level_move_the_boundaries():
    rois = np.array([_square(56.0)])
    assert fpn_levels(rois, 2, 5, canonical_scale=56, canonical_level=3).tolist() == [1]
    assert fpn_levels(rois, 2, 5).tolist() == [0]  # 4 + log2(56 / 224) = 2


def test_infer_scale_nearest_power_of_two():
    assert infer_scale((25, 34), (800, 1088)) == (1 / 32, 1 / 32)
    assert infer_scale((200, 272), (797, 1085)) == (0.25, 0.25)


# -- the fused call -----------------------------------------------------------------------------


def test_each_box_equals_roi_align_on_its_level(rng):
    maps = _pyramid(rng)
    rois = _boxes(rng)
    out = roilib.multiscale_roi_align(maps, rois, (3, 4), SCALES, 2)
    levels = box_levels(rois, SCALES)
    assert set(levels.tolist()) >= {NO_LEVEL, 0, 1, 2, 3}
    for k, level in enumerate(levels):
        if level == NO_LEVEL:
            assert not out[k].any()
            continue
        one = roilib.roi_align(maps[level], rois[k : k + 1], (3, 4), SCALES[level], 2)
        np.testing.assert_array_equal(out[k : k + 1], one)


def test_backward_is_the_adjoint_of_the_forward(rng):
    maps = _pyramid(rng)
    rois = _boxes(rng)
    out = roilib.multiscale_roi_align(maps, rois, 3, SCALES, -1, aligned=True)
    g = rng.standard_normal(out.shape)
    grads = roilib.multiscale_roi_align_backward(g, maps, rois, 3, SCALES, -1, aligned=True)
    assert [gr.shape for gr in grads] == [m.shape for m in maps]
    np.testing.assert_allclose(sum(np.vdot(gr, m) for gr, m in zip(grads, maps)), np.vdot(g, out), rtol=1e-12)


def test_no_boxes(rng):
    maps = _pyramid(rng)
    assert roilib.multiscale_roi_align(maps, np.zeros((0, 5)), 2, SCALES).shape == (0, 3, 2, 2)
    grads = roilib.multiscale_roi_align_backward(np.zeros((0, 3, 2, 2)), maps, np.zeros((0, 5)), 2, SCALES)
    assert all(not g.any() for g in grads)


# -- bad inputs ----------------------------------------------------------------------------------


def test_scales_must_match_the_maps(rng):
    maps = _pyramid(rng)
    with pytest.raises(ValueError, match="scales has 3 entries but there are 4 feature maps"):
        roilib.multiscale_roi_align(maps, np.zeros((0, 5)), 2, SCALES[:3])


def test_scales_must_halve(rng):
    maps = _pyramid(rng)[:2]
    with pytest.raises(ValueError, match="scales must halve from each level to the next"):
        roilib.multiscale_roi_align(maps, np.zeros((0, 5)), 2, (1 / 4, 1 / 16))


def test_scales_must_be_powers_of_two(rng):
    maps = _pyramid(rng)[:1]
    with pytest.raises(ValueError, match=r"scales\[0\] = 0.3 is not a power of two"):
        roilib.multiscale_roi_align(maps, np.zeros((0, 5)), 2, (0.3,))


def test_maps_must_share_channels(rng):
    maps = _pyramid(rng)
    maps[2] = maps[2][:, :2]
    with pytest.raises(ValueError, match=r"features\[2\] has \(N, C\) = \(2, 2\) but features\[0\] has \(2, 3\)"):
        roilib.multiscale_roi_align(maps, np.zeros((0, 5)), 2, SCALES)


def test_features_must_be_a_list():
    with pytest.raises(TypeError, match="features must be a non-empty list"):
        roilib.reference.multiscale_roi_align(np.zeros((1, 1, 4, 4)), np.zeros((0, 5)), 2, (0.25,))


# -- the kernels on the CPU -----------------------------------------------------------------------

needs_cxx = pytest.mark.skipif(shutil.which(os.environ.get("CXX", "c++")) is None, reason="no C++ compiler")
KERNEL_TOL = {np.float16: 2e-3, np.float32: 2e-6, np.float64: 1e-13}


@needs_cxx
@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
@pytest.mark.parametrize("sampling_ratio, aligned", [(2, False), (-1, True)])
def test_kernel_matches_reference(dtype, sampling_ratio, aligned, rng):
    from roilib.cuda import cpu

    maps, rois = _pyramid(rng, dtype), _boxes(rng)
    args = ((3, 2), SCALES, sampling_ratio)
    out = cpu.multiscale_roi_align(maps, rois, *args, aligned=aligned)
    ref = roilib.multiscale_roi_align(maps, rois, *args, aligned=aligned)
    assert out.dtype == dtype
    np.testing.assert_allclose(out.astype(np.float64), ref.astype(np.float64), rtol=0, atol=KERNEL_TOL[dtype])
    g = rng.standard_normal(out.shape).astype(dtype)
    grads = cpu.multiscale_roi_align_backward(g, maps, rois, *args, aligned=aligned)
    refs = roilib.multiscale_roi_align_backward(g, maps, rois, *args, aligned=aligned)
    for got, want in zip(grads, refs):
        assert got.dtype == dtype and got.shape == want.shape
        np.testing.assert_allclose(got.astype(np.float64), want.astype(np.float64), rtol=0, atol=KERNEL_TOL[dtype])


@needs_cxx
def test_kernel_levels_match_the_reference_rule(rng):
    from roilib.cuda import cpu

    rois = np.concatenate([_boxes(rng), [_square(s) for s in (224.0, 224.0 * 2.0 ** -5e-7, 224.0 * 2.0 ** -2e-6)]])
    maps = _pyramid(rng)
    # maps filled with their level index + 1: the outputs then show the level used
    marked = [np.zeros_like(m) + i + 1 for i, m in enumerate(maps)]
    out = cpu.multiscale_roi_align(marked, rois, 1, SCALES, 1, aligned=True)
    levels = box_levels(rois, SCALES)
    expected = np.where(levels == NO_LEVEL, 0, levels + 1).astype(float)
    inside = out[:, 0, 0, 0] != 0  # boxes wholly outside their map read 0
    np.testing.assert_allclose(out[inside, 0, 0, 0], expected[inside], rtol=0, atol=1e-12)
    assert inside.sum() > 10
