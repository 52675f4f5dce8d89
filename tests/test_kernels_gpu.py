"""The kernels on a GPU (roilib.cuda.gpu) against the NumPy reference and the CPU build.

Skipped without CuPy or a CUDA device. Uses the cases of test_kernels_cpu.py. Besides
matching the reference, the GPU must agree bit for bit with the CPU build of the same
kernel text wherever the order of floating-point operations is fixed (forward passes,
deterministic backward, box gradients): both compile without FMA contraction or fast
math, so the book's CPU fallback shows exactly what a GPU computes.
"""
from __future__ import annotations

import numpy as np
import pytest

import roilib.reference as ref
from test_kernels_cpu import (  # same directory; pytest puts it on sys.path
    ALIGN_VARIANTS,
    WARP_VARIANTS,
    BOX_OPS,
    FLOATS,
    GEOMETRIES,
    _id,
    assert_close,
    grad_like,
    make_case,
)

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy", reason="needs CuPy")
try:
    if cp.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("no device")
except Exception as e:  # no driver, no device
    pytest.skip(f"needs a CUDA GPU: {e}", allow_module_level=True)

from roilib.cuda import cpu, gpu  # noqa: E402


def on_gpu(*arrays):
    return [cp.asarray(a) for a in arrays]


def same_bits(gpu_array, cpu_array):
    host = cp.asnumpy(gpu_array)
    assert host.dtype == cpu_array.dtype and host.shape == cpu_array.shape
    assert host.tobytes() == cpu_array.tobytes(), f"max difference {np.abs(host - cpu_array).max()}"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_box_op_matches_reference_and_cpu_build(op_kw, geometry, dtype):
    op, kw = op_kw
    output_size, scale = geometry
    x, rois = make_case(dtype, spatial_scale=scale)
    xd, rd = on_gpu(x, rois)
    out = getattr(gpu, op)(xd, rd, output_size, scale, **kw)
    assert isinstance(out, cp.ndarray)
    expected = getattr(ref, op)(x, rois, output_size, scale, **kw)
    assert_close(cp.asnumpy(out), expected, dtype)
    same_bits(out, getattr(cpu, op)(x, rois, output_size, scale, **kw))

    g = grad_like(expected)
    (gd,) = on_gpu(g)
    expected_grad = getattr(ref, op + "_backward")(g, x, rois, output_size, scale, **kw)
    for deterministic in (True, False):
        grad = getattr(gpu, op + "_backward")(gd, xd, rd, output_size, scale, deterministic=deterministic, **kw)
        assert_close(cp.asnumpy(grad), expected_grad, dtype)
    same_bits(
        getattr(gpu, op + "_backward")(gd, xd, rd, output_size, scale, **kw),
        getattr(cpu, op + "_backward")(g, x, rois, output_size, scale, **kw),
    )


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kw", ALIGN_VARIANTS, ids=str)
def test_roi_align_box_gradient(kw, dtype):
    x, rois = make_case(dtype, seed=3, spatial_scale=0.5)
    g = grad_like(ref.roi_align(x, rois, (3, 4), 0.5, **kw))
    got = gpu.roi_align_rois_backward(*on_gpu(g, x, rois), (3, 4), 0.5, **kw)
    assert_close(cp.asnumpy(got), ref.roi_align_rois_backward(g, x, rois, (3, 4), 0.5, **kw), dtype, scale=10)
    same_bits(got, cpu.roi_align_rois_backward(g, x, rois, (3, 4), 0.5, **kw))


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("kw", WARP_VARIANTS, ids=str)
def test_roi_warp_box_gradient(kw, dtype):
    x, rois = make_case(dtype, seed=3, spatial_scale=0.5)
    g = grad_like(ref.roi_warp(x, rois, (3, 4), 0.5, **kw))
    got = gpu.roi_warp_rois_backward(*on_gpu(g, x, rois), (3, 4), 0.5, **kw)
    assert_close(cp.asnumpy(got), ref.roi_warp_rois_backward(g, x, rois, (3, 4), 0.5, **kw), dtype, scale=10)
    same_bits(got, cpu.roi_warp_rois_backward(g, x, rois, (3, 4), 0.5, **kw))


