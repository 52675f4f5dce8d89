"""Generate the committed torchvision parity fixture for roilib's tests.

This script runs torchvision's CPU ``roi_align`` and ``roi_pool`` (forward and,
through autograd, backward) on a fixed, seeded set of inputs and writes inputs,
arguments and results to ``tests/fixtures/torchvision_parity.npz``. roilib's
tests compare its NumPy reference (and kernels) against that file, so neither
torch nor torchvision is needed to run the test suite: only this generator
imports them.

Rerun it (from anywhere; paths are resolved relative to the repository) with a
Python that has torch and torchvision installed::

    /path/to/python-with-torchvision tools/make_torchvision_fixture.py

The output is deterministic: the same torch/torchvision versions produce a
byte-identical file. The script also checks a hand-worked RoIPool example,
reloads the file it wrote and prints a summary.

File layout
-----------
Top-level keys:

``torch_version``, ``torchvision_version``
    0-d ``str`` arrays, the versions that produced the file.
``num_cases``
    0-d ``int64``, the number of cases; cases are numbered ``0 .. num_cases-1``.
``notes``
    0-d ``str``, remarks on how the cases were built (e.g. boxes left out).

Per case ``i``, keys prefixed ``case{i:03d}_``:

``name``
    0-d ``str``, unique and descriptive, e.g. ``random_s0.5_3x4_sr2_aligned_float32``.
``op``
    0-d ``str``, ``'roi_align'`` or ``'roi_pool'``.
``input``
    ``(N, C, H, W)`` float32 or float64.
``rois``
    ``(K, 5)``, same dtype as ``input``: ``[batch_index, x1, y1, x2, y2]`` in
    input-image coordinates (multiply by ``spatial_scale`` for map coordinates).
``output_size``
    ``(2,)`` int64, ``(PH, PW)``.
``spatial_scale``
    0-d float64.
``sampling_ratio``, ``aligned``
    0-d int64 and 0-d bool; ``roi_align`` cases only.
``grad_output``
    ``(K, C, PH, PW)``, same dtype as ``input``, seeded random normal.
``output``
    torchvision's forward result, computed in the dtype of ``input``.
``grad_input``
    d(sum(output * grad_output)) / d(input), via torch autograd, same dtype.

Each case appears twice, float64 then float32, with the float32 arrays being
the float64 ones cast (and torchvision rerun in float32).

Case families
-------------
``random``
    N=2, C=3, H=13, W=17, 12 boxes with random batch index, inside an image of
    size (H/s, W/s); spatial_scale s in {1, 0.5, 0.25} and output sizes
    (2, 2), (3, 4), (7, 7).
``edge``
    Hand-placed boxes on a 2x2x9x11 map: partly and wholly outside (negative
    and beyond W/H, and within the [-1, 0] / [W-1, W] bilinear bands), tiny
    (< 1 pixel), zero width/height, inverted (x2 < x1, y2 < y1), exactly on
    integer and half-integer coordinates (C rounding of .5 in RoIPool), touching
    the last row/column; at spatial_scale 1 and 0.25.
``row`` / ``col``
    A 1xW map and an Hx1 map with boxes around the single row/column.
``multi``
    N=4 images, boxes in shuffled batch order, spatial_scale 0.5.
``empty``
    K=0 boxes.

For ``roi_align`` every family is repeated for every combination of
``aligned`` in {False, True} and ``sampling_ratio`` in {-1, 0, 1, 2, 3}.
Inputs are continuous random values (no exact ties), so RoIPool's argmax, and
hence its gradient, is unambiguous.

torchvision 0.29 raises ``ValueError: cannot create std::vector larger than
max_size()`` for ``roi_align(aligned=True, sampling_ratio<=0)`` on a box
inverted along exactly one axis (the adaptive grid sizes ceil(roi_h/PH) and
ceil(roi_w/PW) then have opposite signs and the C++ pre-calculation buffer gets
a negative size). Such boxes are dropped from those cases only (listed in
``notes``); everywhere else they are kept.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.ops import roi_align, roi_pool

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "torchvision_parity.npz"

SAMPLING_RATIOS = (-1, 0, 1, 2, 3)
ALIGNED = (False, True)
DTYPES = (np.float64, np.float32)
DTYPE_NAMES = {np.float64: "float64", np.float32: "float32"}


# --------------------------------------------------------------------------
# torchvision calls
# --------------------------------------------------------------------------
def run_torchvision(op, x, rois, output_size, spatial_scale, sampling_ratio, aligned, grad_output):
    """Forward and autograd backward of a torchvision op in the arrays' dtype."""
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    rt = torch.from_numpy(rois.copy())
    if op == "roi_align":
        out = roi_align(xt, rt, tuple(output_size), spatial_scale, sampling_ratio, aligned)
    else:
        out = roi_pool(xt, rt, tuple(output_size), spatial_scale)
    (grad_input,) = torch.autograd.grad(
        out, xt, grad_outputs=torch.from_numpy(grad_output.copy()), allow_unused=True
    )
    if grad_input is None:  # K == 0: the output does not depend on the input
        grad_input = torch.zeros_like(xt)
    assert out.dtype == xt.dtype and grad_input.dtype == xt.dtype
    return out.detach().numpy(), grad_input.detach().numpy()


