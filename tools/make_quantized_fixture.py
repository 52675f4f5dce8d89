"""Generate ``tests/fixtures/torchvision_qroi_align.npz``: torchvision's quantized RoIAlign.

roilib's torch bridge accepts quantized inputs to ``roi_align`` as torchvision's
quantized RoIAlign does. This script records what torchvision computes, so that
``tests/test_torch_script_fx.py`` can compare without torchvision. Run it with a Python
that has torch and torchvision::

    /path/to/python-with-torchvision tools/make_quantized_fixture.py

Per case ``i`` (keys prefixed ``case{i:02d}_``): ``dtype`` ("quint8" or "qint8"),
``input_int`` (the integer representation, ``(1, C, H, W)``), ``input_scale``,
``input_zero_point``, ``rois_int``, ``rois_scale``, ``rois_zero_point``, ``output_size``,
``spatial_scale``, ``sampling_ratio``, ``aligned`` and ``output_int`` (torchvision's
result, quantized with the input's scale and zero point). torchvision allows one image
per batch for quantized inputs.
"""
from pathlib import Path

import numpy as np
import torch
import torchvision
from torchvision.ops import roi_align

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "torchvision_qroi_align.npz"


def main() -> None:
    rng = np.random.default_rng(10)
    data = {"torch_version": np.array(torch.__version__), "torchvision_version": np.array(torchvision.__version__)}
    cases = [
        (dtype, output_size, spatial_scale, sampling_ratio, aligned)
        for dtype in ("quint8", "qint8")
        for output_size, spatial_scale in (((3, 2), 0.5), ((7, 7), 0.25))
        for sampling_ratio in (-1, 2)
        for aligned in (False, True)
    ]
    for i, (dtype, output_size, spatial_scale, sampling_ratio, aligned) in enumerate(cases):
        qdtype = getattr(torch, dtype)
        x = torch.tensor(rng.standard_normal((1, 3, 12, 14)), dtype=torch.float32)
        zero_point = 128 if dtype == "quint8" else 0
        qx = torch.quantize_per_tensor(x, 0.05, zero_point, qdtype)
        # boxes inside the image (quint8/qint8 rois cannot hold negative or large values)
        lo = rng.uniform(0.0, 10.0, (6, 2))
        hi = lo + rng.uniform(0.5, 12.0, (6, 2))
        rois = torch.tensor(np.concatenate([np.zeros((6, 1)), lo, hi], 1), dtype=torch.float32)
        qrois = torch.quantize_per_tensor(rois, 0.125, 0, qdtype)
        out = roi_align(qx, qrois, output_size, spatial_scale, sampling_ratio, aligned)
        values = dict(
            dtype=np.array(dtype),
            input_int=qx.int_repr().numpy(),
            input_scale=np.float64(qx.q_scale()),
            input_zero_point=np.int64(qx.q_zero_point()),
            rois_int=qrois.int_repr().numpy(),
            rois_scale=np.float64(qrois.q_scale()),
            rois_zero_point=np.int64(qrois.q_zero_point()),
            output_size=np.array(output_size, dtype=np.int64),
            spatial_scale=np.float64(spatial_scale),
            sampling_ratio=np.int64(sampling_ratio),
            aligned=np.bool_(aligned),
            output_int=out.int_repr().numpy(),
        )
        data.update({f"case{i:02d}_{k}": v for k, v in values.items()})
    data["num_cases"] = np.int64(len(cases))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(OUT, **data)
    print(f"wrote {OUT.relative_to(OUT.parents[2])}: {len(cases)} cases, torchvision {torchvision.__version__}")


if __name__ == "__main__":
    main()
