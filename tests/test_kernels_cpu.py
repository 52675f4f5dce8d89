"""The CUDA kernel text, built for the CPU (roilib.cuda.cpu), against the NumPy reference.

These run everywhere a C++ compiler exists; tests/test_kernels_gpu.py repeats the
comparisons on a GPU with the same cases (it imports them from here).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import roilib.reference as ref

if shutil.which(os.environ.get("CXX", "c++")) is None:
    pytest.skip("no C++ compiler to build the kernels for the CPU", allow_module_level=True)

from roilib.cuda import cpu  # noqa: E402

FLOATS = (np.float32, np.float64)
# (output_size, spatial_scale): dyadic and non-dyadic scales, square and not
GEOMETRIES = [((3, 4), 1.0), ((2, 2), 0.5), (7, 1 / 16), ((5, 3), 0.7)]


# -- cases --------------------------------------------------------------------------


def make_rois(rng, n_images, height, width, spatial_scale, n_random=12):
    """Boxes in image pixels covering the edge cases, then random ones.

    Written in feature-map pixels and divided by the scale: boxes inside, across the
    border, wholly outside, tiny, zero-size, inverted (x2 < x1), huge, and corners on
    half pixels (C rounding vs NumPy's banker's rounding).
    """
    h, w = height, width
    fixed = [
        [0, 1.3, 2.2, 8.7, 9.1],
        [1, -3.0, -2.0, w + 4.0, h + 3.0],  # covers the map and more
        [0, w + 2.0, 1.0, w + 6.0, 5.0],  # right of the map
        [1, -8.0, -6.0, -1.5, -1.2],  # above and left of the map
        [0, 4.0, 4.0, 4.2, 4.1],  # tiny
        [1, 5.0, 3.0, 5.0, 3.0],  # zero size
        [0, 6.0, 7.0, 2.0, 1.0],  # inverted
        [1, 2.5, 1.5, 6.5, 7.5],  # half-pixel corners
        [0, -0.5, -0.5, w - 0.5, h - 0.5],
        [1, w - 1.2, h - 1.1, w - 0.2, h - 0.3],  # last pixel
        [0, -60.0, -40.0, 300.0, 200.0],  # huge
    ]
    x1 = rng.uniform(-3, w + 1, n_random)
    y1 = rng.uniform(-3, h + 1, n_random)
    boxes = np.stack(
        [
            rng.integers(0, n_images, n_random),
            x1,
            y1,
            x1 + rng.uniform(0, w, n_random),
            y1 + rng.uniform(0, h, n_random),
        ],
        axis=1,
    )
    rois = np.concatenate([np.array(fixed), boxes])
    rois[:, 1:] /= spatial_scale
    return rois


def make_case(dtype, seed=0, ties=False, shape=(2, 3, 11, 13), spatial_scale=1.0):
    """A feature map and boxes. ``ties``: small integers, so maxima tie often."""
    rng = np.random.default_rng(seed)
    if ties:
        x = rng.integers(-2, 3, size=shape).astype(dtype)
    else:
        x = rng.standard_normal(shape).astype(dtype)
    rois = make_rois(rng, shape[0], shape[2], shape[3], spatial_scale)
    return x, rois


def grad_like(out, seed=1):
    return np.random.default_rng(seed).standard_normal(out.shape).astype(out.dtype)


def assert_close(actual, expected, dtype, scale=1.0):
    """Equal up to a tolerance for ``dtype``, relative to the larger of 1 and max |expected|.

    Kernels and reference add in different orders, so results may differ in the last
    bits; everything else (shapes, dtypes, which pixel wins a max) must agree.
    """
    assert actual.shape == expected.shape
    assert actual.dtype == expected.dtype or dtype == np.float16
    tol = {np.float16: 1e-2, np.float32: 2e-5, np.float64: 1e-11}[dtype] * scale
    magnitude = max(1.0, float(np.abs(expected).max(initial=0)))
    err = float(np.abs(actual.astype(np.float64) - expected.astype(np.float64)).max(initial=0))
    assert err <= tol * magnitude, f"max error {err:g} > {tol * magnitude:g}"


# Op specs: name, keyword variants. Each op is called as op(x, rois, output_size, scale, **kw).
ALIGN_VARIANTS = [
    dict(sampling_ratio=-1, aligned=False, mode="avg"),
    dict(sampling_ratio=2, aligned=False, mode="avg"),
    dict(sampling_ratio=-1, aligned=True, mode="avg"),
    dict(sampling_ratio=3, aligned=True, mode="avg"),
    dict(sampling_ratio=-1, aligned=False, mode="max"),
    dict(sampling_ratio=2, aligned=True, mode="max"),
]
WARP_VARIANTS = [dict(sampling_ratio=-1), dict(sampling_ratio=2), dict(sampling_ratio=1)]
BOX_OPS = [("roi_align", kw) for kw in ALIGN_VARIANTS] + [("roi_warp", kw) for kw in WARP_VARIANTS] + [("roi_pool", {})]


def _id(op_kw):
    op, kw = op_kw
    return op + "".join(f"-{k}={v}" for k, v in kw.items())


# -- forward and backward against the reference ---------------------------------------


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_box_op_matches_reference(op_kw, geometry, dtype):
    op, kw = op_kw
    output_size, scale = geometry
    x, rois = make_case(dtype, spatial_scale=scale)
    out = getattr(cpu, op)(x, rois, output_size, scale, **kw)
    expected = getattr(ref, op)(x, rois, output_size, scale, **kw)
    assert_close(out, expected, dtype)

    g = grad_like(expected)
    expected_grad = getattr(ref, op + "_backward")(g, x, rois, output_size, scale, **kw)
    for deterministic in (True, False):
        grad = getattr(cpu, op + "_backward")(g, x, rois, output_size, scale, deterministic=deterministic, **kw)
        assert_close(grad, expected_grad, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=str)
@pytest.mark.parametrize("kw", ALIGN_VARIANTS, ids=str)
def test_roi_align_box_gradient_matches_reference(kw, geometry, dtype):
    output_size, scale = geometry
    x, rois = make_case(dtype, seed=3, spatial_scale=scale)
    g = grad_like(ref.roi_align(x, rois, output_size, scale, **kw))
    got = cpu.roi_align_rois_backward(g, x, rois, output_size, scale, **kw)
    expected = ref.roi_align_rois_backward(g, x, rois, output_size, scale, **kw)
    assert got.shape == (rois.shape[0], 5) and got.dtype == dtype
    assert (got[:, 0] == 0).all()
    assert_close(got, expected, dtype, scale=10)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("mode", ["max", "avg"])
@pytest.mark.parametrize("shape,levels", [((2, 3, 11, 13), (4, 2, 1)), ((1, 2, 10, 3), (6, 3, 1)), ((2, 1, 1, 1), (2, 1))])
def test_spp_matches_reference(shape, levels, mode, dtype):
    x, _ = make_case(dtype, shape=shape)
    out = cpu.spp(x, levels, mode)
    assert_close(out, ref.spp(x, levels, mode), dtype)
    g = grad_like(out)
    expected = ref.spp_backward(g, x, levels, mode)
    for deterministic in (True, False):
        assert_close(cpu.spp_backward(g, x, levels, mode, deterministic=deterministic), expected, dtype)


@pytest.mark.parametrize("dtype", FLOATS)
def test_ties_go_to_the_first_maximum(dtype):
    """Integer maps tie often: RoIPool and SPP must pick the reference's (row-major first) pixel."""
    x, rois = make_case(dtype, seed=5, ties=True)
    levels = (5, 3, 2, 1)
    out = cpu.spp(x, levels, "max")
    assert_close(out, ref.spp(x, levels, "max"), dtype)
    g = grad_like(out)
    assert_close(cpu.spp_backward(g, x, levels, "max"), ref.spp_backward(g, x, levels, "max"), dtype)
    out = cpu.roi_pool(x, rois, (3, 4))
    assert_close(out, ref.roi_pool(x, rois, (3, 4)), dtype)
    g = grad_like(out)
    assert_close(cpu.roi_pool_backward(g, x, rois, (3, 4)), ref.roi_pool_backward(g, x, rois, (3, 4)), dtype)


