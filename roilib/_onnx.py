"""ONNX export of :mod:`roilib.torch`'s ops.

Two exporters, one mapping:

* RoIAlign with ``mode="avg"`` -> ONNX ``RoiAlign`` (opset 16 or later, where it has
  ``coordinate_transformation_mode``): ``aligned=True`` is ``"half_pixel"`` (the half
  cell shift), ``aligned=False`` is ``"output_half_pixel"`` (no shift, legacy), and
  roilib's adaptive ``sampling_ratio <= 0`` is ONNX's ``0`` (adaptive,
  ``ceil(roi_size / output_size)`` per box and axis). ONNX wants the batch index apart
  from the box corners, as an int64 vector, so the ``(K, 5)`` rois are split.
* RoIPool -> ONNX ``MaxRoiPool`` (Fast R-CNN's layer; rois stay ``(K, 5)``).
* Max-mode RoIAlign, RoIWarp and SPP raise :class:`OnnxExportError` at export. ONNX's
  ``RoiAlign(mode="max")`` is a different operator (the max over the four weighted
  corners of each sample, not the max over interpolated samples that roilib and mmcv
  compute), and ONNX has no RoIWarp or pyramid pooling.

:func:`register_symbolics` teaches the TorchScript-based exporter
(``torch.onnx.export(..., dynamo=False)``); :mod:`roilib.torch` calls it on import.
:func:`translations` is the table for the dynamo-based exporter's
``custom_translation_table``; it imports ``onnxscript``.
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch

#: first ONNX opset whose RoiAlign has ``coordinate_transformation_mode``
ROI_ALIGN_OPSET = 16


class OnnxExportError(RuntimeError):
    """An op, or an op's setting, that ONNX cannot express."""


_WHY = {
    "roi_align_max": (
        "roilib.torch.roi_align(mode='max') cannot be exported to ONNX: ONNX RoiAlign's mode='max' "
        "is a different operator (the max over each sample's four bilinearly weighted corners), "
        "while roilib takes the max over the interpolated samples (mmcv's definition). "
        "Export mode='avg', or keep this op in PyTorch."
    ),
    "roi_warp": (
        "roilib.torch.roi_warp (RoIWarp) cannot be exported to ONNX: ONNX has no operator that "
        "samples RoIPool's rounded box bilinearly. Keep this op in PyTorch, or use roi_align."
    ),
    "spp": (
        "roilib.torch.spp (spatial pyramid pooling) cannot be exported to ONNX: ONNX has no "
        "pyramid pooling with SPP-net's bin rule. Keep this op in PyTorch."
    ),
}


def _sampling_ratio(sampling_ratio: int) -> int:
    """roilib's adaptive ``sampling_ratio <= 0`` is ONNX's ``0``."""
    return max(int(sampling_ratio), 0)


def _coordinate_mode(aligned: bool) -> str:
    return "half_pixel" if aligned else "output_half_pixel"


# ------------------------------------------------------------- TorchScript-based exporter


