"""Print the numbers issue 12's closing note asks for: identity errors and convergence.

    python tools/rotated_prroi_checks.py

* roi_align_rotated at angle 0 against roi_align(aligned=True) on the same boxes, and at
  180 degrees against the angle-0 output flipped in both axes: max |difference| over
  seeded random boxes (inside, across and outside the map, any size), per dtype, for the
  NumPy reference and for the kernels built for the CPU;
* max |roi_align(aligned=False, sampling_ratio=n) - prroi_pool| for boxes inside the map,
  n = 1 .. 64, with the ratio between successive n and the fitted order.
"""
import numpy as np

import roilib
from roilib.cuda import cpu
from roilib.geometry_rotated import to_axis_aligned


def rotated_boxes(rng, n, h, w):
    return np.stack(
        [rng.integers(0, 2, n), rng.uniform(-2, w + 2, n), rng.uniform(-2, h + 2, n),
         rng.uniform(0, w, n), rng.uniform(0, h, n), rng.uniform(-180, 180, n)], axis=1,
    )  # fmt: skip


def identities():
    rng = np.random.default_rng(2026)
    x = rng.standard_normal((2, 16, 40, 52))
    rot = rotated_boxes(rng, 500, 40, 52)
    flat = rot.copy()
    flat[:, 5] = 0.0
    turned = rot.copy()
    turned[:, 5] += 180.0
    print("identity                                   impl        dtype     max |diff|   max |output|")
    for impl, mod in (("reference", roilib), ("kernels-cpu", cpu)):
        for dtype in (np.float32, np.float64):
            xd = x.astype(dtype)
            for sr in (2, -1):
                at0 = mod.roi_align_rotated(xd, flat, (7, 7), 0.5, sr)
                plain = mod.roi_align(xd, to_axis_aligned(flat), (7, 7), 0.5, sr, aligned=True)
                a = mod.roi_align_rotated(xd, rot, (7, 7), 0.5, sr)
                b = mod.roi_align_rotated(xd, turned, (7, 7), 0.5, sr)
                e0 = float(np.abs(at0.astype(np.float64) - plain).max())
                e180 = float(np.abs(b.astype(np.float64) - a[..., ::-1, ::-1]).max())
                name = np.dtype(dtype).name
                print(f"angle 0 vs roi_align(aligned=True), sr={sr:2d}  {impl:<11} {name:<9} {e0:10.2e}   "
                      f"{np.abs(plain).max():.2f}")
                print(f"180 deg vs 0 deg flipped,          sr={sr:2d}  {impl:<11} {name:<9} {e180:10.2e}   "
                      f"{np.abs(a).max():.2f}")


def convergence():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((1, 8, 24, 24))
    k = 30
    x1, y1 = rng.uniform(0, 14, k), rng.uniform(0, 14, k)
    boxes = np.stack([np.zeros(k), x1, y1, x1 + rng.uniform(2, 9, k), y1 + rng.uniform(2, 9, k)], axis=1)
    ratios = np.array([1, 2, 4, 8, 16, 32, 64])
    exact = roilib.prroi_pool(x, boxes, (3, 3))
    err = np.array([np.abs(roilib.roi_align(x, boxes, (3, 3), 1.0, int(n)) - exact).max() for n in ratios])
    print("\nsampling_ratio   max |roi_align(aligned=False) - prroi_pool|   ratio to previous")
    for i, (n, e) in enumerate(zip(ratios, err)):
        print(f"{n:14d}   {e:.3e}" + (f"                                  {err[i - 1] / e:.2f}" if i else ""))
    order = -np.polyfit(np.log(ratios[1:]), np.log(err[1:]), 1)[0]
    print(f"fitted order over n = 2..64: {order:.2f} (random 1 x 8 x 24 x 24 map, 30 boxes inside, 3 x 3 bins)")


if __name__ == "__main__":
    identities()
    convergence()
