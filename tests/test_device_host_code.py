"""The GPU path's host code, run against a fake device array type (tests/device_fake.py).

What a GPU would expose and the CPU build alone cannot: work launched on the wrong
device, values read back to the host (a synchronisation on every call), unchecked box
values reaching a kernel, and grid-stride loops that only ever ran with one thread.
"""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip("no C++ compiler to build the kernels for the CPU", allow_module_level=True)

import device_fake as fake  # noqa: E402
from device_fake import Device, FakeDeviceArray, FakeDeviceOps, to_device  # noqa: E402
from test_kernels_cpu import BOX_OPS, _id, grad_like, make_case  # noqa: E402

import roilib.reference as ref  # noqa: E402
from roilib.cuda import cpu  # noqa: E402

SIZE, SCALE = (3, 4), 0.5


@pytest.fixture(autouse=True)
def _reset_device():
    Device.current, Device.transfers = 0, 0
    yield
    Device.current, Device.transfers = 0, 0


def _run_all(ops, x, rois, op, kw):
    """Forward, both backwards and (RoIAlign) the box gradient, as host arrays."""
    out = getattr(ops, op)(x, rois, SIZE, SCALE, **kw)
    g = to_device(grad_like(out._data), out.device)
    results = {"forward": out}
    for det in (False, True):
        results[f"backward det={det}"] = getattr(ops, op + "_backward")(g, x, rois, SIZE, SCALE, deterministic=det, **kw)
    if op == "roi_align":
        results["rois_backward"] = ops.roi_align_rois_backward(g, x, rois, SIZE, SCALE, **kw)
    return results


@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_ops_run_on_the_device_of_their_arrays(op_kw):
    op, kw = op_kw
    x, rois = make_case(np.float32, spatial_scale=SCALE)
    ops = FakeDeviceOps()
    results = _run_all(ops, to_device(x, 1), to_device(rois, 1), op, kw)
    assert Device.current == 0  # the call left the current device as it was
    assert set(ops.launched_on) == {1}
    out = results["forward"]
    g = grad_like(out._data)
    expected = {"forward": getattr(cpu, op)(x, rois, SIZE, SCALE, **kw)}
    for det in (False, True):
        expected[f"backward det={det}"] = getattr(cpu, op + "_backward")(g, x, rois, SIZE, SCALE, deterministic=det, **kw)
    if op == "roi_align":
        expected["rois_backward"] = cpu.roi_align_rois_backward(g, x, rois, SIZE, SCALE, **kw)
    for name, value in results.items():
        assert isinstance(value, FakeDeviceArray) and value.device == 1, name
        assert value._data.tobytes() == expected[name].tobytes(), name


def test_spp_runs_on_the_device_of_its_input():
    x, _ = make_case(np.float64)
    ops = FakeDeviceOps()
    out = ops.spp(to_device(x, 1), (3, 1), "max")
    g = grad_like(out._data)
    grad = ops.spp_backward(to_device(g, 1), to_device(x, 1), (3, 1), "max", deterministic=True)
    assert out.device == grad.device == 1 and set(ops.launched_on) == {1}
    np.testing.assert_array_equal(out._data, cpu.spp(x, (3, 1), "max"))
    np.testing.assert_array_equal(grad._data, cpu.spp_backward(g, x, (3, 1), "max", deterministic=True))
    assert Device.transfers == 0


def test_a_missing_device_scope_is_caught():
    """The fake really checks devices: without device_scope the launch is refused."""
    x, rois = make_case(np.float32, spatial_scale=SCALE)
    ops = FakeDeviceOps(scope=False)
    with pytest.raises(AssertionError, match="on device 1 launched on device 0"):
        ops.roi_align(to_device(x, 1), to_device(rois, 1), SIZE, SCALE)


@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_no_value_is_read_back_to_the_host(op_kw):
    op, kw = op_kw
    x, rois = make_case(np.float32, spatial_scale=SCALE)
    _run_all(FakeDeviceOps(), to_device(x), to_device(rois), op, kw)
    assert Device.transfers == 0


def test_per_image_box_lists_stay_on_the_device():
    x, rois = make_case(np.float64, spatial_scale=SCALE)
    per_image = [to_device(rois[rois[:, 0] == i, 1:]) for i in range(x.shape[0])]
    out = FakeDeviceOps().roi_align(to_device(x), per_image, SIZE, SCALE, sampling_ratio=2)
    assert Device.transfers == 0
    np.testing.assert_allclose(out._data, ref.roi_align(x, [b._data for b in per_image], SIZE, SCALE, sampling_ratio=2))


def test_the_fake_refuses_and_counts_host_reads():
    """The transfer count can fail: implicit conversion raises, explicit reads count."""
    a = to_device(np.arange(4.0))
    with pytest.raises(TypeError, match="Implicit conversion"):
        np.asarray(a)
    float(a[1])
    a.get()
    assert Device.transfers == 2


