"""The kernels on an NVIDIA GPU, launched with CuPy.

The functions take CuPy arrays and have the reference's signatures (backward functions
add ``deterministic=False``). Each op family's ``.cu`` file is compiled once by NVRTC
through ``cupy.RawModule`` (headers pasted in, see ``roilib.cuda._source.kernel_source``,
so CuPy's on-disk cache sees every change) and its ``extern "C"`` kernels are looked up
by name.

Where the kernels run: every op makes its arrays' device current (``cupy.cuda.Device``)
for the call, so arrays on ``cuda:1`` are computed on GPU 1 whatever device is current,
and launches go to that device's current CuPy stream; choose it with ``with stream:``,
or wrap another library's stream with :func:`external_stream`. No op copies anything to
the host or synchronises: box values are checked by the kernels (a bad row gives NaN,
see ``roilib.cuda._host``), which is what lets a forward and backward be captured in a
CUDA graph.

Compiler options: ``-std=c++14`` and ``--fmad=false``, plus ``-I`` for the CUDA headers
of the ``nvidia-cuda-runtime`` wheels when they are installed (a CuPy-only install may
not find ``cuda_fp16.h`` otherwise). No fused multiply-adds, and no ``--use_fast_math``
(it would change ``ceil(roi_h / PH)`` and bin edges), so every float rounds as in the
CPU build and the NumPy reference, with one exception: CuPy always appends ``-ftz=true``
(and it wins over ``-ftz=false``), so float32 arithmetic on the GPU flushes subnormal
values (magnitude below 1.2e-38) to zero where the CPU build and NumPy keep them.
float64 is unaffected, and float16 storage is converted exactly.

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
    "roi_warp_rois_backward",

    "ps_roi_pool",
    "ps_roi_pool_backward",
    "ps_roi_align",
    "ps_roi_align_backward",
    "multiscale_roi_align",
    "multiscale_roi_align_backward",
    "GpuOps",
    "OPTIONS",
    "external_stream",
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


def compile_options() -> tuple:
    """``OPTIONS`` plus ``-I`` for the CUDA headers found in installed wheels."""
    return OPTIONS + tuple(f"-I{d}" for d in _source.cuda_include_dirs())


class _StreamHandle:
    """A raw ``cudaStream_t`` presented through the CUDA stream protocol."""

    def __init__(self, ptr: int):
        self.ptr = int(ptr)

    def __cuda_stream__(self):
        return (0, self.ptr)


def external_stream(stream, device_id: int):
    """A CuPy stream object for another library's stream (e.g. ``torch.cuda.current_stream()``).

    ``stream`` is an object with ``__cuda_stream__`` or ``cuda_stream`` (torch), or a raw
    handle. Uses ``cupy.cuda.Stream.from_external`` (CuPy 14, where ``ExternalStream`` is
    deprecated) and falls back to ``cupy.cuda.ExternalStream`` on CuPy 13. The caller
    keeps the stream alive.
    """
    cupy = _cupy()
    if hasattr(stream, "__cuda_stream__"):
        ptr = stream.__cuda_stream__()[1]
    elif hasattr(stream, "cuda_stream"):
        ptr = stream.cuda_stream
    else:
        ptr = int(stream)
    from_external = getattr(cupy.cuda.Stream, "from_external", None)
    if from_external is not None:
        with cupy.cuda.Device(device_id):
            return from_external(_StreamHandle(ptr))
    return cupy.cuda.ExternalStream(ptr, device_id)


class GpuOps(KernelOps):
    """The kernels on the GPU: ``roilib.cuda._host.KernelOps`` with a CuPy ``launch``."""

    #: tiles of 8 x 8 pixels for the deterministic backward: more work items than the
    #: CPU build's 16 x 16, and smaller per-thread accumulators
    tile = 8
    tile_channels = 1  # the kernels' ROILIB_TILE_CHANNELS under NVRTC

    def __init__(self):
        self._modules = {}

    @property
    def xp(self):
        return _cupy()

    def device_scope(self, array):
        """Make ``array``'s GPU current for the call (kernels, buffers, streams)."""
        return _cupy().cuda.Device(array.device.id)

    def module(self, family: str):
        """The compiled ``cupy.RawModule`` of an op family, on the current device."""
        key = (family, _cupy().cuda.Device().id)
        if key not in self._modules:
            self._modules[key] = _cupy().RawModule(code=_source.kernel_source(family), options=compile_options())
        return self._modules[key]

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
roi_warp_rois_backward = _ops.roi_warp_rois_backward

# issue 12: rotated RoIAlign and Precise RoI Pooling
__all__ += [
    "roi_align_rotated",
    "roi_align_rotated_backward",
    "roi_align_rotated_rois_backward",
    "prroi_pool",
    "prroi_pool_backward",
    "prroi_pool_rois_backward",
]
roi_align_rotated = _ops.roi_align_rotated
roi_align_rotated_backward = _ops.roi_align_rotated_backward
roi_align_rotated_rois_backward = _ops.roi_align_rotated_rois_backward
prroi_pool = _ops.prroi_pool
prroi_pool_backward = _ops.prroi_pool_backward
prroi_pool_rois_backward = _ops.prroi_pool_rois_backward

ps_roi_pool = _ops.ps_roi_pool
ps_roi_pool_backward = _ops.ps_roi_pool_backward
ps_roi_align = _ops.ps_roi_align
ps_roi_align_backward = _ops.ps_roi_align_backward
multiscale_roi_align = _ops.multiscale_roi_align
multiscale_roi_align_backward = _ops.multiscale_roi_align_backward
