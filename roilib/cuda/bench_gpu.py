"""``python -m roilib.bench --device cuda``: roilib's kernels against torchvision's CUDA ops.

Workload (issue "GPU"): ``N=2, C=256, H=W=200``, 1024 seeded boxes, output 7x7 and
14x14, ``sampling_ratio=2``, ``aligned=True``, float32 and float16; forward, and the
input gradient with roilib's atomic and deterministic backward against torchvision's
(atomic) backward; plus a few-large-boxes case with adaptive sampling.

Both libraries see the same device buffers (shared through DLPack) and are timed with
CUDA events on the same stream: median of ``--repeat`` launches after warm-up. The
"floor" column is the time to read the input once and write the output once at the
device-to-device copy bandwidth measured in the same run; ``floor %`` is that time over
roilib's, i.e. the fraction of the memory-traffic bound the kernel reaches.
"""
from __future__ import annotations

import numpy as np

N, C, H, W = 2, 256, 200, 200
STRIDE = 16


def _boxes(n: int, rng, min_size: float, max_size: float):
    """``n`` boxes ``[b, x1, y1, x2, y2]`` in image pixels (image = map * STRIDE)."""
    size = np.array([W, H]) * STRIDE
    wh = np.exp(rng.uniform(np.log(min_size), np.log(max_size), (n, 2)))
    lo = rng.uniform(0, 1, (n, 2)) * np.maximum(size - wh, 1)
    b = rng.integers(0, N, (n, 1))
    return np.concatenate([b, lo, np.minimum(lo + wh, size)], axis=1).astype(np.float32)


def _time(cp, fn, repeat: int) -> float:
    """Median seconds of ``fn`` on the current stream, timed with CUDA events."""
    for _ in range(3):
        fn()
    start, stop = cp.cuda.Event(), cp.cuda.Event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
    return float(np.median(times))


def copy_bandwidth(cp, nbytes: int = 1 << 30) -> float:
    """Device-to-device copy bandwidth in bytes/s (bytes read + bytes written)."""
    a = cp.empty(nbytes, dtype=cp.uint8)
    b = cp.empty_like(a)
    seconds = _time(cp, lambda: b.__setitem__(Ellipsis, a), 10)
    return 2 * nbytes / seconds


def _cases():
    for dtype in (np.float32, np.float16):
        for out in (7, 14):
            yield f"{np.dtype(dtype).name} {out}x{out} sr=2", dtype, out, 2, (32, 512), 1024
    yield "float32 7x7 adaptive, 16 large boxes", np.float32, 7, -1, (1024, 3200), 16


def main(args) -> int:
    from . import gpu

    cp = gpu._cupy()
    try:
        import torch
        import torchvision.ops as tv
    except Exception:
        torch = tv = None
    rng = np.random.default_rng(2024)
    bandwidth = copy_bandwidth(cp)
    name = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["name"].decode()
    print(f"roilib.bench --device cuda on {name}; copy bandwidth {bandwidth / 1e9:.0f} GB/s; median of {args.repeat}")
    head = f"{'case':<38}{'pass':<22}{'roilib ms':>10}{'tv ms':>9}{'speedup':>9}{'floor %':>9}"
    print(head)
    print("-" * len(head))
    for label, dtype, out, sr, sizes, k in _cases():
        x = cp.asarray(rng.standard_normal((N, C, H, W)).astype(dtype))
        rois = cp.asarray(_boxes(k, rng, *sizes))
        g = cp.asarray(rng.standard_normal((k, C, out, out)).astype(dtype))
        s = 1.0 / STRIDE
        itemsize = np.dtype(dtype).itemsize
        traffic = {"forward": (x.size + g.size) * itemsize, "backward": (x.size + g.size) * itemsize}
        ours = {
            "forward": lambda: gpu.roi_align(x, rois, out, s, sr, True),
            "backward atomic": lambda: gpu.roi_align_backward(g, x, rois, out, s, sr, True, deterministic=False),
            "backward deterministic": lambda: gpu.roi_align_backward(g, x, rois, out, s, sr, True, deterministic=True),
        }
        theirs = {}
        if tv is not None:
            xt, rt, gt = torch.from_dlpack(x), torch.from_dlpack(rois).to(_torch_dtype(torch, dtype)), torch.from_dlpack(g)
            theirs["forward"] = lambda: tv.roi_align(xt, rt, out, s, sr, True)
            theirs["backward"] = lambda: torch.ops.torchvision._roi_align_backward(
                gt, rt, s, out, out, N, C, H, W, sr, True
            )
        for kind, fn in ours.items():
            t = _time(cp, fn, args.repeat)
            peer_kind = "forward" if kind == "forward" else "backward"
            peer = _time(cp, theirs[peer_kind], args.repeat) if peer_kind in theirs else float("nan")
            floor = traffic[peer_kind] / bandwidth
            print(f"{label:<38}{kind:<22}{t * 1e3:10.3f}{peer * 1e3:9.3f}{peer / t:9.2f}{100 * floor / t:9.1f}")
    print("speedup = torchvision time / roilib time (> 1: roilib faster); tv backward is atomic")
    return 0


def _torch_dtype(torch, dtype):
    """The torch dtype matching a NumPy dtype (torchvision wants boxes in the input's dtype)."""
    return {np.dtype(np.float32): torch.float32, np.dtype(np.float16): torch.float16}[np.dtype(dtype)]