BAD_ROWS = [
    [7.0, 1.0, 1.0, 5.0, 5.0],  # batch index past the 2 images
    [-1.0, 1.0, 1.0, 5.0, 5.0],  # negative batch index
    [0.5, 1.0, 1.0, 5.0, 5.0],  # fractional batch index
    [0.0, np.nan, 1.0, 5.0, 5.0],  # NaN corner
    [1.0, 1.0, 1.0, np.inf, 5.0],  # infinite corner
]


@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_bad_box_values_on_a_device_give_nan_rows_and_no_gradient(op_kw):
    op, kw = op_kw
    x, good = make_case(np.float64, spatial_scale=SCALE)
    rois = np.concatenate([good[:3], np.array(BAD_ROWS) / [1, SCALE, SCALE, SCALE, SCALE], good[3:6]])
    bad = np.zeros(len(rois), bool)
    bad[3 : 3 + len(BAD_ROWS)] = True
    ops = FakeDeviceOps()
    out = getattr(ops, op)(to_device(x), to_device(rois), SIZE, SCALE, **kw)._data
    assert np.isnan(out[bad]).all()
    expected = getattr(ref, op)(x, rois[~bad], SIZE, SCALE, **kw)
    np.testing.assert_allclose(out[~bad], expected, rtol=1e-12, atol=1e-12)
    g = grad_like(out)
    for det in (False, True):
        grad = getattr(ops, op + "_backward")(to_device(g), to_device(x), to_device(rois), SIZE, SCALE,
                                              deterministic=det, **kw)._data  # fmt: skip
        ref_grad = getattr(ref, op + "_backward")(g[~bad], x, rois[~bad], SIZE, SCALE, **kw)
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-12, atol=1e-12)


def test_boxes_on_another_device_are_rejected():
    x, rois = make_case(np.float32, spatial_scale=SCALE)
    with pytest.raises(ValueError, match="rois is on device 0 but input is on device 1"):
        FakeDeviceOps().roi_pool(to_device(x, 1), to_device(rois, 0), SIZE, SCALE)


def test_host_boxes_are_rejected_for_device_input():
    x, rois = make_case(np.float32, spatial_scale=SCALE)
    with pytest.raises(TypeError, match="rois must be a fakedevice array"):
        FakeDeviceOps().roi_align(to_device(x), rois, SIZE, SCALE)


# -- grid-stride loops with many threads -------------------------------------------------


@pytest.mark.parametrize("launch_shape", [(3, 4), (2, 64)], ids=str)
@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_grid_stride_loops_cover_every_item_with_many_threads(op_kw, launch_shape):
    """(3, 4): 12 threads, so every kernel's loop takes several passes; (2, 64): 128
    threads, more than some kernels' items (per-box and per-tile kernels), so some
    threads have nothing to do. Each item is computed independently, so the results
    equal the one-thread build bit for bit (the atomic scatter adds in another order)."""
    op, kw = op_kw
    x, rois = make_case(np.float64, spatial_scale=SCALE)
    many = cpu.CpuOps(launch_shape=launch_shape)
    out = getattr(many, op)(x, rois, SIZE, SCALE, **kw)
    assert out.tobytes() == getattr(cpu, op)(x, rois, SIZE, SCALE, **kw).tobytes()
    g = grad_like(out)
    one = getattr(cpu, op + "_backward")(g, x, rois, SIZE, SCALE, deterministic=True, **kw)
    det = getattr(many, op + "_backward")(g, x, rois, SIZE, SCALE, deterministic=True, **kw)
    atomic = getattr(many, op + "_backward")(g, x, rois, SIZE, SCALE, deterministic=False, **kw)
    assert det.tobytes() == one.tobytes()
    np.testing.assert_allclose(atomic, one, rtol=1e-12, atol=1e-12)
    if op == "roi_align":
        assert (
            many.roi_align_rois_backward(g, x, rois, SIZE, SCALE, **kw).tobytes()
            == cpu.roi_align_rois_backward(g, x, rois, SIZE, SCALE, **kw).tobytes()
        )


def test_grid_stride_spp_with_many_threads():
    x, _ = make_case(np.float32)
    many = cpu.CpuOps(launch_shape=(3, 5))
    out = many.spp(x, (4, 2, 1), "avg")
    assert out.tobytes() == cpu.spp(x, (4, 2, 1), "avg").tobytes()
    g = grad_like(out)
    assert (
        many.spp_backward(g, x, (4, 2, 1), "avg", deterministic=True).tobytes()
        == cpu.spp_backward(g, x, (4, 2, 1), "avg", deterministic=True).tobytes()
    )


def test_fake_module_is_the_backend_namespace():
    assert fake.xp.ndarray is FakeDeviceArray


