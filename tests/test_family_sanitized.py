"""The PS-RoIPool/PS-RoIAlign and multiscale kernels under AddressSanitizer and UBSan.

Same setup as tests/test_kernels_cpu.py's sanitizer test (a subprocess with the ASan
runtime preloaded), on boxes inside, across and far outside the maps, tiny, zero-size,
inverted and huge, in every dtype.
"""
from test_kernels_cpu import run_sanitized  # same directory; pytest puts it on sys.path

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
    run_sanitized(SCRIPT)
