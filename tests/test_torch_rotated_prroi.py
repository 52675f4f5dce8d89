"""roilib.torch: roi_align_rotated and prroi_pool as torch ops (CPU; CUDA in test_kernels_gpu.py)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import roilib  # noqa: E402
import roilib.torch as rt  # noqa: E402


def _map(dtype=torch.float64, seed=0):
    return torch.tensor(np.random.default_rng(seed).standard_normal((2, 3, 9, 11)), dtype=dtype)


def _rotated(dtype=torch.float64):
    return torch.tensor(
        [[0, 4.3, 4.1, 5.2, 3.3, 30.0], [1, 5.7, 3.9, 4.4, 6.1, -65.0], [0, 6.1, 5.2, 2.7, 2.9, 180.0]], dtype=dtype
    )


def _boxes(dtype=torch.float64):
    return torch.tensor([[0, 1.3, 2.2, 6.7, 7.1], [1, -0.6, 0.4, 4.9, 5.3], [1, 3.1, 2.6, 9.8, 8.4]], dtype=dtype)


def test_roi_align_rotated_matches_the_reference():
    x, rois = _map(), _rotated()
    out = rt.roi_align_rotated(x, rois, (3, 2), 0.5, 2)
    np.testing.assert_array_equal(out.numpy(), roilib.roi_align_rotated(x.numpy(), rois.numpy(), (3, 2), 0.5, 2))


def test_prroi_pool_matches_the_reference():
    x, rois = _map(), _boxes()
    np.testing.assert_array_equal(rt.prroi_pool(x, rois, 3, 0.5).numpy(), roilib.prroi_pool(x.numpy(), rois.numpy(), 3, 0.5))


@pytest.mark.parametrize("aligned", [True, False])
def test_roi_align_rotated_passes_gradcheck_in_input_and_boxes(aligned):
    x = _map().requires_grad_(True)
    rois = _rotated()
    boxes = [rois[rois[:, 0] == i, 1:].clone().requires_grad_(True) for i in range(2)]

    def f(inp, b0, b1):
        return rt.roi_align_rotated(inp, [b0, b1], (2, 3), 1.0, 2, aligned)

    assert torch.autograd.gradcheck(f, (x, *boxes), eps=1e-6, atol=1e-6)


def test_prroi_pool_passes_gradcheck_in_input_and_boxes():
    x = _map().requires_grad_(True)
    rois = _boxes()
    boxes = [rois[rois[:, 0] == i, 1:].clone().requires_grad_(True) for i in range(2)]

    def f(inp, b0, b1):
        return rt.prroi_pool(inp, [b0, b1], (2, 3), 1.0)

    assert torch.autograd.gradcheck(f, (x, *boxes), eps=1e-6, atol=1e-6)


def test_box_gradient_is_none_when_rotated_boxes_do_not_require_it():
    x = _map().requires_grad_(True)
    rois = _rotated()
    rt.roi_align_rotated(x, rois, 2, 1.0, 2).sum().backward()
    assert rois.grad is None and x.grad is not None


def test_per_image_rotated_boxes_equal_batch_index_format():
    x, rois = _map(), _rotated()
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).flatten() for i in range(2)])
    np.testing.assert_array_equal(
        rt.roi_align_rotated(x, per_image, 2, 1.0, 2).numpy(), rt.roi_align_rotated(x, rois[order], 2, 1.0, 2).numpy()
    )


def test_modules_mirror_the_functions():
    x = _map(torch.float32)
    rois, boxes = _rotated(torch.float32), _boxes(torch.float32)
    np.testing.assert_array_equal(
        rt.RoIAlignRotated((2, 2), 0.5, 2)(x, rois).numpy(), rt.roi_align_rotated(x, rois, 2, 0.5, 2).numpy()
    )
    np.testing.assert_array_equal(rt.PrRoIPool(2, 0.5)(x, boxes).numpy(), rt.prroi_pool(x, boxes, 2, 0.5).numpy())
    assert "aligned=True" in repr(rt.RoIAlignRotated(7, 0.25, 2))


def test_wrong_box_width_raises_a_clear_error():
    x = _map()
    with pytest.raises(ValueError, match=r"rois must have shape \(K, 6\)"):
        rt.roi_align_rotated(x, _boxes(), 2)
    with pytest.raises(ValueError, match=r"boxes\[0\] must be a tensor of shape \(K_0, 5\)"):
        rt.roi_align_rotated(x, [_rotated()], 2)


def test_ops_work_under_torch_compile():
    x = _map(torch.float32).requires_grad_(True)
    rois, boxes = _rotated(torch.float32), _boxes(torch.float32).requires_grad_(True)

    def head(inp, b):
        return rt.roi_align_rotated(inp, rois, 2, 1.0, 2).sum() + (rt.prroi_pool(inp, b, 2) ** 2).sum()

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    loss = compiled(x, boxes)
    grads = torch.autograd.grad(loss, (x, boxes))
    x2, b2 = x.detach().clone().requires_grad_(True), boxes.detach().clone().requires_grad_(True)
    expected = head(x2, b2)
    torch.testing.assert_close(loss, expected)
    for got, want in zip(grads, torch.autograd.grad(expected, (x2, b2))):
        torch.testing.assert_close(got, want)


def test_custom_ops_pass_torch_library_opcheck():
    x = _map()
    torch.library.opcheck(torch.ops.roilib.roi_align_rotated.default, (x, _rotated(), [2, 2], 0.5, 2, True))
    torch.library.opcheck(torch.ops.roilib.prroi_pool.default, (x, _boxes(), [2, 2], 0.5))


def test_cpu_ops_ignore_the_deterministic_setting():
    # the NumPy reference is deterministic; only the CUDA atomics would raise
    x = _map().requires_grad_(True)
    torch.use_deterministic_algorithms(True)
    try:
        rt.prroi_pool(x, _boxes(), 2).sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
    assert x.grad is not None


def test_the_cuda_atomic_backward_alerts_like_torchvision_under_deterministic_algorithms():
    # what the CUDA path calls before launching an atomic backward (no GPU needed here)
    rt._alert_not_deterministic("roilib::prroi_pool_backward")  # off: nothing happens
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="roilib::prroi_pool_backward does not have a deterministic"):
            rt._alert_not_deterministic("roilib::prroi_pool_backward")
        torch.use_deterministic_algorithms(True, warn_only=True)
        with pytest.warns(UserWarning, match="does not have a deterministic"):
            rt._alert_not_deterministic("roilib::prroi_pool_backward")
    finally:
        torch.use_deterministic_algorithms(False)
