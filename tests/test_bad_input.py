"""One test per bad-input rule: the error type, and a message naming the argument."""
import numpy as np
import pytest

import roilib

X = np.zeros((2, 3, 8, 8), dtype=np.float32)
ROIS = np.array([[0, 1, 1, 5, 5], [1, 0, 0, 3, 3]], dtype=np.float32)
G = np.zeros((2, 3, 2, 2), dtype=np.float32)
BOX_OPS = [roilib.roi_align, roilib.roi_pool, roilib.roi_warp]


def _raises(exc, match, fn, *args, **kwargs):
    with pytest.raises(exc, match=match):
        fn(*args, **kwargs)


@pytest.mark.parametrize("op", BOX_OPS)
def test_input_with_wrong_ndim_is_rejected(op):
    _raises(ValueError, r"input must have 4 dimensions", op, X[0], ROIS, 2)


@pytest.mark.parametrize("op", BOX_OPS + [roilib.spp])
def test_integer_input_is_rejected(op):
    args = () if op is roilib.spp else (ROIS, 2)
    _raises(TypeError, r"input must be float16, float32 or float64", op, X.astype(np.int32), *args)


def test_non_array_input_is_rejected():
    _raises(TypeError, r"input must be a NumPy or CuPy array", roilib.roi_align, X.tolist(), ROIS, 2)


@pytest.mark.parametrize("op", BOX_OPS)
def test_k_by_4_rois_array_is_rejected_with_a_hint(op):
    _raises(ValueError, r"rois must have shape \(K, 5\).*lacks the batch index", op, X, ROIS[:, 1:], 2)


def test_rois_with_wrong_ndim_are_rejected():
    _raises(ValueError, r"rois must have shape \(K, 5\)", roilib.roi_align, X, ROIS[0], 2)


def test_list_entries_must_be_k_by_4():
    _raises(ValueError, r"rois\[1\] must have shape \(K_1, 4\)", roilib.roi_align, X, [ROIS[:, 1:], ROIS], 2)


def test_list_longer_than_the_batch_is_rejected():
    _raises(ValueError, r"rois is a list of 3 per-image box arrays but input has only 2", roilib.roi_pool, X, [ROIS[:, 1:]] * 3, 2)


def test_batch_index_out_of_range_is_rejected():
    bad = ROIS.copy()
    bad[1, 0] = 2
    _raises(ValueError, r"rois\[:, 0\] is the batch index and must be in \[0, 2\)", roilib.roi_align, X, bad, 2)


def test_negative_batch_index_is_rejected():
    bad = ROIS.copy()
    bad[0, 0] = -1
    _raises(ValueError, r"rois\[:, 0\].*must be in \[0, 2\)", roilib.roi_pool, X, bad, 2)


def test_fractional_batch_index_is_rejected():
    bad = ROIS.copy()
    bad[0, 0] = 0.5
    _raises(ValueError, r"rois\[:, 0\] is the batch index and must be an integer", roilib.roi_align, X, bad, 2)


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_boxes_are_rejected(value):
    bad = ROIS.copy()
    bad[1, 3] = value
    _raises(ValueError, r"rois must be finite; row 1", roilib.roi_align, X, bad, 2)


def test_non_numeric_rois_are_rejected():
    _raises(TypeError, r"rois must hold real numbers", roilib.roi_align, X, ROIS.astype(str), 2)


@pytest.mark.parametrize("size", [0, -1, (2, 0)])
def test_non_positive_output_size_is_rejected(size):
    _raises(ValueError, r"output_size must be positive", roilib.roi_align, X, ROIS, size)


@pytest.mark.parametrize("size", [2.0, (2, 2, 2), "7", True])
def test_output_size_of_wrong_type_is_rejected(size):
    _raises(TypeError, r"output_size must be an int or a pair of ints", roilib.roi_pool, X, ROIS, size)


@pytest.mark.parametrize("scale", [0.0, -0.25, float("nan"), float("inf")])
def test_non_positive_or_non_finite_scale_is_rejected(scale):
    _raises(ValueError, r"spatial_scale must be positive and finite", roilib.roi_align, X, ROIS, 2, scale)


def test_scale_of_wrong_type_is_rejected():
    _raises(TypeError, r"spatial_scale must be a real number", roilib.roi_pool, X, ROIS, 2, "0.25")


def test_fractional_sampling_ratio_is_rejected():
    _raises(TypeError, r"sampling_ratio must be an int", roilib.roi_align, X, ROIS, 2, 1.0, 1.5)


def test_non_boolean_aligned_is_rejected():
    _raises(TypeError, r"aligned must be True or False", roilib.roi_align, X, ROIS, 2, 1.0, 2, "yes")


def test_unknown_mode_is_rejected():
    _raises(ValueError, r"mode must be one of \('avg', 'max'\)", roilib.roi_align, X, ROIS, 2, mode="sum")


@pytest.mark.parametrize("mode", ["avg", "sum"])
def test_roi_warp_has_only_max_mode(mode):
    _raises(ValueError, r"mode must be 'max' for roi_warp", roilib.roi_warp, X, ROIS, 2, mode=mode)


def test_unknown_spp_mode_is_rejected():
    _raises(ValueError, r"mode must be one of", roilib.spp, X, (2, 1), "median")


@pytest.mark.parametrize("levels", [(), 4, (2, 1.5)])
def test_bad_spp_levels_type_is_rejected(levels):
    _raises(TypeError, r"levels must", roilib.spp, X, levels)


def test_non_positive_spp_level_is_rejected():
    _raises(ValueError, r"levels must be positive", roilib.spp, X, (2, 0))


def test_grad_output_of_wrong_shape_is_rejected():
    _raises(ValueError, r"grad_output must have the forward output's shape \(2, 3, 2, 2\)", roilib.roi_align_backward, G[:, :, :1], X, ROIS, 2)


def test_grad_output_of_wrong_dtype_is_rejected():
    _raises(TypeError, r"grad_output must have the input's dtype float32", roilib.roi_pool_backward, G.astype(np.float64), X, ROIS, 2)


def test_spp_grad_output_of_wrong_shape_is_rejected():
    _raises(ValueError, r"grad_output must have the forward output's shape \(2, 15\)", roilib.spp_backward, np.zeros((2, 14), np.float32), X, (2, 1))


def test_box_gradient_checks_its_arguments_too():
    _raises(ValueError, r"rois must be finite", roilib.roi_align_rois_backward, G, X, np.full((2, 5), np.nan, np.float32), 2)


def test_empty_spatial_map_is_rejected():
    _raises(ValueError, r"input must have a non-empty spatial size", roilib.roi_align, np.zeros((1, 1, 0, 4)), ROIS[:1], 2)


def test_zero_boxes_give_an_empty_result():
    out = roilib.roi_align(X, np.zeros((0, 5), np.float32), (3, 4))
    assert out.shape == (0, 3, 3, 4) and out.dtype == np.float32
    assert roilib.roi_pool(X, [np.zeros((0, 4)), np.zeros((0, 4))], 2).shape == (0, 3, 2, 2)
    grad = roilib.roi_align_backward(np.zeros((0, 3, 2, 2), np.float32), X, np.zeros((0, 5)), 2)
    assert grad.shape == X.shape and not grad.any()


def test_float16_input_is_computed_in_float32_and_returned_as_float16():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 2, 6, 6)).astype(np.float16)
    out = roilib.roi_align(x, ROIS[:1], 3, sampling_ratio=2)
    assert out.dtype == np.float16
    np.testing.assert_allclose(out, roilib.roi_align(x.astype(np.float32), ROIS[:1], 3, sampling_ratio=2), atol=2e-3)
