"""roilib.torch: the ops as torch ops (CPU here; CUDA in test_kernels_gpu.py)."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
import roilib  # noqa: E402
import roilib.torch as rt  # noqa: E402


def _problem(dtype=torch.float64, seed=0):
    rng = np.random.default_rng(seed)
    x = torch.tensor(rng.standard_normal((2, 3, 9, 11)), dtype=dtype)
    # boxes inside the map with generic (non-integer) corners: differentiable there
    lo = rng.uniform(0.3, 4.0, (4, 2))
    hi = lo + rng.uniform(2.2, 5.0, (4, 2))
    rois = torch.tensor(np.concatenate([[[0], [1], [0], [1]], lo, hi], axis=1) / [1, 0.5, 0.5, 0.5, 0.5], dtype=dtype)
    return x, rois


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("aligned", [False, True])
def test_roi_align_matches_the_reference(mode, aligned):
    x, rois = _problem()
    out = rt.roi_align(x, rois, (3, 2), 0.5, 2, aligned, mode)
    expected = roilib.roi_align(x.numpy(), rois.numpy(), (3, 2), 0.5, 2, aligned, mode)
    np.testing.assert_array_equal(out.numpy(), expected)


def test_other_ops_match_the_reference():
    x, rois = _problem()
    np.testing.assert_array_equal(rt.roi_pool(x, rois, 3, 0.5).numpy(), roilib.roi_pool(x.numpy(), rois.numpy(), 3, 0.5))
    np.testing.assert_array_equal(rt.roi_warp(x, rois, 3, 0.5).numpy(), roilib.roi_warp(x.numpy(), rois.numpy(), 3, 0.5))
    np.testing.assert_array_equal(rt.spp(x, (3, 1)).numpy(), roilib.spp(x.numpy(), (3, 1)))


@pytest.mark.parametrize("mode", ["avg", "max"])
@pytest.mark.parametrize("sampling_ratio", [-1, 2])
def test_roi_align_passes_gradcheck_in_input_and_boxes(mode, sampling_ratio):
    # per-image (K_i, 4) boxes, so that gradcheck perturbs coordinates, not batch indices
    x, rois = _problem()
    boxes = [rois[rois[:, 0] == i, 1:].clone().requires_grad_(True) for i in range(2)]
    x.requires_grad_(True)

    def f(inp, b0, b1):
        return rt.roi_align(inp, [b0, b1], (2, 3), 0.5, sampling_ratio, True, mode)

    assert torch.autograd.gradcheck(f, (x, *boxes), eps=1e-6, atol=1e-6)


def test_roi_pool_roi_warp_and_spp_pass_gradcheck():
    x, rois = _problem()
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda inp: rt.roi_pool(inp, rois, 3, 0.5), (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda inp: rt.roi_warp(inp, rois, 3, 0.5, 2), (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda inp: rt.spp(inp, (3, 2, 1), "max"), (x,), eps=1e-6, atol=1e-6)


def test_box_gradient_is_none_when_boxes_do_not_require_it():
    x, rois = _problem()
    x.requires_grad_(True)
    rt.roi_align(x, rois, 2, 0.5, 2).sum().backward()
    assert rois.grad is None and x.grad is not None


def test_list_of_boxes_equals_batch_index_format():
    x, rois = _problem()
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(2)]
    order = torch.cat([torch.nonzero(rois[:, 0] == i).flatten() for i in range(2)])
    np.testing.assert_array_equal(
        rt.roi_align(x, per_image, 2, 0.5, 2).numpy(), rt.roi_align(x, rois[order], 2, 0.5, 2).numpy()
    )


def test_modules_mirror_the_functions():
    x, rois = _problem(torch.float32)
    np.testing.assert_array_equal(rt.RoIAlign((2, 2), 0.5, 2, True)(x, rois).numpy(), rt.roi_align(x, rois, 2, 0.5, 2, True).numpy())
    np.testing.assert_array_equal(rt.RoIPool(2, 0.5)(x, rois).numpy(), rt.roi_pool(x, rois, 2, 0.5).numpy())
    np.testing.assert_array_equal(rt.RoIWarp(2, 0.5)(x, rois).numpy(), rt.roi_warp(x, rois, 2, 0.5).numpy())
    assert rt.SPP((2, 1))(x).shape == (2, 3 * 5)
    assert "sampling_ratio=2" in repr(rt.RoIAlign(7, 0.25, 2))


def test_bad_boxes_raise_a_clear_error():
    x, rois = _problem()
    with pytest.raises(ValueError, match=r"rois must have shape \(K, 5\)"):
        rt.roi_align(x, rois[:, 1:], 2)
    with pytest.raises(ValueError, match=r"boxes\[0\] must be a tensor of shape"):
        rt.roi_align(x, [rois], 2)


def test_ops_work_under_torch_compile():
    x, rois = _problem(torch.float32)
    x.requires_grad_(True)

    def head(inp, boxes):
        return (rt.roi_align(inp, boxes, 2, 0.5, 2, True) * 2).sum() + rt.roi_pool(inp, boxes, 2, 0.5).sum()

    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")
    loss = compiled(x, rois)
    (grad,) = torch.autograd.grad(loss, x)
    x2 = x.detach().clone().requires_grad_(True)
    expected = head(x2, rois)
    (expected_grad,) = torch.autograd.grad(expected, x2)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(grad, expected_grad)


def test_custom_ops_pass_torch_library_opcheck():
    x, rois = _problem()
    torch.library.opcheck(torch.ops.roilib.roi_align.default, (x, rois, [2, 2], 0.5, 2, True, "avg"))
    torch.library.opcheck(torch.ops.roilib.roi_pool.default, (x, rois, [2, 2], 0.5))
    x.requires_grad_(True)
    torch.library.opcheck(torch.ops.roilib.roi_pool_with_argmax.default, (x, rois, [2, 2], 0.5))


def test_roi_pool_backward_reuses_the_argmax_of_its_forward(monkeypatch):
    import importlib

    module = importlib.import_module("roilib.reference.roi_pool")
    calls = []
    search = module._pool
    monkeypatch.setattr(module, "_pool", lambda *a, **k: calls.append(1) or search(*a, **k))
    x, rois = _problem()
    x.requires_grad_(True)
    out = rt.roi_pool(x, rois, 3, 0.5)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(1))
    out.backward(g)
    assert len(calls) == 1  # the forward's search for the maxima, never repeated
    monkeypatch.setattr(module, "_pool", search)
    expected = roilib.roi_pool_backward(g.numpy(), x.detach().numpy(), rois.numpy(), 3, 0.5)
    np.testing.assert_array_equal(x.grad.numpy(), expected)


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated")
def test_a_traced_roi_pool_records_the_one_output_op():
    x, rois = _problem()
    graph = torch.jit.trace(lambda inp: rt.roi_pool(inp, rois, 3, 0.5), x.clone().requires_grad_(True)).graph
    kinds = {node.kind() for node in graph.nodes()}
    assert "roilib::roi_pool" in kinds and "roilib::roi_pool_with_argmax" not in kinds


def test_roi_pool_bfloat16_gradient_matches_float32_of_the_same_values():
    x, rois = _problem(torch.float32)
    x16 = x.to(torch.bfloat16).requires_grad_(True)
    out = rt.roi_pool(x16, rois, 3, 0.5)
    g = torch.ones_like(out)
    out.backward(g)
    expected = roilib.roi_pool_backward(g.float().numpy(), x16.detach().float().numpy(), rois.numpy(), 3, 0.5)
    assert x16.grad.dtype == torch.bfloat16
    np.testing.assert_array_equal(x16.grad.float().numpy(), expected.astype(np.float32))


def test_roi_warp_box_gradient_flows_when_boxes_require_it():
    x, rois = _problem()
    rois = rois.clone().requires_grad_(True)
    out = rt.roi_warp(x, rois, 3, 0.5)
    g = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(0))
    (out * g).sum().backward()
    expected = roilib.roi_warp_rois_backward(g.numpy(), x.numpy(), rois.detach().numpy(), 3, 0.5)
    np.testing.assert_array_equal(rois.grad.numpy(), expected)
    assert (rois.grad[:, 0] == 0).all() and rois.grad.abs().sum() > 0