def test_every_public_op_runs_in_a_device_scope():
    """A new op method without @_on_device would launch on whatever device is current."""
    from roilib.cuda._host import KernelOps

    ops = [
        name for name in vars(KernelOps)
        if not name.startswith("_") and callable(getattr(KernelOps, name)) and name not in ("launch", "device_scope")
    ]  # fmt: skip
    assert "roi_align_rois_backward" in ops
    for name in ops:
        assert hasattr(getattr(KernelOps, name), "__wrapped__"), f"KernelOps.{name} is not wrapped by _on_device"


# -- the newer members: Precise RoI Pooling and rotated RoIAlign ---------------------------


def _rotated_case(dtype=np.float64):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 11, 13)).astype(dtype)
    k = 8
    rois = np.stack(
        [rng.integers(0, 2, k), rng.uniform(0, 26, k), rng.uniform(0, 22, k),
         rng.uniform(1, 12, k), rng.uniform(1, 10, k), rng.uniform(-180, 180, k)], 1
    )  # fmt: skip
    return x, rois


def test_prroi_pool_on_a_device_reads_nothing_back_and_runs_where_its_arrays_are():
    x, rois = make_case(np.float64, spatial_scale=SCALE)
    ops = FakeDeviceOps()
    out = ops.prroi_pool(to_device(x, 1), to_device(rois, 1), SIZE, SCALE)
    g = grad_like(out._data)
    grad = ops.prroi_pool_backward(to_device(g, 1), to_device(x, 1), to_device(rois, 1), SIZE, SCALE)
    boxes = ops.prroi_pool_rois_backward(to_device(g, 1), to_device(x, 1), to_device(rois, 1), SIZE, SCALE)
    assert Device.transfers == 0 and set(ops.launched_on) == {1}
    np.testing.assert_array_equal(out._data, cpu.prroi_pool(x, rois, SIZE, SCALE))
    np.testing.assert_array_equal(grad._data, cpu.prroi_pool_backward(g, x, rois, SIZE, SCALE))
    np.testing.assert_array_equal(boxes._data, cpu.prroi_pool_rois_backward(g, x, rois, SIZE, SCALE))


def test_rotated_roi_align_on_a_device_reads_nothing_back_and_runs_where_its_arrays_are():
    x, rois = _rotated_case()
    ops = FakeDeviceOps()
    out = ops.roi_align_rotated(to_device(x, 1), to_device(rois, 1), SIZE, SCALE, 2)
    g = grad_like(out._data)
    grad = ops.roi_align_rotated_backward(to_device(g, 1), to_device(x, 1), to_device(rois, 1), SIZE, SCALE, 2)
    assert Device.transfers == 0 and set(ops.launched_on) == {1}
    np.testing.assert_allclose(out._data, ref.roi_align_rotated(x, rois, SIZE, SCALE, 2), rtol=1e-12, atol=1e-12)
    expected = ref.roi_align_rotated_backward(g, x, rois, SIZE, SCALE, 2)
    np.testing.assert_allclose(grad._data, expected, rtol=1e-12, atol=1e-12)


def test_bad_rotated_and_prroi_rows_on_a_device_give_nan():
    x, rois = _rotated_case()
    bad = rois.copy()
    bad[1, 0] = 9  # batch index past the 2 images
    bad[2, 5] = np.inf  # infinite angle
    bad[3, 3] = -2.0  # negative width
    out = FakeDeviceOps().roi_align_rotated(to_device(x), to_device(bad), SIZE, SCALE, 2)._data
    assert np.isnan(out[1:4]).all() and not np.isnan(out[[0, 4, 5, 6, 7]]).any()
    x5, rois5 = make_case(np.float64, spatial_scale=SCALE)
    rois5[0, 0] = 0.5
    out5 = FakeDeviceOps().prroi_pool(to_device(x5), to_device(rois5), SIZE, SCALE)._data
    assert np.isnan(out5[0]).all() and not np.isnan(out5[1:]).any()


@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_every_returned_array_comes_from_the_installed_allocator(op_kw):
    """roilib.torch installs torch's allocator with use_allocator: what an op returns
    must be one of the buffers it handed out, never an array made elsewhere."""
    from roilib.cuda._host import use_allocator

    op, kw = op_kw
    x, rois = make_case(np.float32, spatial_scale=SCALE)
    made = []

    def alloc(shape, dtype):
        made.append(fake.xp.empty(shape, dtype))
        return made[-1]

    ops = FakeDeviceOps()
    xd, rd = to_device(x), to_device(rois)
    with use_allocator(alloc):
        out = getattr(ops, op)(xd, rd, SIZE, SCALE, **kw)
        g = to_device(grad_like(out._data))
        results = [out] + [
            getattr(ops, op + "_backward")(g, xd, rd, SIZE, SCALE, deterministic=det, **kw) for det in (False, True)
        ]
        if op != "roi_pool":
            results.append(getattr(ops, op + "_rois_backward")(g, xd, rd, SIZE, SCALE, **kw))
    for result in results:
        assert any(result is buffer for buffer in made)
