"""``python -m roilib.bench --determinism``: the deterministic backward's cost.

Times the kernels' CPU build (one thread, the exact kernel text a GPU runs) on the
benchmark's boxes (715 boxes in an 800 x 1088 image, a 200 x 272 map at scale 1/4,
7 x 7 output) with 16 channels, for every op with a backward: the atomic scatter and
the tiled deterministic gather, best of ``repeat`` calls, and their ratio. It also
checks that the two gradients are bitwise equal, which they must be on the CPU build
(one thread adds in the same order as the gather; see ``sampling.cuh``).
"""
from __future__ import annotations

import time
from typing import List

import numpy as np

CHANNELS = 16

#: (label, op, keyword arguments)
CASES = [
    ("roi_align avg sr=2", "roi_align", dict(sampling_ratio=2, aligned=True, mode="avg")),
    ("roi_align avg sr=-1", "roi_align", dict(sampling_ratio=-1, aligned=True, mode="avg")),
    ("roi_align max sr=2", "roi_align", dict(sampling_ratio=2, aligned=True, mode="max")),
    ("roi_warp", "roi_warp", dict()),
    ("roi_pool", "roi_pool", dict()),
    ("spp (4, 2, 1) max", "spp", dict(levels=(4, 2, 1), mode="max")),
    ("spp (4, 2, 1) avg", "spp", dict(levels=(4, 2, 1), mode="avg")),
]


def _best(fn, repeat: int) -> float:
    fn()  # builds the library on first use
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(repeat: int = 3) -> List[dict]:
    """One row per case: atomic and deterministic seconds, ratio, bitwise equality."""
    from .. import bench
    from . import cpu

    rng = np.random.default_rng(bench.SEED)
    shape = (bench.MAP_SHAPE[0], CHANNELS) + tuple(bench.MAP_SHAPE[2:])
    x = rng.standard_normal(shape).astype(np.float32)
    rois = bench.benchmark_boxes(bench.N_BOXES)
    rows = []
    for label, op, kw in CASES:
        if op == "spp":
            args = (x,)
        else:
            args = (x, rois, bench.OUTPUT_SIZE, bench.SPATIAL_SCALE)
        out = getattr(cpu, op)(*args, **kw)
        g = rng.standard_normal(out.shape).astype(np.float32)
        backward = getattr(cpu, op + "_backward")
        grads = {}

        def call(deterministic):
            grads[deterministic] = backward(g, *args, deterministic=deterministic, **kw)

        atomic = _best(lambda: call(False), repeat)
        gather = _best(lambda: call(True), repeat)
        rows.append(
            dict(case=label, atomic=atomic, deterministic=gather, ratio=gather / atomic,
                 bitwise=grads[True].tobytes() == grads[False].tobytes())
        )  # fmt: skip
    return rows


def format_table(rows: List[dict]) -> str:
    head = f"{'op':<22}{'atomic ms':>11}{'deterministic ms':>18}{'ratio':>8}{'bitwise equal':>15}"
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r['case']:<22}{r['atomic'] * 1e3:11.1f}{r['deterministic'] * 1e3:18.1f}{r['ratio']:8.2f}"
            f"{str(r['bitwise']):>15}"
        )
    return "\n".join(lines)


def main(repeat: int) -> int:
    from .. import bench

    print(
        f"roilib.bench --determinism: kernels' CPU build, 1 thread, best of {repeat}; input "
        f"1x{CHANNELS}x{bench.MAP_SHAPE[2]}x{bench.MAP_SHAPE[3]} float32, {bench.N_BOXES} boxes, "
        f"output {bench.OUTPUT_SIZE}x{bench.OUTPUT_SIZE}, scale 1/{int(1 / bench.SPATIAL_SCALE)}"
    )
    print(format_table(run(repeat)))
    print("ratio = deterministic / atomic backward time")
    return 0