def test_roi_pool_worked_example():
    """The 4x4 arange(16) map of a common MXNet ROIPooling example."""
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    rois = np.array([[0, 0, 0, 2, 2], [0, 0, 1, 3, 3]], dtype=np.float32)
    out = cpu.roi_pool(x, rois, 2, 1.0)
    np.testing.assert_array_equal(out[:, 0], [[[5, 6], [9, 10]], [[9, 11], [13, 15]]])


@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_float16_matches_float32_reference(op_kw):
    """float16 storage, float32 arithmetic: close to the reference run in float32."""
    op, kw = op_kw
    x16, rois = make_case(np.float16, seed=7, spatial_scale=0.5)
    x32 = x16.astype(np.float32)
    out = getattr(cpu, op)(x16, rois, (3, 4), 0.5, **kw)
    assert out.dtype == np.float16
    expected = getattr(ref, op)(x32, rois, (3, 4), 0.5, **kw)
    assert_close(out, expected, np.float16)
    g32 = grad_like(expected)
    g16 = g32.astype(np.float16)
    expected_grad = getattr(ref, op + "_backward")(g16.astype(np.float32), x32, rois, (3, 4), 0.5, **kw)
    for deterministic in (True, False):
        grad = getattr(cpu, op + "_backward")(g16, x16, rois, (3, 4), 0.5, deterministic=deterministic, **kw)
        assert grad.dtype == np.float16
        assert_close(grad, expected_grad, np.float16)
    if op == "roi_align":
        got = cpu.roi_align_rois_backward(g16, x16, rois, (3, 4), 0.5, **kw)
        expected_box = ref.roi_align_rois_backward(g16.astype(np.float32), x32, rois, (3, 4), 0.5, **kw)
        assert got.dtype == np.float16
        assert_close(got, expected_box, np.float16)