def _ts_roi_align(g, input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    """``roilib::roi_align`` -> ``RoiAlign`` (arguments after ``rois`` arrive as constants)."""
    if mode != "avg":
        raise OnnxExportError(_WHY["roi_align_max"])
    rois = g.op("CastLike", rois, input)
    batch_indices = g.op(
        "Cast", g.op("Gather", rois, g.op("Constant", value_t=torch.tensor(0)), axis_i=1), to_i=7  # INT64
    )
    corners = g.op("Gather", rois, g.op("Constant", value_t=torch.tensor([1, 2, 3, 4])), axis_i=1)
    return g.op(
        "RoiAlign",
        input,
        corners,
        batch_indices,
        coordinate_transformation_mode_s=_coordinate_mode(bool(aligned)),
        mode_s="avg",
        output_height_i=int(output_size[0]),
        output_width_i=int(output_size[1]),
        sampling_ratio_i=_sampling_ratio(sampling_ratio),
        spatial_scale_f=float(spatial_scale),
    )


def _ts_roi_align_old_opset(g, *args):
    raise OnnxExportError(
        f"roilib.torch.roi_align exports to ONNX RoiAlign from opset {ROI_ALIGN_OPSET} on "
        f"(coordinate_transformation_mode); pass opset_version={ROI_ALIGN_OPSET} or later"
    )


def _ts_roi_pool(g, input, rois, output_size, spatial_scale):
    """``roilib::roi_pool`` -> ``MaxRoiPool``."""
    return g.op(
        "MaxRoiPool",
        input,
        g.op("CastLike", rois, input),
        pooled_shape_i=[int(v) for v in output_size],
        spatial_scale_f=float(spatial_scale),
    )


def _ts_unsupported(key: str) -> Callable:
    def symbolic(g, *args):
        raise OnnxExportError(_WHY[key])

    return symbolic


_registered = False


def register_symbolics() -> None:
    """Register roilib's ops with the TorchScript-based ONNX exporter (idempotent)."""
    global _registered
    if _registered:
        return
    from torch.onnx import register_custom_op_symbolic
    from torch.onnx.symbolic_helper import parse_args

    # parse_args turns the traced constants into Python values: v(alue), i(nt)s, f(loat), ...
    roi_align = parse_args("v", "v", "is", "f", "i", "b", "s")(_ts_roi_align)
    roi_pool = parse_args("v", "v", "is", "f")(_ts_roi_pool)
    register_custom_op_symbolic("roilib::roi_align", _ts_roi_align_old_opset, 7)
    register_custom_op_symbolic("roilib::roi_align", roi_align, ROI_ALIGN_OPSET)
    # CastLike (the rois take the input's dtype, as in the op) needs opset 15
    register_custom_op_symbolic("roilib::roi_pool", roi_pool, 15)
    register_custom_op_symbolic("roilib::roi_warp", _ts_unsupported("roi_warp"), 7)
    register_custom_op_symbolic("roilib::spp", _ts_unsupported("spp"), 7)
    _registered = True


# ---------------------------------------------------------------- dynamo-based exporter


def _dynamo_roi_align(
    input,
    rois,
    output_size: Sequence[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    mode: str,
):
    from onnxscript import opset18 as op

    if mode != "avg":
        raise OnnxExportError(_WHY["roi_align_max"])
    rois = op.CastLike(rois, input)
    batch_indices = op.Cast(op.Gather(rois, op.Constant(value_int=0), axis=1), to=7)  # INT64
    corners = op.Gather(rois, op.Constant(value_ints=[1, 2, 3, 4]), axis=1)
    return op.RoiAlign(
        input,
        corners,
        batch_indices,
        coordinate_transformation_mode=_coordinate_mode(bool(aligned)),
        mode="avg",
        output_height=int(output_size[0]),
        output_width=int(output_size[1]),
        sampling_ratio=_sampling_ratio(sampling_ratio),
        spatial_scale=float(spatial_scale),
    )


def _dynamo_roi_pool(input, rois, output_size: Sequence[int], spatial_scale: float):
    from onnxscript import opset18 as op

    return op.MaxRoiPool(
        input,
        op.CastLike(rois, input),
        pooled_shape=[int(v) for v in output_size],
        spatial_scale=float(spatial_scale),
    )


def _dynamo_roi_warp(input, rois, output_size: Sequence[int], spatial_scale: float, sampling_ratio: int, mode: str):
    raise OnnxExportError(_WHY["roi_warp"])


def _dynamo_spp(input, levels: Sequence[int], mode: str):
    raise OnnxExportError(_WHY["spp"])


def translations() -> Dict[Callable, Callable]:
    """``{torch op overload: ONNX translation}`` for ``custom_translation_table``."""
    ops = torch.ops.roilib
    return {
        ops.roi_align.default: _dynamo_roi_align,
        ops.roi_pool.default: _dynamo_roi_pool,
        ops.roi_warp.default: _dynamo_roi_warp,
        ops.spp.default: _dynamo_spp,
    }
