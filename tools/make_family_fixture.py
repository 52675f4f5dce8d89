"""Generate the torchvision parity fixture for FPN and position-sensitive pooling.

Runs torchvision's CPU ``MultiScaleRoIAlign``, ``ps_roi_pool`` and ``ps_roi_align``
(forward and, through autograd, backward) on fixed, seeded inputs and writes inputs,
arguments and results to ``tests/fixtures/torchvision_family_parity.npz``, which
``tests/test_family_parity.py`` reads (neither torch nor torchvision is needed there).
Rerun it with a Python that has torch and torchvision::

    /path/to/python-with-torchvision tools/make_family_fixture.py

Deterministic: the same torch/torchvision versions give the same arrays.

File layout
-----------
Top level: ``torch_version``, ``torchvision_version`` (0-d str), ``num_cases`` (0-d
int64). Per case ``i``, keys prefixed ``case{i:03d}_``:

``name``, ``op``
    0-d str; ``op`` is ``'multiscale_roi_align'``, ``'ps_roi_pool'`` or ``'ps_roi_align'``.
``rois``
    ``(K, 5)`` ``[batch_index, x1, y1, x2, y2]`` in image pixels, the input's dtype.
``output_size`` (2,) int64; ``grad_output`` the output's shape; ``output`` torchvision's
forward. PS families: ``random``, ``edge`` (outside, tiny, zero-size, inverted, half-pixel
and last-row/column boxes), ``multi`` (4 images, shuffled), ``inside`` (no bin reaches
the map's last row or column, where torchvision's PS-RoIPool backward clips differently
from its forward), ``empty`` (K = 0).

Position-sensitive cases: ``input`` ``(N, C_out*PH*PW, H, W)``, ``spatial_scale`` 0-d
float64, ``sampling_ratio`` (``ps_roi_align`` only), ``grad_input``.

Multiscale cases: ``num_levels``; ``feature{l}`` and ``grad_feature{l}`` per level
(the maps passed, in order, and their gradients); ``image_shapes`` ``(I, 2)``;
``scales`` (the scales the module inferred); ``levels`` (K,) int64, torchvision's level
index per box, ``-1`` where it matches no map; ``sampling_ratio``, ``canonical_scale``,
``canonical_level``.

Each case appears in float64 and float32 (float32 arrays are the float64 ones cast,
torchvision rerun).
"""
from __future__ import annotations

import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.ops import MultiScaleRoIAlign, ps_roi_align, ps_roi_pool

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "tests" / "fixtures" / "torchvision_family_parity.npz"
DTYPES = (np.float64, np.float32)

# Feature-map boxes (x1, y1, x2, y2) on a 9 x 11 map: outside, tiny, zero-size, inverted,
# on half pixels and at the last row/column.
EDGE_BOXES = [
    (-3.3, -2.1, 4.2, 5.7),
    (6.4, 5.2, 14.8, 12.3),
    (-2.5, -1.5, 12.5, 10.5),
    (-6.2, -5.1, -1.7, -1.2),
    (-0.9, -0.8, -0.2, -0.1),
    (11.6, 9.4, 15.0, 13.0),
    (10.2, 8.3, 10.9, 8.8),
    (3.3, 4.1, 3.7, 4.6),
    (5.0, 2.0, 5.0, 6.0),
    (2.0, 3.0, 7.0, 3.0),
    (4.4, 4.4, 4.4, 4.4),
    (7.0, 2.0, 3.0, 6.0),
    (8.0, 7.0, 3.0, 2.0),
    (1.0, 2.0, 6.0, 7.0),
    (0.5, 1.5, 5.5, 6.5),
    (-0.5, -0.5, 2.5, 3.5),
    (7.3, 1.2, 10.0, 4.8),
    (1.1, 6.2, 5.9, 8.0),
    (9.0, 7.0, 10.0, 8.0),
    (0.0, 0.0, 10.0, 8.0),
    (0.0, 0.0, 11.0, 9.0),
]