def torchvision_accepts(op, x, rois, output_size, spatial_scale, sampling_ratio, aligned):
    """Whether torchvision's forward runs on these boxes (see module notes)."""
    try:
        run_torchvision(
            op, x, rois, output_size, spatial_scale, sampling_ratio, aligned,
            np.zeros((len(rois), x.shape[1], *output_size), x.dtype),
        )
    except (ValueError, RuntimeError):
        return False
    return True


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------
def continuous_input(rng, shape):
    """Seeded standard-normal map, checked for exact ties in float32 too."""
    x = rng.standard_normal(shape)
    for dt in DTYPES:
        assert np.unique(x.astype(dt)).size == x.size, "tied input values"
    return x


def rois_from_feature_boxes(boxes, batch, spatial_scale):
    """(K, 5) rois in image coordinates from boxes given in map coordinates."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    rois = np.empty((len(boxes), 5))
    rois[:, 0] = batch
    rois[:, 1:] = boxes / spatial_scale  # exact: scales are powers of two
    return rois


def random_rois(rng, k, n, h, w, spatial_scale):
    """k boxes inside an image of size (h/s, w/s), random batch index."""
    img_h, img_w = h / spatial_scale, w / spatial_scale
    xs = np.sort(rng.uniform(0.0, img_w, size=(k, 2)), axis=1)
    ys = np.sort(rng.uniform(0.0, img_h, size=(k, 2)), axis=1)
    batch = rng.integers(0, n, size=k)
    return np.stack([batch, xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1).astype(np.float64)


# Edge boxes in map coordinates on a 9 x 11 (H x W) map.
EDGE_H, EDGE_W = 9, 11
EDGE_BOXES = {
    "partly_out_top_left": (-3.3, -2.1, 4.2, 5.7),
    "partly_out_bottom_right": (6.4, 5.2, 14.8, 12.3),
    "covers_map_and_more": (-2.5, -1.5, 12.5, 10.5),
    "out_negative": (-6.2, -5.1, -1.7, -1.2),
    "out_band_-1_0": (-0.9, -0.8, -0.2, -0.1),
    "out_beyond": (11.6, 9.4, 15.0, 13.0),
    "out_band_W-1_W": (10.2, 8.3, 10.9, 8.8),
    "out_band_W_W+1": (11.2, 2.0, 11.8, 4.0),
    "out_left_in_rows": (-4.0, 2.0, -1.5, 6.0),
    "tiny": (3.3, 4.1, 3.7, 4.6),
    "zero_width": (5.0, 2.0, 5.0, 6.0),
    "zero_height": (2.0, 3.0, 7.0, 3.0),
    "point": (4.4, 4.4, 4.4, 4.4),
    "inverted_x": (7.0, 2.0, 3.0, 6.0),
    "inverted_y": (2.0, 7.0, 6.0, 1.0),
    "inverted_xy": (8.0, 7.0, 3.0, 2.0),
    "integer": (1.0, 2.0, 6.0, 7.0),
    "integer_unit": (3.0, 3.0, 4.0, 4.0),
    "whole_map_last_px": (0.0, 0.0, 10.0, 8.0),
    "whole_map_to_WH": (0.0, 0.0, 11.0, 9.0),
    "half_integer": (0.5, 1.5, 5.5, 6.5),
    "half_integer_neg": (-0.5, -0.5, 2.5, 3.5),
    "half_integer_mixed": (1.5, 0.5, 4.5, 2.5),
    "touch_last_col": (7.3, 1.2, 10.0, 4.8),
    "touch_last_row": (1.1, 6.2, 5.9, 8.0),
    "last_corner": (9.0, 7.0, 10.0, 8.0),
    "between_last_and_edge": (9.6, 7.6, 10.6, 8.6),
}

# 1 x W map (W = 15); the Hx1 map uses the same boxes transposed.
LINE_LEN = 15
LINE_BOXES = {
    "inside": (0.3, 0.0, 6.2, 0.7),
    "tall": (2.0, -1.0, 9.0, 2.0),
    "partly_left": (-2.0, -0.5, 4.0, 0.5),
    "partly_right": (10.0, 0.0, 18.0, 1.0),
    "full_zero_height": (0.0, 0.0, 14.0, 0.0),
    "half_integer": (5.5, 0.5, 8.5, 0.5),
    "above": (3.0, -3.0, 12.0, -1.5),
    "below": (3.0, 1.2, 12.0, 3.0),
    "tiny": (7.2, 0.1, 7.6, 0.4),
    "inverted_x": (9.0, 0.0, 4.0, 0.8),
}


# --------------------------------------------------------------------------
# case list
# --------------------------------------------------------------------------
def base_configs():
    """Dtype-independent case descriptions: dicts with float64 arrays."""
    configs = []

    def op_variants(op):
        if op == "roi_pool":
            return [dict(sampling_ratio=None, aligned=None)]
        return [dict(sampling_ratio=sr, aligned=al) for al in ALIGNED for sr in SAMPLING_RATIOS]

    def suffix(v):
        if v["sampling_ratio"] is None:
            return ""
        return f"_sr{v['sampling_ratio']}_{'aligned' if v['aligned'] else 'legacy'}"

    # random family
    scales = (1.0, 0.5, 0.25)
    sizes = ((2, 2), (3, 4), (7, 7))
    n, c, h, w, k = 2, 3, 13, 17, 12
    for op in ("roi_align", "roi_pool"):
        # roi_pool has a single variant; give it two (scale, size) pairings
        variants = op_variants(op) * (2 if op == "roi_pool" else 1)
        for vi, v in enumerate(variants):
            for j, size in enumerate(sizes):
                s = scales[(j + vi) % 3]
                seed = 1000 * (op == "roi_pool") + 10 * vi + j
                rng = np.random.default_rng([20240611, seed])
                configs.append(dict(
                    name=f"random_s{s:g}_{size[0]}x{size[1]}{suffix(v)}", op=op,
                    input=continuous_input(rng, (n, c, h, w)),
                    rois=random_rois(rng, k, n, h, w, s),
                    output_size=size, spatial_scale=s, seed=seed, **v,
                ))

    # edge family: hand-placed boxes, two scales
    for s, size in ((1.0, (2, 3)), (0.25, (3, 2))):
        for op in ("roi_align", "roi_pool"):
            for vi, v in enumerate(op_variants(op)):
                seed = 2000 + 1000 * (op == "roi_pool") + 10 * vi + int(s == 1.0)
                rng = np.random.default_rng([20240611, seed])
                names = list(EDGE_BOXES)
                configs.append(dict(
                    name=f"edge_s{s:g}_{size[0]}x{size[1]}{suffix(v)}", op=op,
                    input=continuous_input(rng, (2, 2, EDGE_H, EDGE_W)),
                    rois=rois_from_feature_boxes(
                        [EDGE_BOXES[b] for b in names], np.arange(len(names)) % 2, s),
                    box_names=names, output_size=size, spatial_scale=s, seed=seed, **v,
                ))

    # 1xW and Hx1 maps
    for kind in ("row", "col"):
        names = list(LINE_BOXES)
        boxes = np.array([LINE_BOXES[b] for b in names])
        shape = (2, 2, 1, LINE_LEN)
        size = (2, 3)
        if kind == "col":
            boxes = boxes[:, [1, 0, 3, 2]]
            names = [f"{b}_transposed" for b in names]
            shape = (2, 2, LINE_LEN, 1)
            size = (3, 2)
        for op in ("roi_align", "roi_pool"):
            for vi, v in enumerate(op_variants(op)):
                seed = 4000 + 1000 * (op == "roi_pool") + 10 * vi + (kind == "col")
                rng = np.random.default_rng([20240611, seed])
                configs.append(dict(
                    name=f"{kind}_{shape[2]}x{shape[3]}_map_{size[0]}x{size[1]}{suffix(v)}", op=op,
                    input=continuous_input(rng, shape),
                    rois=rois_from_feature_boxes(boxes, np.arange(len(names)) % 2, 1.0),
                    box_names=names, output_size=size, spatial_scale=1.0, seed=seed, **v,
                ))

    # several images, shuffled batch order, mixed in-range and edge boxes
    for op in ("roi_align", "roi_pool"):
        for vi, v in enumerate(op_variants(op)):
            seed = 6000 + 1000 * (op == "roi_pool") + 10 * vi
            rng = np.random.default_rng([20240611, seed])
            n, h, w, s = 4, 10, 12, 0.5
            x = continuous_input(rng, (n, 2, h, w))
            inside = random_rois(rng, 10, n, h, w, s)
            inside[:, 0] = np.arange(10) % n  # every image used
            edge = rois_from_feature_boxes(
                [(-1.7, 2.2, 5.3, 12.4), (8.5, -0.5, 12.5, 4.5), (3.0, 3.0, 3.0, 7.5),
                 (0.25, 0.75, 11.0, 9.0), (-3.0, -3.0, -1.25, -2.0), (6.6, 6.6, 6.9, 6.7)],
                [3, 1, 2, 0, 3, 1], s)
            rois = np.concatenate([inside, edge])[rng.permutation(16)]
            configs.append(dict(
                name=f"multi_n4_s0.5_3x3{suffix(v)}", op=op, input=x, rois=rois,
                output_size=(3, 3), spatial_scale=s, seed=seed, **v,
            ))

    # no boxes
    for op, v in (("roi_align", dict(sampling_ratio=-1, aligned=False)),
                  ("roi_pool", dict(sampling_ratio=None, aligned=None))):
        rng = np.random.default_rng([20240611, 9000 + (op == "roi_pool")])
        configs.append(dict(
            name=f"empty_k0_2x2{suffix(v)}", op=op,
            input=continuous_input(rng, (2, 3, 5, 6)), rois=np.zeros((0, 5)),
            output_size=(2, 2), spatial_scale=1.0, seed=9000 + (op == "roi_pool"), **v,
        ))

    names = [cfg["name"] for cfg in configs]
    assert len(set(names)) == len(names), "duplicate case names"
    return configs


def build_cases():
    """Run torchvision on every config in both dtypes; return (arrays, notes)."""
    arrays = {}
    notes = []
    i = 0
    for cfg in base_configs():
        op, size, s = cfg["op"], tuple(cfg["output_size"]), float(cfg["spatial_scale"])
        sr, al = cfg["sampling_ratio"], cfg["aligned"]
        x64, rois64 = cfg["input"], cfg["rois"]

        # Drop boxes torchvision cannot run (see module docstring), decided in
        # float64 and checked again in float32.
        if len(rois64) and not torchvision_accepts(op, x64, rois64, size, s, sr, al):
            keep = [j for j in range(len(rois64))
                    if torchvision_accepts(op, x64, rois64[j:j + 1], size, s, sr, al)]
            dropped = [cfg.get("box_names", list(range(len(rois64))))[j]
                       for j in range(len(rois64)) if j not in keep]
            notes.append(f"{cfg['name']}: dropped boxes {dropped} (torchvision raises)")
            rois64 = rois64[keep]

        k, c = len(rois64), x64.shape[1]
        g_rng = np.random.default_rng([20240611, cfg["seed"], 7])
        gout64 = g_rng.standard_normal((k, c, *size))
        results = {}
        for dt in DTYPES:
            x, rois, gout = x64.astype(dt), rois64.astype(dt), gout64.astype(dt)
            out, gin = run_torchvision(op, x, rois, size, s, sr, al, gout)
            if op == "roi_align" and sr == -1:
                # sampling_ratio -1 and 0 both select the adaptive grid
                out0, gin0 = run_torchvision(op, x, rois, size, s, 0, al, gout)
                np.testing.assert_array_equal(out0, out)
                np.testing.assert_array_equal(gin0, gin)
            assert np.all(np.isfinite(out)) and np.all(np.isfinite(gin))
            results[dt] = out
            p = f"case{i:03d}_"
            arrays[p + "name"] = np.array(f"{cfg['name']}_{DTYPE_NAMES[dt]}")
            arrays[p + "op"] = np.array(op)
            arrays[p + "input"] = x
            arrays[p + "rois"] = rois
            arrays[p + "output_size"] = np.array(size, np.int64)
            arrays[p + "spatial_scale"] = np.array(s, np.float64)
            if op == "roi_align":
                arrays[p + "sampling_ratio"] = np.array(sr, np.int64)
                arrays[p + "aligned"] = np.array(al, np.bool_)
            arrays[p + "grad_output"] = gout
            arrays[p + "output"] = out
            arrays[p + "grad_input"] = gin
            i += 1
        diff = np.max(np.abs(results[np.float64] - results[np.float32]), initial=0.0)
        if diff > 1e-4:
            notes.append(f"{cfg['name']}: float32 and float64 outputs differ by {diff:.3g}")
    arrays["num_cases"] = np.array(i, np.int64)
    return arrays, notes


# --------------------------------------------------------------------------
# checks
# --------------------------------------------------------------------------
def check_hand_example():
    """torchvision RoIPool on arange(16) as a 4x4 map, the book's worked example."""
    x = torch.arange(16, dtype=torch.float64).reshape(1, 1, 4, 4)
    rois = torch.tensor([[0, 0, 0, 2, 2], [0, 0, 1, 3, 3]], dtype=torch.float64)
    out = roi_pool(x, rois, (2, 2), 1.0)
    expected = np.array([[[[5, 6], [9, 10]]], [[[9, 11], [13, 15]]]], np.float64)
    np.testing.assert_array_equal(out.numpy(), expected)


