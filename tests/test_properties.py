"""Property tests (hypothesis) over shapes, scales and boxes."""
import numpy as np
from hypothesis import given
from hypothesis import strategies as st

import roilib

scales = st.sampled_from([1.0, 0.5, 0.25, 1 / 16])
sizes = st.integers(1, 9)
ratios = st.sampled_from([-1, 0, 1, 2, 3])


@st.composite
def problems(draw, max_boxes=5):
    """A random map and boxes (inside, partly outside, tiny, inverted)."""
    n, c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 3)), draw(sizes), draw(sizes)
    s = draw(scales)
    k = draw(st.integers(0, max_boxes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, w))
    corners = rng.uniform(-2, max(h, w) + 2, size=(k, 4)) / s
    rois = np.concatenate([rng.integers(0, n, (k, 1)), corners], axis=1)
    out = (draw(st.integers(1, 4)), draw(st.integers(1, 4)))
    return x, rois, out, s, rng


@given(problems(), ratios, st.booleans(), st.sampled_from(["avg", "max"]))
def test_roi_align_output_has_the_contract_shape_and_dtype(p, sr, aligned, mode):
    x, rois, out, s, _ = p
    for dtype in (np.float32, np.float64):
        y = roilib.roi_align(x.astype(dtype), rois, out, s, sr, aligned, mode)
        assert y.shape == (rois.shape[0], x.shape[1]) + out and y.dtype == dtype


@given(problems(), ratios, st.booleans())
def test_avg_roi_align_is_linear_in_the_input(p, sr, aligned):
    x, rois, out, s, rng = p
    z = rng.standard_normal(x.shape)
    f = lambda a: roilib.roi_align(a, rois, out, s, sr, aligned)  # noqa: E731
    np.testing.assert_allclose(f(2 * x - 3 * z), 2 * f(x) - 3 * f(z), atol=1e-12)


@given(problems(), ratios, st.booleans())
def test_avg_roi_align_adjointness(p, sr, aligned):
    x, rois, out, s, rng = p
    g = rng.standard_normal((rois.shape[0], x.shape[1]) + out)
    lhs = np.vdot(roilib.roi_align(x, rois, out, s, sr, aligned), g)
    rhs = np.vdot(x, roilib.roi_align_backward(g, x, rois, out, s, sr, aligned))
    np.testing.assert_allclose(lhs, rhs, rtol=1e-10, atol=1e-10)


@given(problems(), ratios, st.booleans())
def test_avg_roi_align_of_a_constant_map_inside_the_box_is_that_constant(p, sr, aligned):
    x, _, out, s, rng = p
    h, w = x.shape[2:]
    # boxes whose samples all fall inside the map: every bilinear sample returns the constant
    k = 4
    lo = rng.uniform(0.5, 1.0, (k, 2)) * np.array([w - 1, h - 1]) * 0.3
    hi = lo + rng.uniform(0.1, 0.6, (k, 2)) * np.array([w - 1, h - 1])
    rois = np.concatenate([np.zeros((k, 1)), lo / s, hi / s], axis=1)
    const = np.full(x.shape, 3.25)
    y = roilib.roi_align(const, rois, out, s, sr, aligned=False)
    np.testing.assert_allclose(y, 3.25, rtol=1e-12)


@given(problems())
def test_roi_pool_outputs_are_input_values_or_zero_for_empty_bins(p):
    x, rois, out, s, _ = p
    y = roilib.roi_pool(x, rois, out, s)
    for k in range(rois.shape[0]):
        values = set(x[int(rois[k, 0])].ravel().tolist()) | {0.0}
        assert set(y[k].ravel().tolist()) <= values


@given(problems(), st.sampled_from(["avg", "max"]))
def test_list_format_equals_batch_index_format(p, mode):
    x, rois, out, s, _ = p
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(x.shape[0])]
    order = np.concatenate([np.flatnonzero(rois[:, 0] == i) for i in range(x.shape[0])])
    np.testing.assert_array_equal(
        roilib.roi_align(x, per_image, out, s, mode=mode), roilib.roi_align(x, rois[order], out, s, mode=mode)
    )
    np.testing.assert_array_equal(roilib.roi_pool(x, per_image, out, s), roilib.roi_pool(x, rois[order], out, s))


@given(problems(), ratios, st.booleans(), st.sampled_from(["avg", "max"]))
def test_float32_agrees_with_float64(p, sr, aligned, mode):
    x, rois, out, s, _ = p
    y64 = roilib.roi_align(x, rois, out, s, sr, aligned, mode)
    y32 = roilib.roi_align(x.astype(np.float32), rois, out, s, sr, aligned, mode)
    # float32 may place a sample a rounding step away, across a clamp; allow small slack
    np.testing.assert_allclose(y32, y64, atol=1e-4)


@given(problems(), st.integers(-3, 3), st.integers(-3, 3))
def test_roi_align_is_equivariant_to_integer_shifts(p, dy, dx):
    x, _, out, s, rng = p
    n, c, h, w = x.shape
    pad = 5  # keeps every sample at least a pixel inside the map after a shift of 3
    big = np.zeros((n, c, h + 2 * pad + 6, w + 2 * pad + 6))
    big[:, :, pad : pad + h, pad : pad + w] = x
    shifted = np.roll(big, (dy, dx), axis=(2, 3))
    k = 3
    lo = pad + rng.uniform(0, 1, (k, 2)) * np.array([w, h])  # (x, y) in map pixels
    hi = lo + rng.uniform(0.5, 3, (k, 2))
    rois = np.concatenate([np.zeros((k, 1)), lo, hi], axis=1) / np.array([1, s, s, s, s])
    moved = rois + np.array([0, dx, dy, dx, dy]) / np.array([1, s, s, s, s])
    np.testing.assert_allclose(
        roilib.roi_align(shifted, moved, out, s, 2, True), roilib.roi_align(big, rois, out, s, 2, True), atol=1e-9
    )


@given(st.integers(1, 40), st.integers(1, 12))
def test_spp_bins_cover_the_axis_with_exactly_n_nonempty_bins(a, n):
    start, end = roilib.geometry.spp_bins(a, n)
    assert len(start) == n and start[0] == 0 and end[-1] == a
    assert np.all(end > start)
    assert np.all(start[1:] <= end[:-1])  # no pixel is skipped


@given(st.integers(1, 3), st.integers(1, 3), sizes, sizes, st.lists(st.integers(1, 5), min_size=1, max_size=3))
def test_spp_length_is_fixed_whatever_the_map_size(n, c, h, w, levels):
    x = np.random.default_rng(h * 100 + w).standard_normal((n, c, h, w))
    assert roilib.spp(x, levels).shape == (n, c * sum(m * m for m in levels))
