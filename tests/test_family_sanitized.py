"""The PS-RoIPool/PS-RoIAlign and multiscale kernels under AddressSanitizer and UBSan.

Same setup as tests/test_kernels_cpu.py's sanitizer test (a subprocess with the ASan
runtime preloaded), on boxes inside, across and far outside the maps, tiny, zero-size,
inverted and huge, in every dtype.
"""
import os
import subprocess
import sys

import pytest

from test_kernels_cpu import _sanitizer_runtime  # same directory; pytest puts it on sys.path

SCRIPT = """
import numpy as np
from roilib.cuda import cpu
from test_kernels_cpu import make_rois

assert cpu._ops.sanitize
rng = np.random.default_rng(0)
for dtype in (np.float16, np.float32, np.float64):
    rois = make_rois(rng, 2, 11, 13, 0.5)
    rois = np.concatenate([rois, [[1, 1e4, 1e4, 2e4, 2e4]]])  # far outside every map
    x = rng.standard_normal((2, 12, 11, 13)).astype(dtype)
    for op, kw in [("ps_roi_pool", {}), ("ps_roi_align", dict(sampling_ratio=-1)),
                   ("ps_roi_align", dict(sampling_ratio=2))]:
        out = getattr(cpu, op)(x, rois, (3, 2), 0.5, **kw)
        getattr(cpu, op + "_backward")(np.ones_like(out), x, rois, (3, 2), 0.5, **kw)
    maps = [rng.standard_normal((2, 3, 64 // s, 96 // s)).astype(dtype) for s in (4, 8, 16)]
    boxes = rois * np.array([1, 8, 8, 8, 8])
    for sr, aligned in ((2, False), (-1, True)):
        out = cpu.multiscale_roi_align(maps, boxes, (2, 3), (0.25, 0.125, 0.0625), sr, aligned=aligned)
        cpu.multiscale_roi_align_backward(np.ones_like(out), maps, boxes, (2, 3), (0.25, 0.125, 0.0625), sr,
                                          aligned=aligned)
print("sanitized run ok")
"""


def test_family_kernels_under_address_and_undefined_behaviour_sanitizers():
    runtime = _sanitizer_runtime()
    if runtime is None:
        pytest.skip("the C++ compiler has no AddressSanitizer/UBSan runtime")
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(
        os.environ,
        ROILIB_CPU_SANITIZE="1",
        LD_PRELOAD=runtime,
        ASAN_OPTIONS="detect_leaks=0:abort_on_error=0:halt_on_error=1",
        UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
        PYTHONPATH=os.pathsep.join([os.path.dirname(here), here, os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    report = proc.stdout + proc.stderr
    assert proc.returncode == 0, report[-5000:]
    assert "AddressSanitizer" not in report and "runtime error" not in report, report[-5000:]
    assert "sanitized run ok" in proc.stdout
