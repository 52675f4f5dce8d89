"""``python -m roilib.bench``: roilib against torchvision's ops, measured in one run.

Workload (the shape of a common RoIAlign tutorial example): a ``1 x 256 x 200 x 272``
float32 map, seeded random boxes inside an ``800 x 1088`` image (715 and 16 of them),
``7 x 7`` output, ``spatial_scale = 1/4``. Every op, forward and backward (gradient for
the input), each against its nearest torchvision peer:

* ``roi_align`` (``aligned=True``, ``sampling_ratio`` 2 and -1) and ``roi_pool``:
  ``torchvision.ops.roi_align`` / ``roi_pool`` with the same arguments;
* ``roi_pool +argmax``: ``roi_pool(..., return_argmax=True)``, the forward a training
  step runs (``roilib.torch`` keeps the argmax for the backward), against the same
  torchvision forward, which always finds its argmax. Forward only: the backward that
  uses the argmax is the ``roi_pool`` backward row;
* ``roi_warp`` (MNC's layer, ``sampling_ratio=2``): torchvision has no RoIWarp, so the
  peer is ``roi_align`` of the rounded boxes with sampling ratio 2, the same amount of
  bilinear work per bin;
* ``spp`` (levels 4, 2, 1, max): ``torch.nn.functional.adaptive_max_pool2d`` per level,
  flattened and concatenated (its bins are SPP-net's ``[floor(i a/n), ceil((i+1) a/n))``).
  SPP pools the whole map, so the number of boxes does not apply to it;
* ``ps_roi_align`` (``sampling_ratio=2``) and ``ps_roi_pool``: R-FCN's score maps (21 classes x
  7 x 7 channels, ``1 x 1029 x 50 x 68``, ``spatial_scale = 1/16``), the same numbers of boxes in
  the same image, against ``torchvision.ops.ps_roi_align`` / ``ps_roi_pool``;
* ``multiscale_roi_align``: FPN's P2-P5, a fixed 1000 boxes (printed with the first block).

Each measurement runs in a fresh worker process so that its peak memory can be read on
its own: the worker builds the inputs, resets the kernel's resident-set high-water mark
(``/proc/self/clear_refs``), runs the op once, and reports ``VmHWM - VmRSS`` as the extra
peak memory; then it times ``--repeat`` further calls, and more while they add up to
less than :data:`MIN_SECONDS` (at most :data:`MAX_CALLS`), so that a call of a fraction
of a millisecond is not judged on five samples of a shared machine's noise; it reports
the best and median.
The ratio is roilib's best time over torchvision's (below 1 means roilib is faster).
torchvision's backward is timed alone (``out.backward``); its forward saved what it needs.
Thread counts are pinned (``--threads``, default 1: torchvision's CPU RoI kernels run on
one thread) through the usual environment variables before NumPy or torch load.

``--scaling`` prints how each op's cost grows with the number of boxes (16 to 4096),
the channels (16 to 512) and the map size, one axis at a time from a base point, with
the ratio against torchvision at every point (``--json`` also writes the rows).

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
BOX_COUNTS = (715, 16)
OUTPUT_SIZE = 7
SPATIAL_SCALE = 0.25
SPP_LEVELS = (4, 2, 1)
SEED = 2024

#: (label, op, keyword arguments) of every row in the table
CASES = [
    ("roi_align sr=2 aligned", "roi_align", dict(sampling_ratio=2, aligned=True)),
    ("roi_align sr=-1 aligned", "roi_align", dict(sampling_ratio=-1, aligned=True)),
    ("roi_pool", "roi_pool", dict()),
    ("roi_pool +argmax", "roi_pool", dict(return_argmax=True)),
    ("roi_warp sr=2", "roi_warp", dict(sampling_ratio=2)),
    ("spp 4,2,1 max", "spp", dict(levels=SPP_LEVELS, mode="max")),
]
#: the cases the scaling table sweeps (indices into CASES; the R-FCN ops appended below
#: join them, sweeping only the number of boxes: their map is R-FCN's)
SCALING_CASES = (0, 2, 4, 5)
#: base point of the scaling sweeps and the values each axis takes
SCALING_BASE = dict(boxes=256, channels=256, map_hw=(200, 272))
SCALING_AXES = dict(
    boxes=(16, 64, 256, 1024, 4096),
    channels=(16, 64, 256, 512),
    map_hw=((50, 68), (100, 136), (200, 272)),
)


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
        [
            np.zeros(n),
            np.clip(cx - bw / 2, 0, w),
            np.clip(cy - bh / 2, 0, h),
            np.clip(cx + bw / 2, 0, w),
            np.clip(cy + bh / 2, 0, h),
        ],
        axis=1,
    )
    return boxes.astype(np.float32)


def _inputs(op: str, boxes: int, channels: int, map_hw):
    """Map, boxes (image = map / scale) and a seeded output gradient for ``op``."""
    import numpy as np

    rng = np.random.default_rng(SEED)
    x = rng.standard_normal((1, channels) + tuple(map_hw), dtype=np.float32)
    image_hw = tuple(int(round(a / SPATIAL_SCALE)) for a in map_hw)
    rois = benchmark_boxes(boxes, image_hw)
    if op == "spp":
        g_shape = (1, channels * sum(n * n for n in SPP_LEVELS))
    else:
        g_shape = (boxes, channels, OUTPUT_SIZE, OUTPUT_SIZE)
    g = rng.standard_normal(g_shape, dtype=np.float32)
    return x, rois, g


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


def _forward_only(kwargs: dict) -> bool:
    """Whether a case has no backward row of its own (``roi_pool +argmax``)."""
    return bool(kwargs.get("return_argmax"))


def _roilib_runner(op, kwargs, backward, x, rois, g):
    import roilib

    if op == "spp":
        args = (x,)
    else:
        args = (x, rois, OUTPUT_SIZE, SPATIAL_SCALE)
    if _forward_only(kwargs):
        if not backward:  # the maxima are compared with torchvision's
            return lambda: roilib.roi_pool(*args, return_argmax=True)[0]
        kwargs = {}  # the backward is roi_pool's
    if backward:
        fn = getattr(roilib, op + "_backward")
        if op == "roi_pool":
            # like torchvision's backward, use the argmax the forward found (not timed)
            _, argmax = roilib.roi_pool(*args, return_argmax=True)
            return lambda: fn(g, *args, argmax=argmax, **kwargs)
        return lambda: fn(g, *args, **kwargs)
    fn = getattr(roilib, op)
    return lambda: fn(*args, **kwargs)


def _torch_peer(op: str, kwargs: dict, rois):
    """``f(x_tensor) -> tensor``: torchvision's nearest equivalent of ``op``."""
    import numpy as np
    import torch
    import torchvision.ops

    if op == "spp":
        levels = kwargs["levels"]
        pool = torch.nn.functional.adaptive_max_pool2d
        return lambda xt: torch.cat([pool(xt, n).flatten(1) for n in levels], dim=1)
    if op == "roi_warp":
        from .geometry import quantize_boxes

        # RoIWarp's box is c_round(corner * s) on the map; roi_align then runs at scale 1
        rounded = np.concatenate([rois[:, :1], quantize_boxes(rois, SPATIAL_SCALE, np.float32)], axis=1)
        rt = torch.from_numpy(rounded.astype(np.float32))
        ratio = kwargs["sampling_ratio"]
        return lambda xt: torchvision.ops.roi_align(xt, rt, OUTPUT_SIZE, 1.0, ratio, False)
    fn = getattr(torchvision.ops, op)
    rt = torch.from_numpy(rois)
    kwargs = {} if _forward_only(kwargs) else kwargs  # torchvision's forward always finds its argmax
    return lambda xt: fn(xt, rt, OUTPUT_SIZE, SPATIAL_SCALE, **kwargs)


