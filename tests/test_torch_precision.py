"""roilib.torch with half-precision inputs, bfloat16 and torch.autocast (on the CPU).

Expected values come from the NumPy reference run in float32 on the same numbers.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import roilib.reference as ref  # noqa: E402
import roilib.torch as rt  # noqa: E402

SCALE = 1 / 16


def _map(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((2, 3, 80, 100), generator=g).to(dtype)


# Corners that float16 cannot hold: between 1024 and 2048 its spacing is 1 pixel.
BOXES = torch.tensor([[0, 1027.3, 301.7, 1490.6, 1100.2], [1, 13.25, 1200.4, 1555.5, 1270.9]], dtype=torch.float32)


def test_half_input_keeps_float32_boxes():
    x = _map(torch.float16)
    out = rt.roi_align(x, BOXES, 7, SCALE, sampling_ratio=2, aligned=True)
    exact = ref.roi_align(x.numpy(), BOXES.numpy(), 7, SCALE, sampling_ratio=2, aligned=True)
    rounded = ref.roi_align(x.numpy(), BOXES.half().float().numpy(), 7, SCALE, sampling_ratio=2, aligned=True)
    assert out.dtype == torch.float16
    np.testing.assert_array_equal(out.numpy(), exact)
    assert not np.array_equal(exact, rounded)  # the case does tell the two apart


def test_half_input_box_gradient_is_float32_exact():
    x = _map(torch.float16)
    boxes = BOXES.clone().requires_grad_(True)
    rt.roi_align(x, boxes, 7, SCALE, sampling_ratio=2, aligned=True).float().sum().backward()
    g = np.ones((2, 3, 7, 7), np.float16)
    expected = ref.roi_align_rois_backward(g, x.numpy(), BOXES.numpy(), 7, SCALE, sampling_ratio=2, aligned=True)
    assert boxes.grad.dtype == torch.float32
    np.testing.assert_allclose(boxes.grad.numpy(), expected.astype(np.float32), rtol=2e-3, atol=1e-3)


@pytest.mark.parametrize(
    "op, kw",
    [("roi_align", dict(sampling_ratio=2, aligned=True)), ("roi_pool", {}), ("roi_warp", {})],
    ids=["roi_align", "roi_pool", "roi_warp"],
)
def test_bfloat16_is_computed_in_float32(op, kw):
    x = _map(torch.bfloat16).requires_grad_(True)
    out = getattr(rt, op)(x, BOXES, 7, SCALE, **kw)
    x32 = x.detach().float().numpy()
    expected = getattr(ref, op)(x32, BOXES.numpy(), 7, SCALE, **kw)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.from_numpy(expected).to(torch.bfloat16))
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    out.backward(g)
    expected_grad = getattr(ref, op + "_backward")(g.float().numpy(), x32, BOXES.numpy(), 7, SCALE, **kw)
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.grad, torch.from_numpy(expected_grad).to(torch.bfloat16))


def test_bfloat16_spp():
    x = _map(torch.bfloat16)
    out = rt.spp(x, (2, 1))
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.from_numpy(ref.spp(x.float().numpy(), (2, 1))).to(torch.bfloat16))


def test_autocast_leaves_float32_input_in_float32():
    """torchvision's rule: compute in float32, return the input's dtype."""
    x = _map(torch.float32)
    plain = rt.roi_align(x, BOXES, 7, SCALE, 2, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = rt.roi_align(x, BOXES, 7, SCALE, 2, True)
    assert mixed.dtype == torch.float32
    assert torch.equal(mixed, plain)


def test_autocast_computes_half_input_in_float32_and_returns_its_dtype():
    x = _map(torch.bfloat16).requires_grad_(True)
    boxes = BOXES.to(torch.bfloat16)  # autocast casts boxes up too
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = rt.roi_pool(x, boxes, 7, SCALE)
    expected = ref.roi_pool(x.detach().float().numpy(), boxes.float().numpy(), 7, SCALE)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, torch.from_numpy(expected).to(torch.bfloat16))
    out.float().sum().backward()
    assert x.grad is not None and x.grad.dtype == torch.bfloat16


def test_autocast_inside_a_module():
    layer = rt.RoIAlign(7, SCALE, 2, aligned=True)
    x = _map(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x, BOXES)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, 7, 7)


def test_deterministic_backward_follows_torchs_flag(monkeypatch):
    monkeypatch.setattr(rt, "DETERMINISTIC", None)
    previous = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        assert rt._deterministic() is False
        torch.use_deterministic_algorithms(True)
        assert rt._deterministic() is True
        monkeypatch.setattr(rt, "DETERMINISTIC", False)
        assert rt._deterministic() is False
    finally:
        torch.use_deterministic_algorithms(previous)