def summarize(path):
    """Reload the fixture without pickle and print a per-op/dtype summary."""
    with np.load(path, allow_pickle=False) as data:
        n = int(data["num_cases"])
        keys = set(data.files)
        counts = {}
        for i in range(n):
            p = f"case{i:03d}_"
            op = str(data[p + "op"])
            x = data[p + "input"]
            required = ["name", "op", "input", "rois", "output_size", "spatial_scale",
                        "grad_output", "output", "grad_input"]
            if op == "roi_align":
                required += ["sampling_ratio", "aligned"]
            assert all(p + r in keys for r in required), f"case {i} incomplete"
            k = data[p + "rois"].shape[0]
            ph, pw = data[p + "output_size"]
            assert data[p + "rois"].dtype == x.dtype
            assert data[p + "output"].shape == (k, x.shape[1], ph, pw)
            assert data[p + "output"].dtype == x.dtype == data[p + "grad_input"].dtype
            assert data[p + "grad_input"].shape == x.shape
            family = str(data[p + "name"]).split("_", 1)[0]
            key = (op, str(x.dtype))
            counts.setdefault(key, {}).setdefault(family, 0)
            counts[key][family] += 1
        print(f"wrote {path}")
        print(f"  torch {data['torch_version']}, torchvision {data['torchvision_version']}")
        print(f"  {n} cases, {len(keys)} keys, {path.stat().st_size / 1e6:.3f} MB")
        for (op, dt), fam in sorted(counts.items()):
            detail = ", ".join(f"{f} {c}" for f, c in sorted(fam.items()))
            print(f"  {op:9s} {dt:7s}: {sum(fam.values()):3d} ({detail})")


def main():
    assert torchvision.extension._has_ops(), "torchvision C++ ops are required"
    torch.manual_seed(0)
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(1)
    check_hand_example()

    arrays, notes = build_cases()
    arrays["torch_version"] = np.array(torch.__version__)
    arrays["torchvision_version"] = np.array(torchvision.__version__)
    arrays["notes"] = np.array("\n".join(notes))

    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    summarize(OUT)
    for line in notes:
        print("  note:", line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