def _runner(impl: str, op: str, kwargs: dict, backward: bool, boxes: int, channels: int, map_hw):
    """A zero-argument callable doing one measured call."""
    if op in _FAMILY_RUNNERS:  # FPN rows: a fixed workload of their own
        return _FAMILY_RUNNERS[op](impl, kwargs, backward)
    if op in _PS_RUNNERS:  # R-FCN rows: their own map, this row's number of boxes
        return _PS_RUNNERS[op](impl, kwargs, backward, boxes)
    x, rois, g = _inputs(op, boxes, channels, map_hw)
    if impl == "roilib":
        return _roilib_runner(op, kwargs, backward, x, rois, g)
    import torch

    peer = _torch_peer(op, kwargs, rois)
    xt, gt = torch.from_numpy(x), torch.from_numpy(g)
    if not backward:

        def forward():
            with torch.no_grad():
                return peer(xt).numpy()

        return forward

    def backward_only():
        leaf = xt.clone().requires_grad_(True)
        out = peer(leaf)
        start = time.perf_counter()
        out.backward(gt)
        backward_only.elapsed = time.perf_counter() - start
        return leaf.grad.numpy()

    backward_only.times_itself = True
    return backward_only


#: a measurement keeps timing calls until they add up to this many seconds ...
MIN_SECONDS = 0.5
#: ... or it has timed this many (the calls after ``--repeat`` only refine the best)
MAX_CALLS = 200


