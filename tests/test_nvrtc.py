"""The kernels compile for real GPU targets with NVRTC, and match what the host launches.

No GPU is needed: NVRTC comes from the ``cuda-bindings`` and ``nvidia-cuda-nvrtc`` wheels,
``cuda_fp16.h`` from ``nvidia-cuda-runtime``. Each family is compiled exactly as
:mod:`roilib.cuda.gpu` hands it to CuPy (headers pasted in, same options), then the PTX is
checked for every kernel the host code launches, with the parameter types it passes.
"""
from __future__ import annotations

import re

import numpy as np
import pytest

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="needs the cuda-bindings wheel")

from roilib.cuda import _source  # noqa: E402
from roilib.cuda._host import _SUFFIX, KernelOps  # noqa: E402
from roilib.cuda.gpu import OPTIONS  # noqa: E402

ARCHES = ("sm_75", "sm_80", "sm_90")


def _check(result):
    """cuda-bindings returns (status, *values); raise on a bad status."""
    status, *values = result if isinstance(result, tuple) else (result,)
    if status != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"NVRTC call failed: {status}")
    return values[0] if len(values) == 1 else values


def compile_ptx(source: str, name: str, arch: str) -> str:
    """PTX of ``source`` for ``arch`` (a machine-code build must succeed too); fails with NVRTC's log."""
    include = _source.cuda_include_dirs()
    if not include:
        pytest.skip("needs cuda_fp16.h from the nvidia-cuda-runtime wheel")
    try:
        prog = _check(nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], []))
    except RuntimeError as e:  # e.g. libnvrtc not found
        pytest.skip(f"NVRTC unavailable: {e}")
    options = [o.encode() for o in OPTIONS + (f"--gpu-architecture={arch}",)] + [
        f"-I{d}".encode() for d in include
    ]
    status = nvrtc.nvrtcCompileProgram(prog, len(options), options)[0]
    size = _check(nvrtc.nvrtcGetProgramLogSize(prog))
    log = b" " * size
    _check(nvrtc.nvrtcGetProgramLog(prog, log))
    log = log.decode(errors="replace").rstrip("\0 \n")
    assert status == nvrtc.nvrtcResult.NVRTC_SUCCESS, f"{name} for {arch}:\n{log}"
    assert "warning" not in log.lower(), f"{name} for {arch}:\n{log}"
    assert _check(nvrtc.nvrtcGetCUBINSize(prog)) > 0  # ptxas ran: SASS for this GPU exists
    size = _check(nvrtc.nvrtcGetPTXSize(prog))
    ptx = b" " * size
    _check(nvrtc.nvrtcGetPTX(prog, ptx))
    _check(nvrtc.nvrtcDestroyProgram(prog))
    return ptx.decode().rstrip("\0")


class _Recorder(KernelOps):
    """Host code with a launch that only records the kernel name and argument types."""

    xp = np

    def __init__(self):
        self.launches = {}

    def _empty(self, shape, dtype):
        # no kernel runs here, so nothing would fill an uninitialised output
        return np.zeros(shape, dtype=dtype)

    def launch(self, family, kernel, dtype, n, *args):
        name = f"{family}_{kernel}_{_SUFFIX[np.dtype(dtype)]}"
        self.launches.setdefault(family, {})[name] = [np.int64(n)] + list(args)


def recorded_launches():
    """Every kernel the host code launches, per family, from one call of every op and option."""
    rec = _Recorder()
    for dtype in (np.float16, np.float32, np.float64):
        x = np.ones((1, 2, 5, 6), dtype=dtype)
        rois = np.array([[0, 0.5, 0.5, 4.0, 3.0]])
        for mode in ("avg", "max"):
            for det in (True, False):
                g = np.ones((1, 2, 2, 2), dtype=dtype)
                rec.roi_align(x, rois, 2, mode=mode)
                rec.roi_align_backward(g, x, rois, 2, mode=mode, deterministic=det)
                rec.roi_align_rois_backward(g, x, rois, 2, mode=mode)
                rec.roi_warp(x, rois, 2)
                rec.roi_warp_backward(g, x, rois, 2, deterministic=det)
                rec.roi_warp_rois_backward(g, x, rois, 2)
                rec.roi_pool(x, rois, 2)
                rec.roi_pool_backward(g, x, rois, 2, deterministic=det)
                rec.spp(x, (2, 1), mode)
                rec.spp_backward(np.ones((1, 10), dtype=dtype), x, (2, 1), mode, deterministic=det)
    return rec.launches


