"""The deliberate differences from torchvision.ops that chapters/api.md lists, checked on
roilib's side (torchvision's side was observed with torchvision 0.29.1: it returns
zeros for a NaN box, reads outside the input for a batch index of N or more, truncates
a fractional one, returns an empty tensor for output_size 0, raises AssertionError for
boxes of the wrong shape and leaves boxes.grad at None)."""
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import roilib.torch as rt  # noqa: E402

X = torch.tensor(np.random.default_rng(0).standard_normal((2, 3, 8, 8)))
BOX = [0.0, 1.2, 1.3, 5.1, 5.7]


def _rois(*rows):
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize(
    "rois, message",
    [
        (_rois([0, math.nan, 1, 5, 5]), "rois must be finite"),
        (_rois([0, 1, 1, math.inf, 5]), "rois must be finite"),
        (_rois([2, 1, 1, 5, 5]), r"batch index and must be in \[0, 2\)"),
        (_rois([0.5, 1, 1, 5, 5]), "batch index and must be an integer"),
    ],
    ids=["nan", "inf", "batch-index-out-of-range", "fractional-batch-index"],
)
@pytest.mark.parametrize("op", [rt.roi_align, rt.roi_pool, rt.roi_warp])
def test_values_torchvision_accepts_silently_raise_value_error(op, rois, message):
    with pytest.raises(ValueError, match=message):
        op(X, rois, 2)


def test_more_per_image_box_lists_than_images_is_an_error():
    boxes = [_rois(BOX[1:])] * 3
    with pytest.raises(ValueError, match="batch index"):
        rt.roi_align(X, boxes, 2)


def test_output_size_zero_is_an_error_not_an_empty_tensor():
    with pytest.raises(ValueError, match="output_size must be positive"):
        rt.roi_align(X, _rois(BOX), 0)


def test_wrong_box_shape_is_value_error_not_assertion_error():
    with pytest.raises(ValueError, match=r"rois must have shape \(K, 5\)"):
        rt.roi_pool(X, _rois(BOX[1:]), 2)


def test_bad_arguments_are_type_or_value_errors_naming_them():
    with pytest.raises(TypeError, match="input must be float16, float32 or float64"):
        rt.roi_pool(X.long(), _rois(BOX), 2)
    with pytest.raises(TypeError, match="aligned must be True or False"):
        rt.roi_align(X, _rois(BOX), 2, 1.0, 2, "False")
    with pytest.raises(ValueError, match="mode must be one of"):
        rt.roi_align(X, _rois(BOX), 2, mode="sum")
    with pytest.raises(ValueError, match="spatial_scale must be positive"):
        rt.RoIAlign(2, 0.0, 2)


def test_roi_align_and_roi_warp_give_boxes_a_gradient_roi_pool_does_not():
    for op, wants in ((rt.roi_align, True), (rt.roi_pool, False), (rt.roi_warp, True)):
        boxes = [_rois(BOX[1:]).requires_grad_(True)]
        x = X.clone().requires_grad_(True)
        op(x, boxes, 2, 1.0).sum().backward()
        assert x.grad is not None and x.grad.abs().sum() > 0
        if wants:
            assert boxes[0].grad is not None and boxes[0].grad.abs().sum() > 0
        else:
            assert boxes[0].grad is None
