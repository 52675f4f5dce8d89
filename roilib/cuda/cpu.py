"""The CUDA kernels, compiled for the CPU and called through ctypes.

Every ``.cu`` file under ``roilib/cuda/kernels/`` is plain C++ once ``cpu_shim.h``
defines the CUDA built-ins for a launch of one block of one thread: the grid-stride
loop of each kernel then walks all its work items in order. So this module runs the
exact kernel text the GPU runs, with the same host code (``roilib.cuda._host``), and
the tests compare it with the NumPy reference on machines without a GPU.

The functions take NumPy arrays and have the reference's signatures (backward functions
add ``deterministic=False``)::

    from roilib.cuda import cpu
    out = cpu.roi_align(x, rois, 7, spatial_scale=1/16, sampling_ratio=2)

Building
--------
Each op family is compiled on first use with the system C++ compiler (``$CXX``, else
``c++``): ``c++ -x c++ -std=c++14 -O2 -shared -fPIC -ffp-contract=off``. Contraction of
``a*b + c`` into fused multiply-adds is off so results round like NumPy's (and like the
GPU build, which passes ``--fmad=false``). The shared library is cached in
``$ROILIB_CACHE_DIR`` (default ``$XDG_CACHE_HOME/roilib`` or ``~/.cache/roilib``) under a
name that hashes the kernel sources, the flags and the compiler version, so an edited
kernel is rebuilt and an unchanged one is not.

Environment switches, read when this module is imported:

``ROILIB_CPU_DEBUG=1``
    build with ``-O0 -g`` (for a debugger).
``ROILIB_CPU_SANITIZE=1``
    build with ``-fsanitize=address,undefined``. The Python process must then load the
    ASan runtime first: ``LD_PRELOAD=$(c++ -print-file-name=libasan.so)``, and usually
    ``ASAN_OPTIONS=detect_leaks=0`` (CPython's own allocations look like leaks).

Stepping through a kernel in gdb
--------------------------------
Build with debug information and run the script under gdb::

    ROILIB_CPU_DEBUG=1 gdb --args python my_script.py
    (gdb) set breakpoint pending on
    (gdb) break roi_align_forward_f32     # an extern "C" entry point
    (gdb) break bin_average               # or any device function, or FILE:LINE
    (gdb) run

The library is loaded when the script first calls an op, so breakpoints stay pending
until then. There is a single "thread", so the grid-stride variable ``i`` is the work
item (for a forward pass, the flat output index): ``break sampling.cuh:LINE if i == 5``
on a line inside a kernel's loop stops at output element 5; ``print g`` shows a box's
``SampleGrid``, ``finish`` returns a bin's value.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import subprocess
import tempfile
from pathlib import Path

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
    "build",
    "build_source",
    "CpuOps",
]

_BASE_FLAGS = ("-x", "c++", "-std=c++14", "-shared", "-fPIC", "-ffp-contract=off")
_SANITIZE_FLAGS = ("-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def cache_dir() -> Path:
    """Where built libraries are kept (``$ROILIB_CACHE_DIR`` overrides)."""
    if os.environ.get("ROILIB_CACHE_DIR"):
        return Path(os.environ["ROILIB_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "roilib"


def compiler() -> str:
    return os.environ.get("CXX", "c++")


@functools.lru_cache(maxsize=None)
def _compiler_version(cxx: str) -> str:
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"roilib.cuda.cpu needs a C++ compiler to build its kernels; {cxx!r} failed: {e}") from e


def compile_flags(sanitize: bool = False, debug: bool = False) -> list:
    """Compiler flags for a kernel library (see the module docstring)."""
    flags = list(_BASE_FLAGS) + (["-O0", "-g"] if debug else ["-O1", "-g"] if sanitize else ["-O2"])
    if sanitize:
        flags += _SANITIZE_FLAGS
    return flags + [f"-I{_source.KERNEL_DIR}"]


def build(family: str, sanitize: bool = False, debug: bool = False) -> Path:
    """Compile one op family's ``.cu`` file to a cached shared library; returns its path."""
    return build_source(_source.kernel_path(family), sanitize, debug)


def build_source(src, sanitize: bool = False, debug: bool = False) -> Path:
    """Compile a ``.cu`` file (which may include the kernel headers) to a cached shared library.

    Nothing is compiled when a library for the same sources, flags and compiler is
    already cached. Concurrent builds are safe: each writes a temporary file and
    renames it into place.
    """
    src = Path(src)
    cxx = compiler()
    flags = compile_flags(sanitize, debug)
    key = "\0".join([_compiler_version(cxx), " ".join(flags), _source.sources_digest(), src.read_text()])
    lib = cache_dir() / f"{src.stem}-{hashlib.sha256(key.encode()).hexdigest()[:20]}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        proc = subprocess.run([cxx, *flags, str(src), "-o", tmp], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {src.name} failed:\n{cxx} {' '.join(flags)} {src}\n{proc.stderr}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _ctype(arg):
    """A kernel argument as ctypes sees it: arrays by data pointer, scalars by exact type."""
    if isinstance(arg, np.ndarray):
        return ctypes.c_void_p(arg.ctypes.data)
    for np_type, c_type in (
        (np.int32, ctypes.c_int32),
        (np.int64, ctypes.c_int64),
        (np.float32, ctypes.c_float),
        (np.float64, ctypes.c_double),
    ):
        if isinstance(arg, np_type):
            return c_type(arg)
    raise TypeError(f"kernel arguments must be NumPy arrays or typed NumPy scalars, got {type(arg).__name__}")


class CpuOps(KernelOps):
    """The kernels on the CPU: ``roilib.cuda._host.KernelOps`` with a ctypes ``launch``."""

    xp = np

    def __init__(self, sanitize: bool = False, debug: bool = False, launch_shape=None):
        """``launch_shape=(blocks, threads)`` replays a GPU launch of that shape thread by
        thread (each walks its own share of the grid-stride loop) instead of one thread
        walking everything: slower, and only for tests of the loops' indexing."""
        self.sanitize = sanitize
        self.debug = debug
        self.launch_shape = launch_shape
        self._libraries = {}

    def library(self, family: str) -> ctypes.CDLL:
        """The loaded library of an op family (built on first use)."""
        if family not in self._libraries:
            self._libraries[family] = ctypes.CDLL(str(build(family, self.sanitize, self.debug)))
        return self._libraries[family]

    def launch(self, family, kernel, dtype, n, *args):
        library = self.library(family)
        fn = getattr(library, f"{family}_{kernel}_{_SUFFIX[np.dtype(dtype)]}")
        fn.restype = None
        # The arrays stay referenced by `args` until the call returns.
        c_args = [ctypes.c_longlong(n), *[_ctype(a) for a in args]]
        if self.launch_shape is None:
            fn(*c_args)
            return
        blocks, threads = self.launch_shape
        try:
            for b in range(blocks):
                for t in range(threads):
                    library.roilib_cpu_set_thread(b, t, blocks, threads)
                    fn(*c_args)
        finally:
            library.roilib_cpu_set_thread(0, 0, 1, 1)


_ops = CpuOps(sanitize=_env_flag("ROILIB_CPU_SANITIZE"), debug=_env_flag("ROILIB_CPU_DEBUG"))

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