LAUNCHES = recorded_launches()


def _family_launches():
    """Launches of the position-sensitive and multiscale ops (issue 11)."""
    rec = _Recorder()
    for dtype in (np.float16, np.float32, np.float64):
        rois = np.array([[0, 0.5, 0.5, 4.0, 3.0]])
        x = np.ones((1, 8, 5, 6), dtype=dtype)
        g = np.ones((1, 2, 2, 2), dtype=dtype)
        rec.ps_roi_pool(x, rois, 2)
        rec.ps_roi_pool_backward(g, x, rois, 2)
        rec.ps_roi_align(x, rois, 2)
        rec.ps_roi_align_backward(g, x, rois, 2)
        maps = [np.ones((1, 2, 8, 8), dtype=dtype), np.ones((1, 2, 4, 4), dtype=dtype)]
        rec.multiscale_roi_align(maps, rois, 2, (0.25, 0.125))
        rec.multiscale_roi_align_backward(np.ones((1, 2, 2, 2), dtype=dtype), maps, rois, 2, (0.25, 0.125))
    return rec.launches


LAUNCHES.update(_family_launches())


def _param_kind(arg) -> str:
    """The PTX parameter type a host argument must meet."""
    if isinstance(arg, np.ndarray) or isinstance(arg, np.int64):
        return "64-bit integer"
    if isinstance(arg, np.int32):
        return "32-bit integer"
    if isinstance(arg, np.float32):
        return "f32"
    if isinstance(arg, np.float64):
        return "f64"
    raise TypeError(f"untyped kernel argument {arg!r}")


_PTX_KIND = {"u64": "64-bit integer", "s64": "64-bit integer", "b64": "64-bit integer",
             "u32": "32-bit integer", "s32": "32-bit integer", "b32": "32-bit integer",
             "f32": "f32", "f64": "f64"}  # fmt: skip


def ptx_entries(ptx: str):
    """``{kernel name: [parameter kinds]}`` of the ``.entry`` points in a PTX module."""
    entries = {}
    for m in re.finditer(r"\.entry\s+(\w+)\s*\(([^)]*)\)", ptx):
        types = re.findall(r"\.param\s+\.(\w+)", m.group(2))
        entries[m.group(1)] = [_PTX_KIND.get(t, t) for t in types]
    return entries


def test_every_family_is_launched():
    assert sorted(LAUNCHES) == sorted(_source.FAMILIES)


@pytest.mark.parametrize("arch", ARCHES)
@pytest.mark.parametrize("family", _source.FAMILIES)
def test_kernels_compile_with_nvrtc(family, arch):
    ptx = compile_ptx(_source.kernel_source(family), f"{family}.cu", arch)
    assert f".target {arch}" in ptx
    entries = ptx_entries(ptx)
    for name, args in LAUNCHES[family].items():
        assert name in entries, f"{name} is launched by the host code but not in the PTX"
        assert entries[name] == [_param_kind(a) for a in args], f"{name}: host arguments and kernel parameters differ"


def _record_rotated_and_prroi(launches):
    """Issue 12's families: every kernel their host code launches (atomic backward only)."""
    rec = _Recorder()
    for dtype in (np.float16, np.float32, np.float64):
        x = np.ones((1, 2, 5, 6), dtype=dtype)
        g = np.ones((1, 2, 2, 2), dtype=dtype)
        rotated = np.array([[0, 2.5, 2.0, 3.0, 2.0, 30.0]])
        rois = np.array([[0, 0.5, 0.5, 4.0, 3.0]])
        for aligned in (True, False):
            rec.roi_align_rotated(x, rotated, 2, aligned=aligned)
            rec.roi_align_rotated_backward(g, x, rotated, 2, aligned=aligned, deterministic=False)
            rec.roi_align_rotated_rois_backward(g, x, rotated, 2, aligned=aligned)
        rec.prroi_pool(x, rois, 2)
        rec.prroi_pool_backward(g, x, rois, 2, deterministic=False)
        rec.prroi_pool_rois_backward(g, x, rois, 2)
    launches.update(rec.launches)


_record_rotated_and_prroi(LAUNCHES)