def _timed_calls(run, repeat: int, min_seconds: float = MIN_SECONDS) -> List[float]:
    """Seconds of each timed call of ``run``: ``repeat`` of them, then more until they add
    up to ``min_seconds`` or number :data:`MAX_CALLS`."""
    times: List[float] = []
    while len(times) < repeat or (sum(times) < min_seconds and len(times) < MAX_CALLS):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        times.append(run.elapsed if getattr(run, "times_itself", False) else elapsed)
    return times


def _best_of(repeat: int) -> str:
    return f"best of {repeat} calls or more (at least {MIN_SECONDS:g} s, at most {MAX_CALLS} calls)"


def _worker(spec: dict) -> dict:
    _, op, kwargs = CASES[spec["case"]]
    run = _runner(spec["impl"], op, kwargs, spec["backward"], spec["boxes"], spec["channels"], spec["map_hw"])
    import numpy as np

    before = _memory_kib("VmRSS")
    peak_known = _reset_peak()
    result = run()
    peak = (_memory_kib("VmHWM") - before) / 1024 if peak_known else float("nan")
    times = _timed_calls(run, spec["repeat"], spec.get("min_seconds", MIN_SECONDS))
    digest = float(np.asarray(result, dtype=np.float64).sum())
    return dict(best=min(times), median=float(np.median(times)), peak_mib=peak, checksum=digest)


