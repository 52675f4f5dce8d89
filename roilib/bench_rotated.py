"""``python -m roilib.bench_rotated``: rotated RoIAlign and PrRoIPool against RoIAlign.

Neither detectron2 nor mmcv installs here (no wheels for this torch; building them is out
of reach), so each new op is measured against the op whose cost it should be close to,
on the same workload as ``python -m roilib.bench`` (a ``1 x 256 x 200 x 272`` float32
map, 715 seeded boxes in an ``800 x 1088`` image, ``7 x 7`` output, scale 1/4):

* ``roi_align_rotated`` on the benchmark boxes written as ``[b, cx, cy, w, h, angle]``,
  at angle 0 and at random angles, against ``roi_align(aligned=True)`` on the boxes
  themselves with the same ``sampling_ratio``: the same number of bilinear samples, so
  the ratio shows what the rotation costs;
* ``prroi_pool`` against ``roi_align(aligned=False, sampling_ratio=2)`` (the sampled
  approximation of the same integral), and its box gradient against RoIAlign's.

Both implementations are measured: the NumPy reference and the CUDA kernels' text built
for the CPU (``roilib.cuda.cpu``, one thread). Each measurement runs in a fresh worker
process that times the new op and its baseline alternately, so that both see the same
machine load; ``--rounds`` such processes run per row, and the table shows the median
round's best times and the ratio new op / baseline (below 1: the new op is faster),
followed by every round's ratio.

``--device cuda`` runs the same comparisons with the CUDA kernels on a GPU (CuPy), timed
with CUDA events (median of ``--repeat``, at least 10), atomic backward for both ops.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import List, Optional

from .bench import MAP_SHAPE, N_BOXES, OUTPUT_SIZE, SPATIAL_SCALE, _inputs, _thread_env

#: (label, (op, pass, kwargs, boxes), (baseline op, pass, kwargs, boxes))
#: pass is "forward", "backward" (input gradient) or "rois" (box gradient);
#: boxes is "axis" (the (K, 5) benchmark boxes), "rotated0" or "rotated" (random angles)
CASES = [
    ("roi_align_rotated sr=2, angle 0", ("roi_align_rotated", dict(sampling_ratio=2), "rotated0"),
     ("roi_align", dict(sampling_ratio=2, aligned=True), "axis")),
    ("roi_align_rotated sr=2, random angle", ("roi_align_rotated", dict(sampling_ratio=2), "rotated"),
     ("roi_align", dict(sampling_ratio=2, aligned=True), "axis")),
    ("roi_align_rotated sr=-1, random angle", ("roi_align_rotated", dict(sampling_ratio=-1), "rotated"),
     ("roi_align", dict(sampling_ratio=-1, aligned=True), "axis")),
    ("prroi_pool vs roi_align sr=2", ("prroi_pool", {}, "axis"),
     ("roi_align", dict(sampling_ratio=2, aligned=False), "axis")),
    ("prroi_pool vs roi_align sr=-1", ("prroi_pool", {}, "axis"),
     ("roi_align", dict(sampling_ratio=-1, aligned=False), "axis")),
]  # fmt: skip
PASSES = ("forward", "backward", "rois")
IMPLS = ("reference", "kernels-cpu")


def rotated_boxes(angle: Optional[float] = 0.0):
    """The benchmark boxes as ``[b, cx, cy, w, h, angle]``; ``angle=None``: seeded random angles."""
    import numpy as np

    _, rois, _ = _inputs()
    centre = (rois[:, 1:3] + rois[:, 3:5]) / 2
    size = rois[:, 3:5] - rois[:, 1:3]
    if angle is None:
        angles = np.random.default_rng(7).uniform(-180, 180, len(rois))
    else:
        angles = np.full(len(rois), angle)
    return np.concatenate([rois[:, :1], centre, size, angles[:, None]], axis=1).astype(np.float32)


def _runner(impl: str, op: str, kwargs: dict, boxes: str, pass_: str):
    x, rois, g = _inputs()
    if boxes != "axis":
        rois = rotated_boxes(0.0 if boxes == "rotated0" else None)
    if impl == "reference":
        import roilib as module
    else:
        from .cuda import cpu as module
    extra = {}
    if impl == "kernels-cpu" and pass_ == "backward":
        extra["deterministic"] = False  # the new ops have only the atomic kernel: compare like with like
    name = {"forward": op, "backward": op + "_backward", "rois": op + "_rois_backward"}[pass_]
    fn = getattr(module, name)
    if pass_ == "forward":
        return lambda: fn(x, rois, OUTPUT_SIZE, SPATIAL_SCALE, **kwargs)
    return lambda: fn(g, x, rois, OUTPUT_SIZE, SPATIAL_SCALE, **kwargs, **extra)


def _worker(impl: str, case: int, pass_: str, repeat: int) -> dict:
    """Time the new op and its baseline in one process, alternating, ``repeat`` times each."""
    (_, new, base) = CASES[case]
    runs = [_runner(impl, *new, pass_), _runner(impl, *base, pass_)]
    for run in runs:
        run()  # warm-up: builds or loads the kernel library
    times = [[], []]
    for _ in range(repeat):
        for which, run in enumerate(runs):
            start = time.perf_counter()
            run()
            times[which].append(time.perf_counter() - start)
    return dict(new=min(times[0]), base=min(times[1]))


def _measure(impl, case, pass_, repeat, threads) -> Optional[dict]:
    cmd = [sys.executable, "-m", "roilib.bench_rotated", "--worker", impl, str(case), pass_,
           "--repeat", str(repeat)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_thread_env(threads))
    if proc.returncode != 0:
        sys.stderr.write(f"{impl} {CASES[case][0]} {pass_} failed:\n{proc.stderr}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def rows(impls, passes, repeat: int, threads: int, rounds: int = 1) -> List[dict]:
    """Measure every case, pass and implementation ``rounds`` times; the table rows.

    Each round is one worker process timing both ops alternately; the row keeps every
    round's ratio and reports the best times of the round with the median ratio.
    """
    out = []
    for case, (label, new, _) in enumerate(CASES):
        for pass_ in passes:
            for impl in impls:
                got = [m for m in (_measure(impl, case, pass_, repeat, threads) for _ in range(rounds)) if m]
                got.sort(key=lambda m: m["new"] / m["base"])
                median = got[len(got) // 2] if got else None
                ratios = [m["new"] / m["base"] for m in got]
                out.append(dict(case=label, pass_=pass_, impl=impl, times=median, ratios=ratios))
    return out


def format_table(table: List[dict]) -> str:
    head = f"{'case':<38}{'pass':<10}{'impl':<13}{'new op ms':>11}{'baseline ms':>13}{'ratio':>8}  ratios of all rounds"
    lines = [head, "-" * len(head)]
    for row in table:
        t = row["times"]
        if not t:
            lines.append(f"{row['case']:<38}{row['pass_']:<10}{row['impl']:<13}{'failed':>11}")
            continue
        every = " ".join(f"{r:.2f}" for r in row["ratios"])
        lines.append(
            f"{row['case']:<38}{row['pass_']:<10}{row['impl']:<13}{t['new'] * 1e3:11.1f}{t['base'] * 1e3:13.1f}"
            f"{t['new'] / t['base']:8.2f}  {every}"
        )
    return "\n".join(lines)


def run_cuda(repeat: int) -> int:
    """The same comparisons on a GPU (``--device cuda``): CUDA-event medians, atomic backward.

    The map is placed on the device once; each op and its baseline run on the same
    stream, alternately, ``repeat`` times after a warm-up.
    """
    from .cuda import bench_gpu, gpu

    cp = gpu._cupy()
    x, rois, g = _inputs()
    xd, gd = cp.asarray(x), cp.asarray(g)
    boxes = {"axis": cp.asarray(rois), "rotated0": cp.asarray(rotated_boxes(0.0)), "rotated": cp.asarray(rotated_boxes(None))}

    def call(op, kwargs, box, pass_):
        name = {"forward": op, "backward": op + "_backward", "rois": op + "_rois_backward"}[pass_]
        fn = getattr(gpu, name)
        extra = dict(deterministic=False) if pass_ == "backward" else {}
        if pass_ == "forward":
            return lambda: fn(xd, boxes[box], OUTPUT_SIZE, SPATIAL_SCALE, **kwargs)
        return lambda: fn(gd, xd, boxes[box], OUTPUT_SIZE, SPATIAL_SCALE, **kwargs, **extra)

    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    print(f"roilib.bench_rotated --device cuda on {name}; median of {repeat}; workload as on the CPU")
    head = f"{'case':<38}{'pass':<10}{'new op ms':>11}{'baseline ms':>13}{'ratio':>8}"
    print(head)
    print("-" * len(head))
    for label, new, base in CASES:
        for pass_ in PASSES:
            t_new = bench_gpu._time(cp, call(new[0], new[1], new[2], pass_), repeat)
            t_base = bench_gpu._time(cp, call(base[0], base[1], base[2], pass_), repeat)
            print(f"{label:<38}{pass_:<10}{t_new * 1e3:11.3f}{t_base * 1e3:13.3f}{t_new / t_base:8.2f}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roilib.bench_rotated", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeat", type=int, default=3, help="timed calls per measurement (best is reported)")
    parser.add_argument("--threads", type=int, default=1, help="threads for NumPy's BLAS")
    parser.add_argument("--impl", choices=IMPLS, action="append", help="implementations to measure (default: both)")
    parser.add_argument("--pass", dest="passes", choices=PASSES, action="append", help="passes (default: all)")
    parser.add_argument("--rounds", type=int, default=3, help="worker processes per row (the median ratio is shown)")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "CASE", "PASS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        impl, case, pass_ = args.worker
        print(json.dumps(_worker(impl, int(case), pass_, args.repeat)))
        return 0
    if args.device == "cuda":
        return run_cuda(max(args.repeat, 10))
    print(
        f"roilib.bench_rotated: CPU, {args.threads} thread(s), best of {args.repeat}; input "
        f"{'x'.join(map(str, MAP_SHAPE))} float32, {N_BOXES} boxes, output {OUTPUT_SIZE}x{OUTPUT_SIZE}, "
        f"scale 1/{int(1 / SPATIAL_SCALE)}; {args.rounds} round(s), ops alternating within each"
    )
    table = rows(args.impl or list(IMPLS), args.passes or list(PASSES), args.repeat, args.threads, args.rounds)
    print(format_table(table))
    print("ratio = new op / baseline best time on the same boxes, median round (< 1: the new op is faster); backward =")
    print("input gradient (kernels: the atomic kernel for both); rois = box gradient")
    return 0


if __name__ == "__main__":
    sys.exit(main())