@pytest.mark.parametrize("mode", ["max", "avg"])
def test_float16_spp(mode):
    x16, _ = make_case(np.float16, seed=8)
    x32 = x16.astype(np.float32)
    out = cpu.spp(x16, (4, 2, 1), mode)
    assert out.dtype == np.float16
    assert_close(out, ref.spp(x32, (4, 2, 1), mode), np.float16)
    g16 = grad_like(out)
    expected = ref.spp_backward(g16.astype(np.float32), x32, (4, 2, 1), mode)
    assert_close(cpu.spp_backward(g16, x16, (4, 2, 1), mode), expected, np.float16)


TORCHVISION_FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "torchvision_parity.npz")


def test_torchvision_parity_fixture():
    """torchvision's CPU RoIAlign/RoIPool (the committed fixture), bit for bit.

    The kernels evaluate every expression in torchvision's order, and on the CPU the
    atomic backward adds in torchvision's order too, so the forward and the atomic
    backward are identical to it; the deterministic backward adds in another order.
    """
    if not os.path.exists(TORCHVISION_FIXTURE):
        pytest.skip("no torchvision fixture")
    data = np.load(TORCHVISION_FIXTURE, allow_pickle=False)
    for i in range(int(data["num_cases"])):
        prefix = f"case{i:03d}_"
        case = {key[len(prefix) :]: data[key] for key in data.files if key.startswith(prefix)}
        op = str(case["op"])
        kw = dict(output_size=tuple(case["output_size"].tolist()), spatial_scale=float(case["spatial_scale"]))
        if op == "roi_align":
            kw.update(sampling_ratio=int(case["sampling_ratio"]), aligned=bool(case["aligned"]))
        x, rois, g = case["input"], case["rois"], case["grad_output"]
        name = str(case["name"])
        assert getattr(cpu, op)(x, rois, **kw).tobytes() == case["output"].tobytes(), name
        backward = getattr(cpu, op + "_backward")
        assert backward(g, x, rois, deterministic=False, **kw).tobytes() == case["grad_input"].tobytes(), name
        assert_close(backward(g, x, rois, deterministic=True, **kw), case["grad_input"], x.dtype.type)


# -- determinism ------------------------------------------------------------------------


@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_deterministic_backward_is_bitwise_repeatable(op_kw):
    op, kw = op_kw
    x, rois = make_case(np.float32, seed=11)
    backward = getattr(cpu, op + "_backward")
    g = grad_like(getattr(cpu, op)(x, rois, (3, 4), 1.0, **kw))
    first = backward(g, x, rois, (3, 4), 1.0, deterministic=True, **kw)
    second = backward(g, x, rois, (3, 4), 1.0, deterministic=True, **kw)
    assert first.tobytes() == second.tobytes()
    assert_close(first, backward(g, x, rois, (3, 4), 1.0, deterministic=False, **kw), np.float32)