def random_rois(rng, k, n_images, h, w, scale):
    x1 = rng.uniform(-2, w - 1, k)
    y1 = rng.uniform(-2, h - 1, k)
    boxes = np.stack([rng.integers(0, n_images, k), x1, y1,
                      x1 + rng.uniform(0.3, w, k), y1 + rng.uniform(0.3, h, k)], axis=1)
    boxes[:, 1:] /= scale
    return boxes


def run_ps(op, x, rois, size, scale, sr, gout):
    xt = torch.from_numpy(x.copy()).requires_grad_(True)
    rt = torch.from_numpy(rois.copy())
    if op == "ps_roi_pool":
        out = ps_roi_pool(xt, rt, size, scale)
    else:
        out = ps_roi_align(xt, rt, size, scale, sr)
    (gin,) = torch.autograd.grad(out, xt, torch.from_numpy(gout.copy()), allow_unused=True)
    if gin is None:
        gin = torch.zeros_like(xt)
    return out.detach().numpy(), gin.numpy()


def ps_configs():
    configs = []
    variants = [("ps_roi_pool", None)] + [("ps_roi_align", sr) for sr in (-1, 0, 1, 2)]
    for vi, (op, sr) in enumerate(variants):
        tag = op if sr is None else f"{op}_sr{sr}"
        for j, (size, scale) in enumerate((((2, 2), 1.0), ((3, 3), 0.5), ((2, 3), 0.25))):
            rng = np.random.default_rng([20261128, vi, j])
            c = 2 * size[0] * size[1]
            configs.append(dict(name=f"random_{tag}_{size[0]}x{size[1]}_s{scale:g}", op=op, sr=sr,
                                size=size, scale=scale, x=rng.standard_normal((2, c, 13, 17)),
                                rois=random_rois(rng, 10, 2, 13, 17, scale)))
        for scale in (1.0, 0.25):
            rng = np.random.default_rng([20261128, vi, 10 + int(scale == 1.0)])
            size = (3, 2)
            rois = np.array([[i % 2, *b] for i, b in enumerate(EDGE_BOXES)], dtype=np.float64)
            rois[:, 1:] /= scale
            configs.append(dict(name=f"edge_{tag}_3x2_s{scale:g}", op=op, sr=sr, size=size, scale=scale,
                                x=rng.standard_normal((2, 12, 9, 11)), rois=rois))
        rng = np.random.default_rng([20261128, vi, 20])
        rois = random_rois(rng, 9, 4, 10, 12, 0.5)
        rois[:, 0] = rng.permutation(np.arange(9) % 4)
        configs.append(dict(name=f"multi_{tag}_2x2_n4", op=op, sr=sr, size=(2, 2), scale=0.5,
                            x=rng.standard_normal((4, 8, 10, 12)), rois=rois))
        rng = np.random.default_rng([20261128, vi, 30])
        # feature-map corners in [0, size - 2.6] on a 7 x 8 map: rounded ends <= size - 2
        x1, y1 = rng.uniform(0, 4, 8), rng.uniform(0, 3, 8)
        inside = np.stack([np.arange(8) % 2, x1, y1, x1 + rng.uniform(0.5, 5.4 - x1), y1 + rng.uniform(0.5, 4.4 - y1)], 1)
        configs.append(dict(name=f"inside_{tag}_3x3_s0.5", op=op, sr=sr, size=(3, 3), scale=0.5,
                            x=rng.standard_normal((2, 9, 7, 8)), rois=inside * np.array([1, 2, 2, 2, 2.0])))
        configs.append(dict(name=f"empty_{tag}", op=op, sr=sr, size=(2, 2), scale=1.0,
                            x=rng.standard_normal((1, 4, 5, 6)), rois=np.zeros((0, 5))))
    return configs


