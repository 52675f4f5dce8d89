"""The PS-RoIPool/PS-RoIAlign and multiscale kernels on a GPU, against the CPU build.

Skipped without CuPy or a CUDA device. Forward passes must equal the CPU build of the
same kernel text bit for bit (no FMA contraction or fast math on either side); the atomic
backward adds in a varying order, so it is compared within a tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest

pytestmark = pytest.mark.gpu

cp = pytest.importorskip("cupy", reason="needs CuPy")
try:
    if cp.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("no device")
except Exception as e:  # no driver, no device
    pytest.skip(f"needs a CUDA GPU: {e}", allow_module_level=True)

import roilib  # noqa: E402
from roilib.cuda import cpu, gpu  # noqa: E402

FLOATS = (np.float16, np.float32, np.float64)
TOL = {np.float16: 2e-3, np.float32: 1e-5, np.float64: 1e-12}


def _ps_case(dtype, rng):
    x = rng.standard_normal((2, 12, 11, 13)).astype(dtype)
    rois = np.array([[0, 1.2, 2.3, 17.7, 19.1], [1, -4.0, -2.0, 10.0, 30.0], [0, 8.0, 8.0, 8.0, 8.0],
                     [1, 30.0, 4.0, 12.0, 20.0], [0, 20.1, 18.3, 26.0, 22.0]])
    return x, rois


def _same_bits(device_array, host_array):
    got = cp.asnumpy(device_array)
    assert got.dtype == host_array.dtype and got.shape == host_array.shape
    assert got.tobytes() == host_array.tobytes(), f"max difference {np.abs(got - host_array).max()}"


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("op, kw", [("ps_roi_pool", {}), ("ps_roi_align", dict(sampling_ratio=-1)),
                                    ("ps_roi_align", dict(sampling_ratio=2))])
def test_ps_ops_on_the_gpu(dtype, op, kw):
    rng = np.random.default_rng(0)
    x, rois = _ps_case(dtype, rng)
    out = getattr(gpu, op)(cp.asarray(x), rois, (3, 2), 0.5, **kw)
    _same_bits(out, getattr(cpu, op)(x, rois, (3, 2), 0.5, **kw))
    g = rng.standard_normal(out.shape).astype(dtype)
    grad = getattr(gpu, op + "_backward")(cp.asarray(g), cp.asarray(x), rois, (3, 2), 0.5, **kw)
    want = getattr(cpu, op + "_backward")(g, x, rois, (3, 2), 0.5, **kw)
    np.testing.assert_allclose(cp.asnumpy(grad).astype(np.float64), want.astype(np.float64), rtol=0,
                               atol=TOL[dtype])


@pytest.mark.parametrize("dtype", FLOATS)
def test_multiscale_on_the_gpu(dtype):
    rng = np.random.default_rng(1)
    scales = [1 / 4, 1 / 8, 1 / 16, 1 / 32]
    maps = [rng.standard_normal((2, 3, 256 // s, 320 // s)).astype(dtype) for s in (4, 8, 16, 32)]
    rois = np.array([[0, 1, 2, 30, 40.0], [1, 0, 0, 250, 200.0], [0, 10, 10, 10.3, 10.2], [1, 300, 100, 200, 400.0],
                     [0, 5, 5, 5, 40.0], [1, -20, -20, 60, 50.0], [0, 10, 10, 300, 250.0], [1, 0, 0, 320, 256.0]])
    dev = [cp.asarray(m) for m in maps]
    out = gpu.multiscale_roi_align(dev, rois, (3, 2), scales, 2)
    _same_bits(out, cpu.multiscale_roi_align(maps, rois, (3, 2), scales, 2))
    g = rng.standard_normal(out.shape).astype(dtype)
    grads = gpu.multiscale_roi_align_backward(cp.asarray(g), dev, rois, (3, 2), scales, 2)
    for got, want in zip(grads, cpu.multiscale_roi_align_backward(g, maps, rois, (3, 2), scales, 2)):
        np.testing.assert_allclose(cp.asnumpy(got).astype(np.float64), want.astype(np.float64), rtol=0,
                                   atol=TOL[dtype])


def test_public_api_dispatches_a_cupy_pyramid_to_the_kernels():
    maps = [cp.ones((1, 2, 8, 8), dtype=cp.float32), cp.ones((1, 2, 4, 4), dtype=cp.float32)]
    out = roilib.multiscale_roi_align(maps, np.array([[0, 1.0, 1.0, 20.0, 20.0]]), 2, (0.25, 0.125))
    assert isinstance(out, cp.ndarray)
