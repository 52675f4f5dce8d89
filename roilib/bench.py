"""``python -m roilib.bench``: roilib against torchvision's ops, measured in one run.

Workload (the shape of a common RoIAlign tutorial example): a ``1 x 256 x 200 x 272`` float32 map, 715 seeded
random boxes inside an ``800 x 1088`` image, ``7 x 7`` output, ``spatial_scale = 1/4``;
RoIAlign with ``aligned=True`` and ``sampling_ratio`` 2 and -1, and RoIPool on the same
boxes. Forward and backward (gradient for the input).

Each measurement runs in a fresh worker process so that its peak memory can be read on
its own: the worker builds the inputs, resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``), runs the op once, and reports ``VmHWM - VmRSS`` as the extra
peak memory; then it times ``--repeat`` further calls and reports the best and median.
The ratio is roilib's best time over torchvision's (below 1 means roilib is faster).
Thread counts are pinned (``--threads``, default 1: torchvision's CPU RoI kernels run on
one thread) through the usual environment variables before NumPy or torch load.

torchvision is optional: without it only roilib's column is printed.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Dict, List, Optional

IMAGE_HW = (800, 1088)
MAP_SHAPE = (1, 256, 200, 272)
N_BOXES = 715
OUTPUT_SIZE = 7
SPATIAL_SCALE = 0.25
SEED = 2024

#: (label, op, keyword arguments) of every row in the table
CASES = [
    ("roi_align sr=2 aligned", "roi_align", dict(sampling_ratio=2, aligned=True)),
    ("roi_align sr=-1 aligned", "roi_align", dict(sampling_ratio=-1, aligned=True)),
    ("roi_pool", "roi_pool", dict()),
]


def benchmark_boxes(n: int, image_hw=IMAGE_HW, seed: int = SEED):
    """``n`` boxes ``[0, x1, y1, x2, y2]`` inside the image, float32.

    Centres are uniform over the image; widths and heights are log-uniform between 16
    and 512 pixels, clipped to the image, so small and large proposals both appear.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    h, w = image_hw
    cx, cy = rng.uniform(0, w, n), rng.uniform(0, h, n)
    bw, bh = np.exp(rng.uniform(np.log(16), np.log(512), (2, n)))
    boxes = np.stack(
        [np.zeros(n), np.clip(cx - bw / 2, 0, w), np.clip(cy - bh / 2, 0, h), np.clip(cx + bw / 2, 0, w), np.clip(cy + bh / 2, 0, h)],
        axis=1,
    )
    return boxes.astype(np.float32)


def _inputs():
    import numpy as np

    rng = np.random.default_rng(SEED)
    x = rng.standard_normal(MAP_SHAPE, dtype=np.float32)
    g = rng.standard_normal((N_BOXES, MAP_SHAPE[1], OUTPUT_SIZE, OUTPUT_SIZE), dtype=np.float32)
    return x, benchmark_boxes(N_BOXES), g


def _memory_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} missing from /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _runner(impl: str, op: str, kwargs: dict, backward: bool):
    """A zero-argument callable doing one measured call, plus its result as NumPy."""
    if op in _FAMILY_RUNNERS:  # FPN and R-FCN workloads (issue 11)
        return _FAMILY_RUNNERS[op](impl, kwargs, backward)
    import numpy as np

    x, rois, g = _inputs()
    if impl == "roilib":
        import roilib

        if backward:
            fn = getattr(roilib, op + "_backward")
            return lambda: fn(g, x, rois, OUTPUT_SIZE, SPATIAL_SCALE, **kwargs)
        fn = getattr(roilib, op)
        return lambda: fn(x, rois, OUTPUT_SIZE, SPATIAL_SCALE, **kwargs)
    import torch
    import torchvision.ops

    fn = getattr(torchvision.ops, op)
    xt, rt, gt = torch.from_numpy(x), torch.from_numpy(rois), torch.from_numpy(g)
    if not backward:

        def forward():
            with torch.no_grad():
                return fn(xt, rt, OUTPUT_SIZE, SPATIAL_SCALE, **kwargs).numpy()

        return forward

    def backward_only():
        leaf = xt.clone().requires_grad_(True)
        out = fn(leaf, rt, OUTPUT_SIZE, SPATIAL_SCALE, **kwargs)
        start = time.perf_counter()
        out.backward(gt)
        backward_only.elapsed = time.perf_counter() - start
        return leaf.grad.numpy()

    backward_only.times_itself = True
    return backward_only


def _worker(impl: str, case: int, backward: bool, repeat: int) -> dict:
    label, op, kwargs = CASES[case]
    run = _runner(impl, op, kwargs, backward)
    import numpy as np

    before = _memory_kib("VmRSS")
    peak_known = _reset_peak()
    result = run()
    peak = (_memory_kib("VmHWM") - before) / 1024 if peak_known else float("nan")
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        times.append(getattr(run, "elapsed", elapsed) if getattr(run, "times_itself", False) else elapsed)
    digest = float(np.asarray(result, dtype=np.float64).sum())
    return dict(best=min(times), median=float(np.median(times)), peak_mib=peak, checksum=digest)


