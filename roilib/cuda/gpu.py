"""The kernels on an NVIDIA GPU, launched with CuPy.

The functions take CuPy arrays and have the reference's signatures (backward functions
add ``deterministic=True``). Each op family's ``.cu`` file is compiled once by NVRTC
through ``cupy.RawModule`` (headers pasted in, see ``roilib.cuda._source.kernel_source``,
so CuPy's on-disk cache sees every change) and its ``extern "C"`` kernels are looked up
by name. Kernels run on CuPy's current stream; wrap calls in ``with stream:`` (or
``cupy.cuda.ExternalStream`` for torch's stream) to choose it.

Compiler options: ``-std=c++14`` and ``--fmad=false``. No fused multiply-adds, and no
``--use_fast_math`` (it would change ``ceil(roi_h / PH)`` and bin edges), so every
float rounds as in the CPU build and the NumPy reference.

All host code (checks, buffers, typed scalars) is ``roilib.cuda._host``, which the
CPU tests run through ``roilib.cuda.cpu``; only ``GpuOps.launch`` is GPU-specific.
"""
from __future__ import annotations

import numpy as np

from . import _source
from ._host import _SUFFIX, KernelOps

__all__ = [
    "spp",
    "spp_backward",
    "roi_pool",
    "roi_pool_backward",
    "roi_align",
    "roi_align_backward",
    "roi_align_rois_backward",
    "roi_warp",
    "roi_warp_backward",
    "ps_roi_pool",
    "ps_roi_pool_backward",
    "ps_roi_align",
    "ps_roi_align_backward",
    "multiscale_roi_align",
    "multiscale_roi_align_backward",
    "GpuOps",
    "OPTIONS",
]

OPTIONS = ("-std=c++14", "--fmad=false")
BLOCK = 256
MAX_BLOCKS = 65535  # enough to fill any GPU; the grid-stride loop covers the rest


def _cupy():
    """Import CuPy, with an error that says what is missing."""
    try:
        import cupy
    except ImportError as e:
        raise ImportError(
            "roilib.cuda.gpu needs CuPy: pip install 'roilib[gpu]' (cupy-cuda12x); "
            "without a GPU use roilib.cuda.cpu or the NumPy reference"
        ) from e
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError when there is no driver
        raise RuntimeError(f"roilib.cuda.gpu found CuPy but no usable CUDA device: {e}") from e
    if count == 0:
        raise RuntimeError("roilib.cuda.gpu found CuPy but no CUDA device")
    return cupy


class GpuOps(KernelOps):
    """The kernels on the GPU: ``roilib.cuda._host.KernelOps`` with a CuPy ``launch``."""

    def __init__(self):
        self._modules = {}

    @property
    def xp(self):
        return _cupy()

    def module(self, family: str):
        """The compiled ``cupy.RawModule`` of an op family."""
        if family not in self._modules:
            self._modules[family] = _cupy().RawModule(code=_source.kernel_source(family), options=OPTIONS)
        return self._modules[family]

    def launch(self, family, kernel, dtype, n, *args):
        fn = self.module(family).get_function(f"{family}_{kernel}_{_SUFFIX[np.dtype(dtype)]}")
        blocks = min((n + BLOCK - 1) // BLOCK, MAX_BLOCKS)
        fn((blocks,), (BLOCK,), (np.int64(n),) + tuple(args))


_ops = GpuOps()

spp = _ops.spp
spp_backward = _ops.spp_backward
roi_pool = _ops.roi_pool
roi_pool_backward = _ops.roi_pool_backward
roi_align = _ops.roi_align
roi_align_backward = _ops.roi_align_backward
roi_align_rois_backward = _ops.roi_align_rois_backward
roi_warp = _ops.roi_warp
roi_warp_backward = _ops.roi_warp_backward
ps_roi_pool = _ops.ps_roi_pool
ps_roi_pool_backward = _ops.ps_roi_pool_backward
ps_roi_align = _ops.ps_roi_align
ps_roi_align_backward = _ops.ps_roi_align_backward
multiscale_roi_align = _ops.multiscale_roi_align
multiscale_roi_align_backward = _ops.multiscale_roi_align_backward