@pytest.mark.parametrize("dtype", (np.float16,) + FLOATS)
@pytest.mark.parametrize("mode", ["max", "avg"])
def test_spp(mode, dtype):
    x, _ = make_case(dtype)
    (xd,) = on_gpu(x)
    out = gpu.spp(xd, (4, 2, 1), mode)
    same_bits(out, cpu.spp(x, (4, 2, 1), mode))
    g = grad_like(cp.asnumpy(out))
    (gd,) = on_gpu(g)
    x32, g32 = x.astype(np.float32 if dtype == np.float16 else dtype), g.astype(np.float32 if dtype == np.float16 else dtype)
    expected = ref.spp_backward(g32, x32, (4, 2, 1), mode)
    for deterministic in (True, False):
        assert_close(cp.asnumpy(gpu.spp_backward(gd, xd, (4, 2, 1), mode, deterministic=deterministic)), expected, dtype)
    same_bits(gpu.spp_backward(gd, xd, (4, 2, 1), mode), cpu.spp_backward(g, x, (4, 2, 1), mode))


@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_float16(op_kw):
    op, kw = op_kw
    x, rois = make_case(np.float16, seed=7, spatial_scale=0.5)
    xd, rd = on_gpu(x, rois)
    out = getattr(gpu, op)(xd, rd, (3, 4), 0.5, **kw)
    assert out.dtype == np.float16
    assert_close(cp.asnumpy(out), getattr(ref, op)(x.astype(np.float32), rois, (3, 4), 0.5, **kw), np.float16)
    same_bits(out, getattr(cpu, op)(x, rois, (3, 4), 0.5, **kw))
    g = grad_like(cp.asnumpy(out))
    grad = getattr(gpu, op + "_backward")(cp.asarray(g), xd, rd, (3, 4), 0.5, **kw)
    assert grad.dtype == np.float16
    same_bits(grad, getattr(cpu, op + "_backward")(g, x, rois, (3, 4), 0.5, **kw))


@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_deterministic_backward_is_bitwise_repeatable(op_kw):
    """Many overlapping boxes on a small map, so atomics would race; the gather must not."""
    op, kw = op_kw
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 16, 20, 20)).astype(np.float32)
    x1, y1 = rng.uniform(0, 8, (2, 400))
    rois = np.stack([rng.integers(0, 2, 400), x1, y1, x1 + rng.uniform(4, 12, 400), y1 + rng.uniform(4, 12, 400)], 1)
    xd, rd = on_gpu(x, rois)
    g = cp.asarray(grad_like(np.zeros((400, 16, 7, 7), np.float32)))
    backward = getattr(gpu, op + "_backward")
    runs = [cp.asnumpy(backward(g, xd, rd, 7, 1.0, deterministic=True, **kw)).tobytes() for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    atomic = cp.asnumpy(backward(g, xd, rd, 7, 1.0, deterministic=False, **kw))
    assert_close(atomic, np.frombuffer(runs[0], np.float32).reshape(x.shape), np.float32, scale=10)


def test_runs_on_the_current_stream():
    x, rois = make_case(np.float32)
    xd, rd = on_gpu(x, rois)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        out = gpu.roi_align(xd, rd, 7, 0.5, sampling_ratio=2)
    stream.synchronize()
    same_bits(out, cpu.roi_align(x, rois, 7, 0.5, sampling_ratio=2))


@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_no_rois(op_kw):
    op, kw = op_kw
    x, _ = make_case(np.float32)
    xd = cp.asarray(x)
    rd = cp.zeros((0, 5), dtype=np.float32)
    out = getattr(gpu, op)(xd, rd, (3, 4), 1.0, **kw)
    assert out.shape == (0, 3, 3, 4)
    grad = getattr(gpu, op + "_backward")(out, xd, rd, (3, 4), 1.0, **kw)
    assert grad.shape == x.shape and not grad.any()


def test_numpy_input_is_rejected():
    x, rois = make_case(np.float32)
    with pytest.raises(TypeError, match="cupy"):
        gpu.roi_align(x, rois, 3)
