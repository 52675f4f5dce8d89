"""Kernels of roi_align_rotated and prroi_pool against the NumPy reference.

The CPU build (roilib.cuda.cpu) runs everywhere a C++ compiler exists; the same cases
run on a GPU (roilib.cuda.gpu) when CuPy and a device are present, and there the GPU
must also match the CPU build of the same kernel text.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

import roilib.reference as ref

if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip("no C++ compiler to build the kernels for the CPU", allow_module_level=True)

from roilib.cuda import cpu  # noqa: E402
from test_kernels_cpu import assert_close, run_sanitized  # noqa: E402


def _gpu():
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:
        return None
    from roilib.cuda import gpu

    return gpu


GPU = _gpu()
BACKENDS = [pytest.param("cpu", id="cpu"), pytest.param("gpu", id="gpu", marks=pytest.mark.gpu)]
FLOATS = (np.float16, np.float32, np.float64)
GEOMETRIES = [((3, 4), 1.0), ((2, 2), 0.5), (7, 1 / 16), ((5, 3), 0.7)]


def _backend(name):
    if name == "gpu" and GPU is None:
        pytest.skip("needs CuPy and a CUDA GPU")
    return cpu if name == "cpu" else GPU


def _to(name, *arrays):
    if name == "cpu":
        return arrays
    import cupy

    return tuple(cupy.asarray(a) for a in arrays)


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else a


def rotated_case(dtype, spatial_scale=1.0, seed=0, shape=(2, 3, 11, 13)):
    """A map and rotated boxes: inside, across the border, outside, tiny, zero-size, huge."""
    rng = np.random.default_rng(seed)
    h, w = shape[2:]
    fixed = [
        [0, 5.0, 5.0, 6.0, 4.0, 0.0],
        [1, 6.5, 5.5, 4.0, 7.0, 90.0],
        [0, 6.0, 5.0, 5.0, 3.0, 180.0],
        [1, 0.0, 0.0, 6.0, 6.0, 45.0],  # across the top-left corner
        [0, w + 5.0, 3.0, 2.0, 2.0, 10.0],  # outside
        [1, 4.0, 4.0, 0.2, 0.1, -30.0],  # tiny
        [0, 5.0, 3.0, 0.0, 0.0, 60.0],  # zero size
        [1, w / 2, h / 2, 80.0, 60.0, 33.0],  # huge
        [0, w - 1.0, h - 1.0, 2.0, 2.0, -135.0],  # last pixels
    ]
    n = 12
    rand = np.stack(
        [
            rng.integers(0, shape[0], n),
            rng.uniform(-2, w + 2, n),
            rng.uniform(-2, h + 2, n),
            rng.uniform(0, w, n),
            rng.uniform(0, h, n),
            rng.uniform(-360, 360, n),
        ],
        axis=1,
    )
    rois = np.concatenate([np.array(fixed), rand])
    rois[:, 1:5] /= spatial_scale
    return rng.standard_normal(shape).astype(dtype), rois


def prroi_case(dtype, spatial_scale=1.0, seed=0, shape=(2, 3, 11, 13)):
    """A map and boxes: inside, in the ramp outside, outside, degenerate, inverted, huge."""
    rng = np.random.default_rng(seed)
    h, w = shape[2:]
    fixed = [
        [0, 1.3, 2.2, 8.7, 9.1],
        [1, -1.5, -0.5, 3.0, 2.0],  # in the ramp outside the top-left
        [0, w + 2.0, 1.0, w + 6.0, 5.0],  # beyond the ramp
        [1, 4.0, 4.0, 4.0, 7.0],  # zero width
        [0, 6.0, 7.0, 2.0, 1.0],  # inverted
        [1, -60.0, -40.0, 300.0, 200.0],  # huge
        [0, 3.0, 2.0, 7.0, 6.0],  # integer corners
        [1, w - 1.5, h - 1.5, w + 0.5, h + 0.5],  # across the bottom-right
    ]
    n = 12
    x1, y1 = rng.uniform(-3, w + 1, n), rng.uniform(-3, h + 1, n)
    rand = np.stack([rng.integers(0, shape[0], n), x1, y1, x1 + rng.uniform(0, w, n), y1 + rng.uniform(0, h, n)], axis=1)
    rois = np.concatenate([np.array(fixed), rand])
    rois[:, 1:] /= spatial_scale
    return rng.standard_normal(shape).astype(dtype), rois


def _grad(shape, dtype, seed=1):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def _expected(fn, *args, dtype, **kw):
    """The reference, in float32 for float16 inputs (the kernels compute in float32)."""
    if dtype == np.float16:
        args = tuple(a.astype(np.float32) if isinstance(a, np.ndarray) and a.dtype == np.float16 else a for a in args)
    return fn(*args, **kw)


# -- rotated RoIAlign -------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("kw", [dict(sampling_ratio=-1, aligned=True), dict(sampling_ratio=2, aligned=False)], ids=str)
def test_roi_align_rotated_matches_reference(backend, dtype, geometry, kw):
    ops = _backend(backend)
    output_size, scale = geometry
    x, rois = rotated_case(dtype, scale)
    xd, rd = _to(backend, x, rois)
    out = _host(ops.roi_align_rotated(xd, rd, output_size, scale, **kw))
    assert out.dtype == dtype
    assert_close(out, _expected(ref.roi_align_rotated, x, rois, output_size, scale, dtype=dtype, **kw), dtype)
    g = _grad(out.shape, dtype)
    (gd,) = _to(backend, g)
    grad = _host(ops.roi_align_rotated_backward(gd, xd, rd, output_size, scale, deterministic=False, **kw))
    assert grad.dtype == dtype
    expected = _expected(ref.roi_align_rotated_backward, g, x, rois, output_size, scale, dtype=dtype, **kw)
    assert_close(grad, expected, dtype, scale=4)
    box = _host(ops.roi_align_rotated_rois_backward(gd, xd, rd, output_size, scale, **kw))
    assert box.dtype == dtype and box.shape == (len(rois), 6)
    expected = _expected(ref.roi_align_rotated_rois_backward, g, x, rois, output_size, scale, dtype=dtype, **kw)
    assert_close(box, expected, dtype, scale=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_roi_align_rotated_backward_has_no_deterministic_kernel(backend):
    ops = _backend(backend)
    x, rois = rotated_case(np.float32)
    xd, rd, gd = _to(backend, x, rois, np.zeros((len(rois), 3, 2, 2), np.float32))
    with pytest.raises(NotImplementedError, match="roi_align_rotated_backward has no deterministic kernel"):
        ops.roi_align_rotated_backward(gd, xd, rd, 2, deterministic=True)


# -- Precise RoI Pooling ----------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
def test_prroi_pool_matches_reference(backend, dtype, geometry):
    ops = _backend(backend)
    output_size, scale = geometry
    x, rois = prroi_case(dtype, scale)
    xd, rd = _to(backend, x, rois)
    out = _host(ops.prroi_pool(xd, rd, output_size, scale))
    assert out.dtype == dtype
    assert_close(out, _expected(ref.prroi_pool, x, rois, output_size, scale, dtype=dtype), dtype)
    g = _grad(out.shape, dtype)
    (gd,) = _to(backend, g)
    grad = _host(ops.prroi_pool_backward(gd, xd, rd, output_size, scale, deterministic=False))
    assert_close(grad, _expected(ref.prroi_pool_backward, g, x, rois, output_size, scale, dtype=dtype), dtype, scale=4)
    box = _host(ops.prroi_pool_rois_backward(gd, xd, rd, output_size, scale))
    expected = _expected(ref.prroi_pool_rois_backward, g, x, rois, output_size, scale, dtype=dtype)
    assert_close(box, expected, dtype, scale=10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prroi_pool_backward_has_no_deterministic_kernel(backend):
    ops = _backend(backend)
    x, rois = prroi_case(np.float32)
    xd, rd, gd = _to(backend, x, rois, np.zeros((len(rois), 3, 2, 2), np.float32))
    with pytest.raises(NotImplementedError, match="prroi_pool_backward has no deterministic kernel"):
        ops.prroi_pool_backward(gd, xd, rd, 2, deterministic=True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prroi_pool_box_gradient_is_bitwise_repeatable(backend):
    ops = _backend(backend)
    x, rois = prroi_case(np.float32)
    g = _grad((len(rois), 3, 3, 3), np.float32)
    xd, rd, gd = _to(backend, x, rois, g)
    first = _host(ops.prroi_pool_rois_backward(gd, xd, rd, 3))
    np.testing.assert_array_equal(first, _host(ops.prroi_pool_rois_backward(gd, xd, rd, 3)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_boxes(backend):
    ops = _backend(backend)
    x = np.zeros((1, 2, 5, 5), np.float32)
    xd, r6, r5 = _to(backend, x, np.zeros((0, 6)), np.zeros((0, 5)))
    assert ops.roi_align_rotated(xd, r6, (3, 2)).shape == (0, 2, 3, 2)
    assert ops.prroi_pool(xd, r5, (3, 2)).shape == (0, 2, 3, 2)
    gd = _to(backend, np.zeros((0, 2, 3, 2), np.float32))[0]
    assert _host(ops.prroi_pool_rois_backward(gd, xd, r5, (3, 2))).shape == (0, 5)
    assert not _host(ops.prroi_pool_backward(gd, xd, r5, (3, 2))).any()


def test_gpu_forward_and_box_gradient_equal_the_cpu_build_bitwise():
    if GPU is None:
        pytest.skip("needs CuPy and a CUDA GPU")
    for dtype in (np.float32, np.float64):
        x, rois = rotated_case(dtype, 0.5)
        xd, rd = _to("gpu", x, rois)
        np.testing.assert_array_equal(
            _host(GPU.roi_align_rotated(xd, rd, 3, 0.5, 2)), cpu.roi_align_rotated(x, rois, 3, 0.5, 2)
        )
        g = _grad((len(rois), 3, 3, 3), dtype)
        (gd,) = _to("gpu", g)
        np.testing.assert_array_equal(
            _host(GPU.roi_align_rotated_rois_backward(gd, xd, rd, 3, 0.5, 2)),
            cpu.roi_align_rotated_rois_backward(g, x, rois, 3, 0.5, 2),
        )
        x, rois = prroi_case(dtype, 0.5)
        g = _grad((len(rois), 3, 3, 3), dtype)
        xd, rd, gd = _to("gpu", x, rois, g)
        np.testing.assert_array_equal(_host(GPU.prroi_pool(xd, rd, 3, 0.5)), cpu.prroi_pool(x, rois, 3, 0.5))
        np.testing.assert_array_equal(
            _host(GPU.prroi_pool_rois_backward(gd, xd, rd, 3, 0.5)), cpu.prroi_pool_rois_backward(g, x, rois, 3, 0.5)
        )


SANITIZED_SCRIPT = """
import numpy as np
from roilib.cuda import cpu
from test_kernels_rotated_prroi import rotated_case, prroi_case, _grad