def _thread_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(threads)
    return env


def _measure(impl: str, case: int, backward: bool, repeat: int, threads: int) -> Optional[dict]:
    cmd = [sys.executable, "-m", "roilib.bench", "--worker", impl, str(case), str(int(backward)), "--repeat", str(repeat)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_thread_env(threads))
    if proc.returncode != 0:
        sys.stderr.write(f"{impl} {CASES[case][0]} failed:\n{proc.stderr}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _have_torchvision() -> bool:
    try:
        import torchvision.ops  # noqa: F401
    except Exception:
        return False
    return True


def run_cpu(repeat: int, threads: int, only: Optional[str] = None) -> List[dict]:
    """Measure every case on the CPU (those whose label contains ``only``, if given)."""
    peers = ["roilib"] + (["torchvision"] if _have_torchvision() else [])
    rows = []
    for case, (label, _, _) in enumerate(CASES):
        if only and only not in label:
            continue
        for backward in (False, True):
            row = dict(case=label, pass_="backward" if backward else "forward")
            for impl in peers:
                row[impl] = _measure(impl, case, backward, repeat, threads)
            rows.append(row)
    return rows


def format_table(rows: List[dict]) -> str:
    """The rows as a fixed-width text table."""
    head = f"{'op':<26}{'pass':<10}{'roilib ms':>11}{'torchvision ms':>16}{'ratio':>8}{'roilib MiB':>12}{'tv MiB':>9}{'|sum diff|':>12}"
    lines = [head, "-" * len(head)]
    for row in rows:
        ours, peer = row.get("roilib"), row.get("torchvision")
        ours_ms = f"{ours['best'] * 1e3:11.1f}" if ours else f"{'failed':>11}"
        peer_ms = f"{peer['best'] * 1e3:16.1f}" if peer else f"{'-':>16}"
        ratio = f"{ours['best'] / peer['best']:8.2f}" if ours and peer else f"{'-':>8}"
        ours_mem = f"{ours['peak_mib']:12.0f}" if ours else f"{'-':>12}"
        peer_mem = f"{peer['peak_mib']:9.0f}" if peer else f"{'-':>9}"
        diff = f"{abs(ours['checksum'] - peer['checksum']):12.2e}" if ours and peer else f"{'-':>12}"
        lines.append(f"{row['case']:<26}{row['pass_']:<10}{ours_ms}{peer_ms}{ratio}{ours_mem}{peer_mem}{diff}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roilib.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (best is reported)")
    parser.add_argument("--threads", type=int, default=1, help="threads for NumPy's BLAS and torch")
    parser.add_argument(
        "--determinism", action="store_true",
        help="time the kernels' deterministic backward against the atomic one (CPU build)",
    )
    parser.add_argument("--only", help="measure only the rows whose label contains this text")
    parser.add_argument("--worker", nargs=3, metavar=("IMPL", "CASE", "BACKWARD"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        impl, case, backward = args.worker
        if impl == "torchvision":
            import torch

            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(_worker(impl, int(case), bool(int(backward)), args.repeat)))
        return 0
    if args.determinism:
        from .cuda import bench_determinism

        return bench_determinism.main(args.repeat)
    if args.device == "cuda":
        from .cuda import bench_gpu

        return bench_gpu.main(args)
    print(
        f"roilib.bench: CPU, {args.threads} thread(s), best of {args.repeat}; input {'x'.join(map(str, MAP_SHAPE))} float32, "
        f"{N_BOXES} boxes in a {IMAGE_HW[0]}x{IMAGE_HW[1]} image, output {OUTPUT_SIZE}x{OUTPUT_SIZE}, scale 1/{int(1 / SPATIAL_SCALE)}"
    )
    if not _have_torchvision():
        print("torchvision is not importable: showing roilib alone")
    print(FAMILY_WORKLOADS)
    print(format_table(run_cpu(args.repeat, args.threads, args.only)))
    print("ratio = roilib / torchvision best time (< 1: roilib faster); MiB = extra peak resident memory of one call;")
    print("|sum diff| = difference of the two results' sums (a check that both computed the same thing)")
    print("(ps_roi_pool backward: roilib's is the forward's exact transpose; torchvision's clips bins to the map size,")
    print(" not size - 1 as its forward does, so the sums differ where boxes reach the last row or column)")
    return 0


# -- FPN (multiscale RoIAlign) and R-FCN (position-sensitive) workloads ------------------

#: P2-P5 of an 800 x 1088 image (strides 4-32), 256 channels, 1000 boxes, 7 x 7
FPN_STRIDES = (4, 8, 16, 32)
FPN_CHANNELS = 256
FPN_BOXES = 1000
#: R-FCN's score maps: 21 classes x 7 x 7 channels at stride 16, 300 boxes, 7 x 7
RFCN_CLASSES = 21
RFCN_BOXES = 300
RFCN_SCALE = 1 / 16

FAMILY_WORKLOADS = (
    f"multiscale rows: P2-P5 (strides {'/'.join(map(str, FPN_STRIDES))}) of {IMAGE_HW[0]}x{IMAGE_HW[1]}, "
    f"{FPN_CHANNELS} channels, {FPN_BOXES} boxes, 7x7, sampling_ratio 2, vs torchvision.ops.MultiScaleRoIAlign\n"
    f"ps rows: 1x{RFCN_CLASSES * 49}x{IMAGE_HW[0] // 16}x{IMAGE_HW[1] // 16} ({RFCN_CLASSES} classes x 7x7), "
    f"{RFCN_BOXES} boxes, 7x7, scale 1/16"
)

CASES += [
    ("multiscale_roi_align sr=2", "multiscale_roi_align", dict(sampling_ratio=2)),
    ("ps_roi_align sr=2", "ps_roi_align", dict(sampling_ratio=2)),
    ("ps_roi_pool", "ps_roi_pool", dict()),
]


def _fpn_inputs():
    import numpy as np

    rng = np.random.default_rng(SEED)
    maps = [
        rng.standard_normal((1, FPN_CHANNELS, IMAGE_HW[0] // s, IMAGE_HW[1] // s), dtype=np.float32) for s in FPN_STRIDES
    ]
    g = rng.standard_normal((FPN_BOXES, FPN_CHANNELS, OUTPUT_SIZE, OUTPUT_SIZE), dtype=np.float32)
    return maps, benchmark_boxes(FPN_BOXES), g


def _multiscale_runner(impl: str, kwargs: dict, backward: bool):
    import numpy as np

    maps, rois, g = _fpn_inputs()
    scales = [1.0 / s for s in FPN_STRIDES]
    if impl == "roilib":
        import roilib

        if backward:
            def run():
                grads = roilib.multiscale_roi_align_backward(g, maps, rois, OUTPUT_SIZE, scales, **kwargs)
                return np.concatenate([a.ravel() for a in grads])

            return run
        return lambda: roilib.multiscale_roi_align(maps, rois, OUTPUT_SIZE, scales, **kwargs)
    from collections import OrderedDict

    import torch
    import torchvision.ops

    names = [f"p{int(np.log2(s))}" for s in FPN_STRIDES]
    pooler = torchvision.ops.MultiScaleRoIAlign(names, OUTPUT_SIZE, kwargs["sampling_ratio"])
    feats = OrderedDict((n, torch.from_numpy(m)) for n, m in zip(names, maps))
    boxes, shapes, gt = [torch.from_numpy(rois[:, 1:])], [IMAGE_HW], torch.from_numpy(g)
    if not backward:

        def forward():
            with torch.no_grad():
                return pooler(feats, boxes, shapes).numpy()

        return forward

    def backward_only():
        leaves = OrderedDict((n, t.clone().requires_grad_(True)) for n, t in feats.items())
        out = pooler(leaves, boxes, shapes)
        start = time.perf_counter()
        out.backward(gt)
        backward_only.elapsed = time.perf_counter() - start
        return np.concatenate([t.grad.numpy().ravel() for t in leaves.values()])

    backward_only.times_itself = True
    return backward_only


def _ps_runner(op: str):
    def runner(impl: str, kwargs: dict, backward: bool):
        import numpy as np

        rng = np.random.default_rng(SEED)
        h, w = IMAGE_HW[0] // 16, IMAGE_HW[1] // 16
        x = rng.standard_normal((1, RFCN_CLASSES * OUTPUT_SIZE * OUTPUT_SIZE, h, w), dtype=np.float32)
        rois = benchmark_boxes(RFCN_BOXES)
        g = rng.standard_normal((RFCN_BOXES, RFCN_CLASSES, OUTPUT_SIZE, OUTPUT_SIZE), dtype=np.float32)
        if impl == "roilib":
            import roilib

            if backward:
                fn = getattr(roilib, op + "_backward")
                return lambda: fn(g, x, rois, OUTPUT_SIZE, RFCN_SCALE, **kwargs)
            fn = getattr(roilib, op)
            return lambda: fn(x, rois, OUTPUT_SIZE, RFCN_SCALE, **kwargs)
        import torch
        import torchvision.ops

        fn = getattr(torchvision.ops, op)
        xt, rt, gt = torch.from_numpy(x), torch.from_numpy(rois), torch.from_numpy(g)
        if not backward:

            def forward():
                with torch.no_grad():
                    return fn(xt, rt, OUTPUT_SIZE, RFCN_SCALE, **kwargs).numpy()

            return forward

        def backward_only():
            leaf = xt.clone().requires_grad_(True)
            out = fn(leaf, rt, OUTPUT_SIZE, RFCN_SCALE, **kwargs)
            start = time.perf_counter()
            out.backward(gt)
            backward_only.elapsed = time.perf_counter() - start
            return leaf.grad.numpy()

        backward_only.times_itself = True
        return backward_only

    return runner


_FAMILY_RUNNERS = {
    "multiscale_roi_align": _multiscale_runner,
    "ps_roi_align": _ps_runner("ps_roi_align"),
    "ps_roi_pool": _ps_runner("ps_roi_pool"),
}


if __name__ == "__main__":
    sys.exit(main())
