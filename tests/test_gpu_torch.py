"""roilib.torch on CUDA: the rules of the GPU path, checked where they can fail.

Skipped without a CUDA GPU, CuPy and torch. Every op and dtype against the NumPy
reference (and torchvision's CUDA ops when torchvision is importable), bitwise
determinism, gradcheck, a non-default stream, autocast, a second GPU, torch.compile
with inductor, and a forward + backward captured in a CUDA graph (which fails on any
host synchronisation or on allocations outside torch's allocator).
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
cp = pytest.importorskip("cupy", reason="needs CuPy")
if not torch.cuda.is_available():
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

import roilib.reference as ref  # noqa: E402
import roilib.torch as rt  # noqa: E402

pytestmark = pytest.mark.gpu

DEV = torch.device("cuda", 0)
SCALE = 0.25
OPS = [
    ("roi_align", dict(sampling_ratio=2, aligned=True)),
    ("roi_align", dict(sampling_ratio=-1, aligned=False, mode="max")),
    ("roi_pool", {}),
    ("roi_warp", {}),
]
TOL = {torch.float16: 2e-2, torch.bfloat16: 6e-2, torch.float32: 2e-5, torch.float64: 1e-11}


def _id(op_kw):
    op, kw = op_kw
    return op + "".join(f"-{k}={v}" for k, v in kw.items())


def _case(dtype=torch.float32, device=DEV, n_boxes=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((2, 8, 40, 52), generator=g, dtype=torch.float64)
    xy = torch.rand((n_boxes, 2), generator=g, dtype=torch.float64) * torch.tensor([200.0, 150.0])
    wh = torch.rand((n_boxes, 2), generator=g, dtype=torch.float64) * 80 + 1
    b = torch.randint(0, 2, (n_boxes, 1), generator=g).double()
    boxes = torch.cat([b, xy, xy + wh], 1)
    return x.to(device=device, dtype=dtype), boxes.to(device=device, dtype=torch.float32)


def _reference(op, x, boxes, g, kw):
    xn = x.detach().cpu().float().numpy() if x.dtype != torch.float64 else x.detach().cpu().numpy()
    bn = boxes.detach().cpu().numpy().astype(xn.dtype)
    out = getattr(ref, op)(xn, bn, 7, SCALE, **kw)
    gn = g.detach().cpu().to(torch.float64 if x.dtype == torch.float64 else torch.float32).numpy()
    return out, getattr(ref, op + "_backward")(gn, xn, bn, 7, SCALE, **kw)


def _close(actual, expected, dtype):
    a = actual.detach().cpu().double().numpy()
    scale = max(1.0, float(np.abs(expected).max(initial=0)))
    assert np.abs(a - expected).max(initial=0) <= TOL[dtype] * scale


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("op_kw", OPS, ids=_id)
def test_every_op_and_dtype_matches_the_reference(op_kw, dtype):
    op, kw = op_kw
    x, boxes = _case(dtype)
    x.requires_grad_(True)
    out = getattr(rt, op)(x, boxes, 7, SCALE, **kw)
    assert out.device == DEV and out.dtype == dtype
    g = torch.randn(out.shape, device=DEV, generator=torch.Generator(DEV).manual_seed(1)).to(dtype)
    out.backward(g)
    expected, expected_grad = _reference(op, x, boxes, g, kw)
    _close(out, expected, dtype)
    _close(x.grad, expected_grad, dtype)


def test_spp_matches_the_reference():
    x, _ = _case(torch.float64)
    x.requires_grad_(True)
    out = rt.spp(x, (4, 2, 1), "max")
    out.backward(torch.ones_like(out))
    np.testing.assert_allclose(out.detach().cpu().numpy(), ref.spp(x.detach().cpu().numpy(), (4, 2, 1)))
    expected = ref.spp_backward(np.ones(out.shape), x.detach().cpu().numpy(), (4, 2, 1))
    np.testing.assert_allclose(x.grad.cpu().numpy(), expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64], ids=str)
def test_matches_torchvision_cuda_ops(dtype):
    tv = pytest.importorskip("torchvision.ops")
    x, boxes = _case(dtype)
    boxes = boxes.to(dtype)  # torchvision wants boxes in the input's dtype
    tol = dict(atol=TOL[dtype], rtol=TOL[dtype])
    for aligned in (False, True):
        for sr in (-1, 2):
            xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
            ours = rt.roi_align(xa, boxes, 7, SCALE, sr, aligned)
            theirs = tv.roi_align(xb, boxes, 7, SCALE, sr, aligned)
            assert torch.allclose(ours.double(), theirs.double(), **tol)
            g = torch.randn_like(ours)
            ours.backward(g)
            theirs.backward(g)
            assert torch.allclose(xa.grad.double(), xb.grad.double(), **tol)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ours, theirs = rt.roi_pool(xa, boxes, 7, SCALE), tv.roi_pool(xb, boxes, 7, SCALE)
    assert torch.equal(ours, theirs)
    g = torch.randn_like(ours)
    ours.backward(g)
    theirs.backward(g)
    assert torch.allclose(xa.grad.double(), xb.grad.double(), **tol)


@pytest.mark.parametrize("op_kw", OPS, ids=_id)
def test_deterministic_backward_is_bitwise_repeatable(op_kw, monkeypatch):
    op, kw = op_kw
    monkeypatch.setattr(rt, "DETERMINISTIC", True)
    x, boxes = _case(torch.float32, n_boxes=400)
    grads = []
    for _ in range(3):
        xi = x.clone().requires_grad_(True)
        getattr(rt, op)(xi, boxes, 7, SCALE, **kw).sum().backward()
        grads.append(xi.grad)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[1], grads[2])


@pytest.mark.parametrize("mode", ["avg", "max"])
def test_gradcheck_on_cuda(mode):
    from test_torch_bridge import _problem  # boxes inside the map at generic corners

    x, rois = _problem()
    x = x.to(DEV).requires_grad_(True)
    rois = rois.to(DEV)
    boxes = [rois[rois[:, 0] == i, 1:].clone().requires_grad_(True) for i in range(2)]

    def align(inp, b0, b1):
        return rt.roi_align(inp, [b0, b1], (2, 3), 0.5, 2, True, mode)

    assert torch.autograd.gradcheck(align, (x, *boxes), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda inp: rt.roi_pool(inp, rois, 3, 0.5), (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda inp: rt.roi_warp(inp, rois, 3, 0.5, 2, mode), (x,), eps=1e-6, atol=1e-6)
    assert torch.autograd.gradcheck(lambda inp: rt.spp(inp, (3, 2, 1), mode), (x,), eps=1e-6, atol=1e-6)


def test_runs_on_the_callers_stream():
    """The input is written on a side stream after a long sleep; launched elsewhere, the
    op would read it before it is ready."""
    x, boxes = _case(torch.float32)
    expected = rt.roi_align(x, boxes, 7, SCALE, 2, True)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(50_000_000)
        late = x * 1
        out = rt.roi_align(late, boxes, 7, SCALE, 2, True)
    side.synchronize()
    assert torch.equal(out, expected)


def test_outputs_come_from_torchs_allocator_not_cupys_pool():
    x, boxes = _case(torch.float32)
    pool = cp.get_default_memory_pool()
    before_cupy = pool.total_bytes()
    before = torch.cuda.memory_allocated(DEV)
    out = rt.roi_align(x, boxes, 7, SCALE, 2, True)
    assert torch.cuda.memory_allocated(DEV) - before >= out.numel() * out.element_size()
    x.requires_grad_(True)
    rt.roi_align(x, boxes, 7, SCALE, 2, True).sum().backward()
    assert pool.total_bytes() == before_cupy


def test_no_host_synchronisation():
    x, boxes = _case(torch.float32)
    x.requires_grad_(True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = rt.roi_align(x, boxes, 7, SCALE, 2, True)
        out.sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_autocast_computes_in_float32_and_returns_the_input_dtype():
    x, boxes = _case(torch.float32)
    with torch.autocast("cuda", dtype=torch.float16):
        same = rt.roi_align(x, boxes, 7, SCALE, 2, True)
        half = rt.roi_align(x.half(), boxes.half(), 7, SCALE, 2, True)
    assert same.dtype == torch.float32 and torch.equal(same, rt.roi_align(x, boxes, 7, SCALE, 2, True))
    expected = rt.roi_align(x.half().float(), boxes.half().float(), 7, SCALE, 2, True).half()
    assert half.dtype == torch.float16 and torch.equal(half, expected)


def test_a_second_gpu_is_used_for_its_own_tensors():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    dev1 = torch.device("cuda", 1)
    x, boxes = _case(torch.float32, device=dev1)
    x.requires_grad_(True)
    torch.cuda.set_device(0)
    with cp.cuda.Device(0):
        pool0 = cp.get_default_memory_pool().total_bytes()
    out = rt.roi_align(x, boxes, 7, SCALE, 2, True)
    out.sum().backward()
    assert out.device == dev1 and x.grad.device == dev1
    expected, _ = _reference("roi_align", x, boxes, torch.ones_like(out), dict(sampling_ratio=2, aligned=True))
    _close(out, expected, torch.float32)
    with cp.cuda.Device(0):
        assert cp.get_default_memory_pool().total_bytes() == pool0


def test_torch_compile_inductor_on_cuda():
    x, boxes = _case(torch.float32)

    def f(a, b):
        return rt.roi_align(a.relu(), b, 7, SCALE, 2, True).mean(dim=(2, 3))

    compiled = torch.compile(f, backend="inductor", fullgraph=True)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    f(xa, boxes).sum().backward()
    compiled(xb, boxes).sum().backward()
    assert torch.allclose(xa.grad, xb.grad, atol=1e-6)


def test_forward_and_backward_capture_in_a_cuda_graph(monkeypatch):
    monkeypatch.setattr(rt, "DETERMINISTIC", True)
    x, boxes = _case(torch.float32)
    static_x, static_boxes = x.clone(), boxes.clone()
    static_g = torch.randn((boxes.shape[0], x.shape[1], 7, 7), device=DEV)

    def step():
        out = torch.ops.roilib.roi_align(static_x, static_boxes, [7, 7], SCALE, 2, True, "avg")
        grad = torch.ops.roilib.roi_align_backward(static_g, static_x, static_boxes, [7, 7], SCALE, 2, True, "avg")
        return out, grad

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up: compiles the kernels, fills the allocator's pools
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, grad = step()
    new_x, new_boxes = _case(torch.float32, seed=5)
    static_x.copy_(new_x)
    static_boxes.copy_(new_boxes)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, rt.roi_align(new_x, new_boxes, 7, SCALE, 2, True))
    eager = torch.ops.roilib.roi_align_backward(static_g, new_x, new_boxes, [7, 7], SCALE, 2, True, "avg")
    assert torch.equal(grad, eager)