assert cpu._ops.sanitize
for dtype in (np.float16, np.float32, np.float64):
    x, rois = rotated_case(dtype, 0.5)
    for aligned in (True, False):
        out = cpu.roi_align_rotated(x, rois, (3, 4), 0.5, -1, aligned)
        cpu.roi_align_rotated_backward(_grad(out.shape, dtype), x, rois, (3, 4), 0.5, -1, aligned)
        cpu.roi_align_rotated_rois_backward(_grad(out.shape, dtype), x, rois, (3, 4), 0.5, -1, aligned)
    x, rois = prroi_case(dtype, 0.5)
    out = cpu.prroi_pool(x, rois, (3, 4), 0.5)
    g = _grad(out.shape, dtype)
    cpu.prroi_pool_backward(g, x, rois, (3, 4), 0.5)
    cpu.prroi_pool_rois_backward(g, x, rois, (3, 4), 0.5)
print("sanitized run ok")
"""


def test_kernels_under_address_and_undefined_behaviour_sanitizers():
    run_sanitized(SANITIZED_SCRIPT)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prroi_pool_bins_wider_than_the_column_cache_match_reference(backend):
    # a bin over more than 32 columns recomputes its column weights per row
    ops = _backend(backend)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((1, 2, 6, 80))
    rois = np.array([[0, 1.5, 0.5, 75.2, 4.7], [0, 10.3, 1.0, 40.1, 3.0]])
    g = rng.standard_normal((2, 2, 2, 1))
    xd, rd, gd = _to(backend, x, rois, g)
    assert_close(_host(ops.prroi_pool(xd, rd, (2, 1))), ref.prroi_pool(x, rois, (2, 1)), np.float64)
    assert_close(
        _host(ops.prroi_pool_backward(gd, xd, rd, (2, 1))), ref.prroi_pool_backward(g, x, rois, (2, 1)), np.float64
    )
    assert_close(
        _host(ops.prroi_pool_rois_backward(gd, xd, rd, (2, 1))),
        ref.prroi_pool_rois_backward(g, x, rois, (2, 1)),
        np.float64,
    )


def _torch_cuda():
    if GPU is None:
        pytest.skip("needs CuPy and a CUDA GPU")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA build of torch")
    import roilib.torch as rt

    return torch, rt


@pytest.mark.gpu
def test_torch_bridge_on_cuda_matches_the_reference_in_both_gradients():
    torch, rt = _torch_cuda()
    x, rois = prroi_case(np.float64)
    xt = torch.tensor(x, device="cuda", requires_grad=True)
    rt_rois = torch.tensor(rois, device="cuda", requires_grad=True)
    out = rt.prroi_pool(xt, rt_rois, 3, 1.0)
    g = _grad(tuple(out.shape), np.float64)
    out.backward(torch.tensor(g, device="cuda"))
    assert_close(out.detach().cpu().numpy(), ref.prroi_pool(x, rois, 3), np.float64)
    assert_close(xt.grad.cpu().numpy(), ref.prroi_pool_backward(g, x, rois, 3), np.float64, scale=4)
    assert_close(rt_rois.grad.cpu().numpy(), ref.prroi_pool_rois_backward(g, x, rois, 3), np.float64, scale=10)
    x, rois = rotated_case(np.float64)
    xt = torch.tensor(x, device="cuda", requires_grad=True)
    rt_rois = torch.tensor(rois, device="cuda", requires_grad=True)
    out = rt.roi_align_rotated(xt, rt_rois, 3, 1.0, 2)
    g = _grad(tuple(out.shape), np.float64)
    out.backward(torch.tensor(g, device="cuda"))
    assert_close(out.detach().cpu().numpy(), ref.roi_align_rotated(x, rois, 3, 1.0, 2), np.float64)
    assert_close(xt.grad.cpu().numpy(), ref.roi_align_rotated_backward(g, x, rois, 3, 1.0, 2), np.float64, scale=4)
    expected = ref.roi_align_rotated_rois_backward(g, x, rois, 3, 1.0, 2)
    assert_close(rt_rois.grad.cpu().numpy(), expected, np.float64, scale=10)


@pytest.mark.gpu
def test_torch_bridge_on_cuda_refuses_atomics_under_deterministic_algorithms():
    torch, rt = _torch_cuda()
    x, rois = rotated_case(np.float32)
    xt = torch.tensor(x, device="cuda", requires_grad=True)
    out = rt.roi_align_rotated(xt, torch.tensor(rois, device="cuda"), 2, 1.0, 2)
    torch.use_deterministic_algorithms(True)
    try:
        with pytest.raises(RuntimeError, match="roi_align_rotated_backward does not have a deterministic"):
            out.sum().backward()
    finally:
        torch.use_deterministic_algorithms(False)