def measure_here(case: int, backward: bool, boxes: int, channels: int, map_hw, repeat: int = 3, impl: str = "roilib") -> dict:
    """Time one case in this process: best and median of ``repeat`` calls after a warm-up.

    For a quick look (the book's performance chapter runs it on small sizes); it reads
    no peak memory and does not pin threads, unlike the worker processes of the tables.
    """
    _, op, kwargs = CASES[case]
    run = _runner(impl, op, kwargs, backward, boxes, channels, map_hw)
    run()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        run()
        elapsed = time.perf_counter() - start
        times.append(run.elapsed if getattr(run, "times_itself", False) else elapsed)
    times.sort()
    return dict(best=times[0], median=times[len(times) // 2])


def quick_scaling(boxes=(4, 16, 64, 256), channels: int = 32, map_hw=(50, 68), cases=SCALING_CASES[:3], repeat: int = 3):
    """roilib alone over a few numbers of boxes on a small map, in this process: rows in
    :func:`run_scaling`'s format (axis ``boxes``), for :func:`roilib.plot.scaling_curves`."""
    rows = []
    for n in boxes:
        for case in cases:
            label, op, _ = CASES[case]
            for backward in (False, True):
                rows.append(dict(
                    axis="boxes", case=label, op=op, pass_="backward" if backward else "forward",
                    boxes=n, channels=channels, map_hw=list(map_hw),
                    roilib=measure_here(case, backward, n, channels, map_hw, repeat),
                ))
    return rows


def _thread_env(threads: int) -> Dict[str, str]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
        env[var] = str(threads)
    return env


def _measure(spec: dict, threads: int) -> Optional[dict]:
    cmd = [sys.executable, "-m", "roilib.bench", "--worker", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_thread_env(threads))
    if proc.returncode != 0:
        sys.stderr.write(f"{spec} failed:\n{proc.stderr}\n")
        return None
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _have_torchvision() -> bool:
    try:
        import torchvision.ops  # noqa: F401
    except Exception:
        return False
    return True


def _peers() -> List[str]:
    return ["roilib"] + (["torchvision"] if _have_torchvision() else [])


def _row(case: int, backward: bool, boxes: int, channels: int, map_hw, repeat: int, threads: int, peers) -> dict:
    label, op, _ = CASES[case]
    row = dict(
        case=label, op=op, pass_="backward" if backward else "forward",
        boxes=boxes, channels=channels, map_hw=list(map_hw),
    )
    for impl in peers:
        spec = dict(
            impl=impl, case=case, backward=backward, boxes=boxes,
            channels=channels, map_hw=list(map_hw), repeat=repeat,
        )
        row[impl] = _measure(spec, threads)
    return row


def run_cpu(repeat: int, threads: int, box_counts=BOX_COUNTS, only: Optional[str] = None) -> List[dict]:
    """Measure every case on the CPU for each number of boxes; return the table rows.

    SPP does not take boxes and the FPN rows have a workload of their own: they are
    measured once, in the first block. The R-FCN rows have their own map but this
    block's number of boxes. ``only``: just the cases whose label holds it.
    """
    peers = _peers()
    channels, map_hw = MAP_SHAPE[1], MAP_SHAPE[2:]
    rows = []
    for i, boxes in enumerate(box_counts):
        for case, (label, op, kwargs) in enumerate(CASES):
            if (op == "spp" or op in _FAMILY_RUNNERS) and i > 0:
                continue
            if only and only not in label:
                continue
            n = FPN_BOXES if op in _FAMILY_RUNNERS else boxes  # the row says what it ran
            for backward in (False,) if _forward_only(kwargs) else (False, True):
                rows.append(_row(case, backward, n, channels, map_hw, repeat, threads, peers))
    return rows


def _scaling_points():
    """(axis, boxes, channels, map_hw) of every point of the sweeps, base point included."""
    for axis, values in SCALING_AXES.items():
        for value in values:
            point = dict(SCALING_BASE, **{axis: value})
            yield axis, point["boxes"], point["channels"], tuple(point["map_hw"])


def scaling_points() -> List[tuple]:
    """``(axis, boxes, channels, map_hw)`` of every point of ``--scaling``."""
    return list(_scaling_points())


def run_scaling(repeat: int, threads: int, only: Optional[str] = None) -> List[dict]:
    """The scaling sweeps (see the module docstring); SPP only on channels and map size,
    the position-sensitive ops only on the number of boxes (on R-FCN's map). ``only``:
    just the cases whose label holds it."""
    peers = _peers()
    rows = []
    for axis, boxes, channels, map_hw in _scaling_points():
        for case in SCALING_CASES:
            label, op, _ = CASES[case]
            if (op == "spp" and axis == "boxes") or (op in _PS_RUNNERS and axis != "boxes"):
                continue
            if only and only not in label:
                continue
            for backward in (False, True):
                row = _row(case, backward, boxes, channels, map_hw, repeat, threads, peers)
                row["axis"] = axis
                rows.append(row)
    return rows


def _ratio(row: dict) -> Optional[float]:
    ours, peer = row.get("roilib"), row.get("torchvision")
    return ours["best"] / peer["best"] if ours and peer else None


def format_table(rows: List[dict], compact: bool = False) -> str:
    """The rows as a fixed-width text table.

    ``compact`` keeps the op, the times, their ratio and the memory ratio (under 80
    characters wide, for a book page), dropping the MiB columns and the checksum
    difference.
    """
    columns = [("roilib ms", 10), ("tv ms", 9), ("ratio", 7), ("roilib MiB", 11), ("tv MiB", 8),
               ("mem x", 7), ("|sum diff|", 11)]
    keep = [0, 1, 2, 5] if compact else list(range(len(columns)))
    op = max([24] + [len(row["case"]) + 1 for row in rows])
    head = f"{'op':<{op}}{'boxes':>6}  {'pass':<9}" + "".join(f"{columns[i][0]:>{columns[i][1]}}" for i in keep)
    lines = [head, "-" * len(head)]
    for row in rows:
        ours, peer = row.get("roilib"), row.get("torchvision")
        ratio = _ratio(row)
        boxes = "-" if row["op"] == "spp" else str(row["boxes"])
        cells = [
            f"{ours['best'] * 1e3:10.1f}" if ours else f"{'failed':>10}",
            f"{peer['best'] * 1e3:9.1f}" if peer else f"{'-':>9}",
            f"{ratio:7.2f}" if ratio is not None else f"{'-':>7}",
            f"{ours['peak_mib']:11.0f}" if ours else f"{'-':>11}",
            f"{peer['peak_mib']:8.0f}" if peer else f"{'-':>8}",
            f"{ours['peak_mib'] / max(peer['peak_mib'], 1):7.2f}" if ours and peer else f"{'-':>7}",
            f"{abs(ours['checksum'] - peer['checksum']):11.2e}" if ours and peer else f"{'-':>11}",
        ]
        lines.append(f"{row['case']:<{op}}{boxes:>6}  {row['pass_']:<9}" + "".join(cells[i] for i in keep))
    return "\n".join(lines)


def format_scaling(rows: List[dict]) -> str:
    """The scaling rows: one line per (axis value, op, pass), time and ratio."""
    op = max([24] + [len(row["case"]) + 1 for row in rows])
    head = f"{'axis':<9}{'value':>9}  {'op':<{op}}{'pass':<9}{'roilib ms':>10}{'tv ms':>9}{'ratio':>7}"
    lines = [head, "-" * len(head)]
    for row in rows:
        axis = row["axis"]
        value = "x".join(map(str, row["map_hw"])) if axis == "map_hw" else str(row[axis])
        ours, peer, ratio = row.get("roilib"), row.get("torchvision"), _ratio(row)
        lines.append(
            f"{axis:<9}{value:>9}  {row['case']:<{op}}{row['pass_']:<9}"
            + (f"{ours['best'] * 1e3:10.1f}" if ours else f"{'failed':>10}")
            + (f"{peer['best'] * 1e3:9.1f}" if peer else f"{'-':>9}")
            + (f"{ratio:7.2f}" if ratio is not None else f"{'-':>7}")
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m roilib.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (best is reported)")
    parser.add_argument("--threads", type=int, default=1, help="threads for NumPy's BLAS and torch")
    parser.add_argument(
        "--boxes", type=int, nargs="+", default=list(BOX_COUNTS), help="numbers of boxes of the CPU table",
    )
    parser.add_argument("--scaling", action="store_true", help="the scaling table over boxes, channels, map size")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    parser.add_argument(
        "--determinism", action="store_true",
        help="time the kernels' deterministic backward against the atomic one (CPU build)",
    )
    parser.add_argument("--only", help="measure only the rows whose label contains this text")
    parser.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        if spec["impl"] == "torchvision":
            import torch

            torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        print(json.dumps(_worker(spec)))
        return 0
    if args.determinism:
        from .cuda import bench_determinism

        return bench_determinism.main(args.repeat)
    if args.device == "cuda":
        from .cuda import bench_gpu

        return bench_gpu.main(args)
    if not _have_torchvision():
        print("torchvision is not importable: showing roilib alone")
    if args.scaling:
        base = SCALING_BASE
        print(
            f"roilib.bench --scaling: CPU, {args.threads} thread(s), {_best_of(args.repeat)}; base point "
            f"{base['boxes']} boxes, {base['channels']} channels, map {base['map_hw'][0]}x{base['map_hw'][1]} "
            f"(image = map x 4), output {OUTPUT_SIZE}x{OUTPUT_SIZE}; one axis varies at a time"
        )
        rows = run_scaling(args.repeat, args.threads, args.only)
        print(format_scaling(rows))
    else:
        print(
            f"roilib.bench: CPU, {args.threads} thread(s), {_best_of(args.repeat)}; input "
            f"{'x'.join(map(str, MAP_SHAPE))} float32, {' and '.join(map(str, args.boxes))} boxes in a "
            f"{IMAGE_HW[0]}x{IMAGE_HW[1]} image, output {OUTPUT_SIZE}x{OUTPUT_SIZE}, "
            f"scale 1/{int(1 / SPATIAL_SCALE)}"
        )
        print(FAMILY_WORKLOADS)
        rows = run_cpu(args.repeat, args.threads, args.boxes, args.only)
        print(format_table(rows))
        print("ratio = roilib / torchvision best time (< 1: roilib faster); MiB = extra peak resident memory")
        print("of one call, mem x = roilib MiB / torchvision MiB; |sum diff| = difference of the two results'")
        print("sums (a check that both computed the same thing; roi_warp's peer is a different op)")
        print("(ps_roi_pool backward: roilib's is the forward's exact transpose; torchvision's clips bins to")
        print(" the map size, not size - 1 as its forward does, so the sums differ where boxes reach the last")
        print(" row or column)")
    print("ratio = roilib / torchvision best time (< 1: roilib faster)" if args.scaling else "", end="")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0



# -- FPN (multiscale RoIAlign) and R-FCN (position-sensitive) workloads ------------------

#: P2-P5 of an 800 x 1088 image (strides 4-32), 256 channels, 1000 boxes, 7 x 7
FPN_STRIDES = (4, 8, 16, 32)
FPN_CHANNELS = 256
FPN_BOXES = 1000
#: R-FCN's score maps: 21 classes x 7 x 7 channels at stride 16 (the table's boxes), 7 x 7
RFCN_CLASSES = 21
RFCN_SCALE = 1 / 16
RFCN_MAP = (1, RFCN_CLASSES * OUTPUT_SIZE * OUTPUT_SIZE, IMAGE_HW[0] // 16, IMAGE_HW[1] // 16)

FAMILY_WORKLOADS = (
    f"multiscale rows: P2-P5 (strides {'/'.join(map(str, FPN_STRIDES))}) of {IMAGE_HW[0]}x{IMAGE_HW[1]}, "
    f"{FPN_CHANNELS} channels, {FPN_BOXES} boxes, 7x7, sampling_ratio 2, vs torchvision.ops.MultiScaleRoIAlign\n"
    f"ps rows: {'x'.join(map(str, RFCN_MAP))} float32 ({RFCN_CLASSES} classes x {OUTPUT_SIZE}x{OUTPUT_SIZE} "
    f"score maps), the table's boxes in the same image, {OUTPUT_SIZE}x{OUTPUT_SIZE}, scale 1/16"
)

CASES += [
    ("multiscale_roi_align sr=2", "multiscale_roi_align", dict(sampling_ratio=2)),
    ("ps_roi_align sr=2", "ps_roi_align", dict(sampling_ratio=2)),
    ("ps_roi_pool", "ps_roi_pool", dict()),
]
SCALING_CASES += tuple(i for i, (_, op, _) in enumerate(CASES) if op in ("ps_roi_align", "ps_roi_pool"))


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
    """``runner(impl, kwargs, backward, boxes)`` for an R-FCN row (:data:`RFCN_MAP`)."""

    def runner(impl: str, kwargs: dict, backward: bool, boxes: int):
        import numpy as np

        rng = np.random.default_rng(SEED)
        x = rng.standard_normal(RFCN_MAP, dtype=np.float32)
        rois = benchmark_boxes(boxes)
        g = rng.standard_normal((boxes, RFCN_CLASSES, OUTPUT_SIZE, OUTPUT_SIZE), dtype=np.float32)
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


_FAMILY_RUNNERS = {"multiscale_roi_align": _multiscale_runner}
_PS_RUNNERS = {op: _ps_runner(op) for op in ("ps_roi_align", "ps_roi_pool")}


if __name__ == "__main__":
    sys.exit(main())