def pyramid(rng, n_images, channels, image_hw, strides):
    """Maps of multiples of 1/16 (exact in float32; they keep the file small)."""
    return OrderedDict(
        (f"p{int(np.log2(s))}", rng.integers(-64, 65, (n_images, channels, image_hw[0] // s, image_hw[1] // s)) / 16)
        for s in strides
    )


def boundary_sides(s0=224.0, k0=4, levels=(3, 4, 5)):
    """Square box sides just below and above each level boundary (k0 +- 1e-6 region)."""
    sides = []
    for k in levels:
        edge = s0 * 2.0 ** (k - k0)
        sides += [edge, edge * 2.0 ** -5e-7, edge * 2.0 ** -2e-6, edge * (1 + 1e-3), edge * (1 - 1e-3)]
    return sides


def multiscale_configs():
    configs = []
    image_hw = (512, 640)
    for vi, sr in enumerate((2, -1)):
        rng = np.random.default_rng([20261128, 100, vi])
        feats = pyramid(rng, 2, 1, image_hw, (4, 8, 16, 32))
        k = 24
        cx, cy = rng.uniform(0, 640, k), rng.uniform(0, 512, k)
        side = np.exp(rng.uniform(np.log(8), np.log(700), (2, k)))
        boxes = np.stack([cx - side[0] / 2, cy - side[1] / 2, cx + side[0] / 2, cy + side[1] / 2], 1)
        sides = boundary_sides()
        exact = np.array([[100.0, 80.0, 100.0 + s, 80.0 + s] for s in sides])
        odd = np.array([
            [-40.0, -30.0, 60.0, 50.0],      # partly outside
            [700.0, 600.0, 900.0, 800.0],    # wholly outside
            [10.0, 10.0, 10.4, 10.3],        # tiny
            [50.0, 50.0, 50.0, 90.0],        # zero area: k_min
            [300.0, 100.0, 200.0, 400.0],    # inverted in x: negative area, no level
            [300.0, 400.0, 200.0, 100.0],    # inverted in both: positive area
            [0.0, 0.0, 640.0, 512.0],        # the whole image
        ])
        all_boxes = np.concatenate([boxes, exact, odd])
        split = [all_boxes[: len(all_boxes) // 2], all_boxes[len(all_boxes) // 2:]]
        configs.append(dict(name=f"fpn_p2p5_sr{sr}", feats=feats, boxes=split, names=list(feats),
                            image_shapes=[image_hw, (480, 600)], size=(7, 7), sr=sr, s0=224, k0=4))
    rng = np.random.default_rng([20261128, 200])
    feats = pyramid(rng, 2, 2, (96, 128), (2, 4, 8, 16))
    feats["pool"] = rng.standard_normal((2, 2, 3, 4))  # not named: must be ignored
    boxes = [random_rois(rng, 8, 1, 96, 128, 1.0)[:, 1:], np.zeros((0, 4))]
    configs.append(dict(name="subset_p2p3p4_s0_56_k0_3", feats=feats, boxes=boxes, names=["p2", "p3", "p4"],
                        image_shapes=[(96, 128), (90, 120)], size=(3, 2), sr=2, s0=56, k0=3))
    rng = np.random.default_rng([20261128, 300])
    feats = pyramid(rng, 1, 2, (64, 64), (8,))
    boxes = [np.array([[1.0, 2.0, 30.0, 40.0], [40.0, 10.0, 20.0, 50.0], [-5.0, -5.0, 70.0, 70.0]])]
    configs.append(dict(name="single_level", feats=feats, boxes=boxes, names=["p3"],
                        image_shapes=[(64, 64)], size=(2, 2), sr=-1, s0=224, k0=4))
    rng = np.random.default_rng([20261128, 400])
    feats = pyramid(rng, 2, 2, (64, 96), (4, 8))
    configs.append(dict(name="no_boxes", feats=feats, boxes=[np.zeros((0, 4)), np.zeros((0, 4))],
                        names=["p2", "p3"], image_shapes=[(64, 96)], size=(2, 2), sr=2, s0=224, k0=4))
    return configs


def run_multiscale(cfg, dt):
    pooler = MultiScaleRoIAlign(cfg["names"], cfg["size"], cfg["sr"],
                                canonical_scale=cfg["s0"], canonical_level=cfg["k0"])
    feats = OrderedDict((k, torch.from_numpy(v.astype(dt)).requires_grad_(True)) for k, v in cfg["feats"].items())
    boxes = [torch.from_numpy(b.astype(dt)) for b in cfg["boxes"]]
    out = pooler(feats, boxes, cfg["image_shapes"])
    used = [k for k in feats if k in cfg["names"]]
    rng = np.random.default_rng([20261128, 7, len(cfg["name"])])
    gout = rng.standard_normal(tuple(out.shape)).astype(dt)
    grads = torch.autograd.grad(out, [feats[k] for k in used], torch.from_numpy(gout), allow_unused=True)
    grads = [np.zeros(feats[k].shape, dt) if g is None else g.numpy() for k, g in zip(used, grads)]
    if len(used) > 1:
        lv = pooler.map_levels(boxes).numpy()
        lv = np.where((lv >= 0) & (lv < len(used)), lv, -1)
    else:
        lv = np.zeros(out.shape[0], np.int64)
    rois = np.concatenate([np.concatenate([np.full((len(b), 1), i, dt), b.astype(dt)], 1)
                           for i, b in enumerate(cfg["boxes"])]) if cfg["boxes"] else np.zeros((0, 5), dt)
    return dict(out=out.detach().numpy(), gout=gout, grads=grads, levels=lv.astype(np.int64),
                scales=np.array(pooler.scales, np.float64), used=[cfg["feats"][k].astype(dt) for k in used],
                rois=rois)


def main():
    assert torchvision.extension._has_ops(), "torchvision C++ ops are required"
    torch.manual_seed(0)
    torch.set_num_threads(1)
    arrays, i = {}, 0
    for cfg in ps_configs():
        for dt in DTYPES:
            x, rois = cfg["x"].astype(dt), cfg["rois"].astype(dt)
            c_out = x.shape[1] // (cfg["size"][0] * cfg["size"][1])
            rng = np.random.default_rng([20261128, 9, i // 2])
            gout = rng.standard_normal((len(rois), c_out, *cfg["size"])).astype(dt)
            out, gin = run_ps(cfg["op"], x, rois, cfg["size"], cfg["scale"], cfg["sr"], gout)
            p = f"case{i:03d}_"
            arrays.update({
                p + "name": np.array(f"{cfg['name']}_{np.dtype(dt).name}"), p + "op": np.array(cfg["op"]),
                p + "input": x, p + "rois": rois, p + "output_size": np.array(cfg["size"], np.int64),
                p + "spatial_scale": np.array(cfg["scale"], np.float64), p + "grad_output": gout,
                p + "output": out, p + "grad_input": gin,
            })
            if cfg["sr"] is not None:
                arrays[p + "sampling_ratio"] = np.array(cfg["sr"], np.int64)
            i += 1
    for cfg in multiscale_configs():
        for dt in DTYPES:
            r = run_multiscale(cfg, dt)
            p = f"case{i:03d}_"
            arrays.update({
                p + "name": np.array(f"{cfg['name']}_{np.dtype(dt).name}"), p + "op": np.array("multiscale_roi_align"),
                p + "rois": r["rois"], p + "output_size": np.array(cfg["size"], np.int64),
                p + "grad_output": r["gout"], p + "output": r["out"], p + "num_levels": np.array(len(r["used"])),
                p + "image_shapes": np.array(cfg["image_shapes"], np.int64), p + "scales": r["scales"],
                p + "levels": r["levels"], p + "sampling_ratio": np.array(cfg["sr"], np.int64),
                p + "canonical_scale": np.array(cfg["s0"], np.float64),
                p + "canonical_level": np.array(cfg["k0"], np.int64),
            })
            for level, (f, g) in enumerate(zip(r["used"], r["grads"])):
                arrays[p + f"feature{level}"] = f
                arrays[p + f"grad_feature{level}"] = g
            i += 1
    arrays["num_cases"] = np.array(i, np.int64)
    arrays["torch_version"] = np.array(torch.__version__)
    arrays["torchvision_version"] = np.array(torchvision.__version__)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **arrays)
    print(f"wrote {OUT}: {i} cases, {OUT.stat().st_size / 1e6:.2f} MB, torchvision {torchvision.__version__}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