# -- edge cases -----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", (np.float16, np.float32, np.float64))
@pytest.mark.parametrize("op_kw", BOX_OPS, ids=_id)
def test_no_rois(op_kw, dtype):
    op, kw = op_kw
    x, _ = make_case(dtype)
    rois = np.zeros((0, 5), dtype=dtype)
    out = getattr(cpu, op)(x, rois, (3, 4), 1.0, **kw)
    assert out.shape == (0, 3, 3, 4) and out.dtype == dtype
    for deterministic in (True, False):
        grad = getattr(cpu, op + "_backward")(out, x, rois, (3, 4), 1.0, deterministic=deterministic, **kw)
        assert grad.shape == x.shape and grad.dtype == dtype and not grad.any()
    if op == "roi_align":
        assert cpu.roi_align_rois_backward(out, x, rois, (3, 4), 1.0, **kw).shape == (0, 5)


def test_list_of_per_image_boxes():
    x, rois = make_case(np.float64)
    per_image = [rois[rois[:, 0] == i, 1:] for i in range(x.shape[0])]
    stacked = np.concatenate([np.c_[np.full(len(b), i), b] for i, b in enumerate(per_image)])
    np.testing.assert_array_equal(cpu.roi_align(x, per_image, 3), cpu.roi_align(x, stacked, 3))


def test_bad_arguments_are_rejected_by_the_shared_checks():
    x, rois = make_case(np.float32)
    with pytest.raises(ValueError, match="rois"):
        cpu.roi_align(x, rois[:, 1:], 3)
    with pytest.raises(ValueError, match="mode"):
        cpu.roi_align(x, rois, 3, mode="median")
    with pytest.raises(TypeError, match="input"):
        cpu.spp(x.astype(np.int32))
    bad = rois.copy()
    bad[0, 1] = np.nan
    with pytest.raises(ValueError, match="finite"):
        cpu.roi_pool(x, bad, 2)


def test_non_contiguous_input():
    x, rois = make_case(np.float64, shape=(2, 3, 13, 11))
    xt = x.transpose(0, 1, 3, 2)  # (2, 3, 11, 13), not C-contiguous
    np.testing.assert_array_equal(cpu.roi_align(xt, rois, 3), cpu.roi_align(np.ascontiguousarray(xt), rois, 3))


def test_property_roi_align_random_configurations():
    """Random maps, boxes and options (hypothesis), float64 against the reference."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    coord = st.floats(-8, 24, allow_nan=False, width=32)

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(
        h=st.integers(1, 9),
        w=st.integers(1, 9),
        boxes=st.lists(st.tuples(coord, coord, coord, coord), min_size=1, max_size=4),
        output=st.tuples(st.integers(1, 4), st.integers(1, 4)),
        scale=st.sampled_from([1.0, 0.5, 0.3, 2.0]),
        sampling_ratio=st.integers(-1, 3),
        aligned=st.booleans(),
        mode=st.sampled_from(["avg", "max"]),
        seed=st.integers(0, 2**16),
    )
    def check(h, w, boxes, output, scale, sampling_ratio, aligned, mode, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((1, 2, h, w))
        rois = np.array([[0.0, *b] for b in boxes])
        kw = dict(sampling_ratio=sampling_ratio, aligned=aligned, mode=mode)
        out = cpu.roi_align(x, rois, output, scale, **kw)
        assert_close(out, ref.roi_align(x, rois, output, scale, **kw), np.float64)
        g = rng.standard_normal(out.shape)
        assert_close(
            cpu.roi_align_backward(g, x, rois, output, scale, **kw),
            ref.roi_align_backward(g, x, rois, output, scale, **kw),
            np.float64,
        )
        assert_close(
            cpu.roi_align_rois_backward(g, x, rois, output, scale, **kw),
            ref.roi_align_rois_backward(g, x, rois, output, scale, **kw),
            np.float64,
            scale=10,
        )

    check()


# -- the CPU shim itself --------------------------------------------------------------------


def test_half_conversions_match_numpy(tmp_path):
    """cpu_shim.h's __half <-> float conversions against NumPy's float16 (round to nearest even)."""
    src = tmp_path / "half_probe.cu"
    src.write_text(
        textwrap.dedent(
            """
            #include "common.cuh"
            extern "C" void to_float(long n, const __half* in, float* out) {
              for (long i = 0; i < n; ++i) out[i] = __half2float(in[i]);
            }
            extern "C" void to_half(long n, const float* in, __half* out) {
              for (long i = 0; i < n; ++i) out[i] = __float2half(in[i]);
            }
            """
        )
    )
    import ctypes

    lib = ctypes.CDLL(str(cpu.build_source(src)))
    halves = np.arange(1 << 16, dtype=np.uint16).view(np.float16)
    floats = np.empty(halves.shape, dtype=np.float32)
    lib.to_float(ctypes.c_long(halves.size), halves.ctypes.data_as(ctypes.c_void_p), floats.ctypes.data_as(ctypes.c_void_p))
    expected = halves.astype(np.float32)
    assert np.array_equal(floats, expected, equal_nan=True)

    rng = np.random.default_rng(0)
    # every half, the midpoints between neighbours (ties), and random float32 bit patterns
    h = np.sort(expected[np.isfinite(expected)])
    probes = np.concatenate(
        [
            h,
            ((h[1:].astype(np.float64) + h[:-1]) / 2).astype(np.float32),
            rng.integers(0, 1 << 32, 1 << 20, dtype=np.uint64).astype(np.uint32).view(np.float32),
            np.array([65504, 65519.99, 65520, 1e6, 2.0**-25, 2.0**-24, 3 * 2.0**-26, 1e-10, 0.0, -0.0], np.float32),
        ]
    )
    out = np.empty(probes.shape, dtype=np.float16)
    lib.to_half(ctypes.c_long(probes.size), probes.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p))
    with np.errstate(over="ignore"):
        want = probes.astype(np.float16)
    nan = np.isnan(want)
    assert np.array_equal(np.isnan(out), nan)
    assert np.array_equal(out[~nan].view(np.uint16), want[~nan].view(np.uint16))


def _sanitizer_runtime():
    """Path of libasan for LD_PRELOAD, or None when the compiler cannot sanitize."""
    cxx = os.environ.get("CXX", "c++")
    probe = subprocess.run(
        [cxx, "-x", "c++", "-fsanitize=address,undefined", "-shared", "-fPIC", "-o", os.devnull, "-"],
        input="int f() { return 0; }\n",
        capture_output=True,
        text=True,
    )
    if probe.returncode != 0:
        return None
    path = subprocess.run([cxx, "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    return path if os.path.isabs(path) and os.path.exists(path) else None


SANITIZED_SCRIPT = """
import numpy as np
from roilib.cuda import cpu
import roilib.reference as ref
from test_kernels_cpu import make_case, grad_like

assert cpu._ops.sanitize
for dtype in (np.float16, np.float32, np.float64):
    x, rois = make_case(dtype, spatial_scale=0.5)
    for op, kw in [("roi_align", dict(aligned=True)), ("roi_align", dict(mode="max")),
                   ("roi_warp", {}), ("roi_pool", {})]:
        out = getattr(cpu, op)(x, rois, (3, 4), 0.5, **kw)
        g = grad_like(out)
        for det in (True, False):
            getattr(cpu, op + "_backward")(g, x, rois, (3, 4), 0.5, deterministic=det, **kw)
        if op == "roi_align":
            cpu.roi_align_rois_backward(g, x, rois, (3, 4), 0.5, **kw)
    for mode in ("max", "avg"):
        out = cpu.spp(x, (4, 2, 1), mode)
        for det in (True, False):
            cpu.spp_backward(grad_like(out), x, (4, 2, 1), mode, deterministic=det)
print("sanitized run ok")
"""


def run_sanitized(script: str) -> None:
    """Run ``script`` in a fresh Python with the kernels built under AddressSanitizer and
    UBSan (``ROILIB_CPU_SANITIZE=1``); fail on any report. The script must print
    ``sanitized run ok`` at its end. Skips when the compiler cannot sanitize."""
    runtime = _sanitizer_runtime()
    if runtime is None:
        pytest.skip("the C++ compiler has no AddressSanitizer/UBSan runtime")
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(here)
    env = dict(
        os.environ,
        ROILIB_CPU_SANITIZE="1",
        LD_PRELOAD=runtime,
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        PYTHONPATH=os.pathsep.join([root, here, os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-5000:]
    assert "AddressSanitizer" not in report and "runtime error" not in report, report[-5000:]
    assert "sanitized run ok" in proc.stdout


def test_kernels_under_address_and_undefined_behaviour_sanitizers():
    run_sanitized(SANITIZED_SCRIPT)
