"""PyTorch bridge: roilib's ops as differentiable, ``torch.compile``-able torch ops.

The functions and modules mirror ``torchvision.ops`` (same argument names and order),
with roilib's extras: RoIAlign's ``mode="max"``, RoIWarp, SPP, and gradients with
respect to the RoIAlign box coordinates.

CPU tensors run the NumPy reference (:mod:`roilib.reference`), CUDA tensors the CUDA
kernels (:mod:`roilib.cuda.gpu`) through DLPack, without copies, on torch's current
stream. Each op is registered with ``torch.library.custom_op`` (namespace ``roilib``)
with a fake implementation for shape propagation and a registered backward, so it works
in eager mode, under ``torch.autograd.gradcheck`` and inside ``torch.compile`` graphs.

On CUDA the input gradient uses the kernels' deterministic backward unless
``torch.use_deterministic_algorithms`` is off *and* ``roilib.torch.DETERMINISTIC`` is
set to ``False``.
"""
from __future__ import annotations

from typing import List, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import reference

__all__ = ["roi_align", "roi_pool", "roi_warp", "spp", "RoIAlign", "RoIPool", "RoIWarp", "SPP", "DETERMINISTIC"]

#: use the deterministic (atomic-free) CUDA backward
DETERMINISTIC = True

BoxesLike = Union[Tensor, Sequence[Tensor]]


# ----------------------------------------------------------------------------- backends


def _backend(t: Tensor):
    if t.is_cuda:
        from .cuda import gpu

        return gpu
    return reference


def _to_array(t: Tensor):
    """A NumPy (CPU) or CuPy (CUDA) view of a tensor, sharing its memory."""
    t = t.detach().contiguous()
    if t.is_cuda:
        import cupy

        return cupy.from_dlpack(t)
    return t.numpy()


def _to_tensor(a, like: Tensor) -> Tensor:
    if isinstance(a, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(a)).to(like.device)
    return torch.from_dlpack(a)


def _run(name: str, tensors: Tuple[Tensor, ...], *args) -> Tensor:
    """Call op ``name`` of the tensors' backend (on torch's current CUDA stream)."""
    first = tensors[0]
    backend = _backend(first)
    arrays = [_to_array(t) for t in tensors]
    kwargs = {}
    if not first.is_cuda:
        return _to_tensor(getattr(backend, name)(*arrays, *args), first)
    import cupy

    if name.endswith("backward") and name != "roi_align_rois_backward":
        kwargs["deterministic"] = DETERMINISTIC or torch.are_deterministic_algorithms_enabled()
    with cupy.cuda.ExternalStream(torch.cuda.current_stream(first.device).cuda_stream):
        return _to_tensor(getattr(backend, name)(*arrays, *args, **kwargs), first)


def _pair(output_size) -> List[int]:
    if isinstance(output_size, int):
        return [output_size, output_size]
    return [int(v) for v in output_size]


def _as_rois(boxes: BoxesLike, input: Tensor) -> Tensor:
    """torchvision's two box formats -> one ``(K, 5)`` tensor (keeps autograd)."""
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 4:
                raise ValueError(f"boxes[{i}] must be a tensor of shape (K_{i}, 4)")
        if not boxes:
            return input.new_zeros((0, 5))
        index = torch.cat([torch.full((b.shape[0], 1), float(i), dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)])
        return torch.cat([index, torch.cat(list(boxes))], dim=1)
    if not isinstance(boxes, Tensor):
        raise TypeError(f"boxes must be a (K, 5) tensor or a list of (K_i, 4) tensors, got {type(boxes).__name__}")
    return boxes


# ------------------------------------------------------------------------ RoIAlign op


@torch.library.custom_op("roilib::roi_align", mutates_args=())
def _roi_align(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    return _run("roi_align", (input, rois.to(input.dtype)), tuple(output_size), spatial_scale, sampling_ratio, aligned, mode)


@_roi_align.register_fake
def _(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("roilib::roi_align_backward", mutates_args=())
def _roi_align_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    return _run("roi_align_backward", (grad, input, rois.to(input.dtype)), tuple(output_size), spatial_scale, sampling_ratio, aligned, mode)


@_roi_align_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    return torch.empty_like(input)


@torch.library.custom_op("roilib::roi_align_rois_backward", mutates_args=())
def _roi_align_rois_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    out = _run("roi_align_rois_backward", (grad, input, rois.to(input.dtype)), tuple(output_size), spatial_scale, sampling_ratio, aligned, mode)
    return out.to(rois.dtype)


@_roi_align_rois_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    return torch.empty_like(rois)


def _register_backward(op, input_backward, rois_backward=None):
    """Give ``op(input, rois, *args)`` a backward: ``input_backward`` for the input and,
    when given, ``rois_backward`` for the box coordinates (else boxes get no gradient)."""

    def setup(ctx, inputs, output):
        input, rois, *args = inputs
        ctx.save_for_backward(input, rois)
        ctx.args = args

    def backward(ctx, grad):
        input, rois = ctx.saved_tensors
        grad_input = input_backward(grad, input, rois, *ctx.args) if ctx.needs_input_grad[0] else None
        wants_rois = rois_backward is not None and ctx.needs_input_grad[1]
        grad_rois = rois_backward(grad, input, rois, *ctx.args) if wants_rois else None
        return (grad_input, grad_rois) + (None,) * len(ctx.args)

    op.register_autograd(backward, setup_context=setup)


_register_backward(_roi_align, _roi_align_backward, _roi_align_rois_backward)


def roi_align(
    input: Tensor,
    boxes: BoxesLike,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
) -> Tensor:
    """RoIAlign, as ``torchvision.ops.roi_align`` (plus ``mode``), differentiable in
    ``input`` and in the box coordinates.

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W)
    boxes : Tensor (K, 5) ``[batch_index, x1, y1, x2, y2]`` or list of (K_i, 4) Tensors
    output_size : int or (int, int)
    spatial_scale : float
    sampling_ratio : int
    aligned : bool
    mode : {"avg", "max"}

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
    """
    return _roi_align(input, _as_rois(boxes, input), _pair(output_size), float(spatial_scale), int(sampling_ratio), bool(aligned), mode)


# ------------------------------------------------------------ RoIPool and RoIWarp ops


@torch.library.custom_op("roilib::roi_pool", mutates_args=())
def _roi_pool(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    return _run("roi_pool", (input, rois.to(input.dtype)), tuple(output_size), spatial_scale)


@_roi_pool.register_fake
def _(input, rois, output_size, spatial_scale):
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("roilib::roi_pool_backward", mutates_args=())
def _roi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    return _run("roi_pool_backward", (grad, input, rois.to(input.dtype)), tuple(output_size), spatial_scale)


@_roi_pool_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale):
    return torch.empty_like(input)


@torch.library.custom_op("roilib::roi_warp", mutates_args=())
def _roi_warp(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, mode: str) -> Tensor:
    return _run("roi_warp", (input, rois.to(input.dtype)), tuple(output_size), spatial_scale, sampling_ratio, mode)


@_roi_warp.register_fake
def _(input, rois, output_size, spatial_scale, sampling_ratio, mode):
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("roilib::roi_warp_backward", mutates_args=())
def _roi_warp_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, mode: str) -> Tensor:
    return _run("roi_warp_backward", (grad, input, rois.to(input.dtype)), tuple(output_size), spatial_scale, sampling_ratio, mode)


@_roi_warp_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale, sampling_ratio, mode):
    return torch.empty_like(input)


_register_backward(_roi_pool, _roi_pool_backward)
_register_backward(_roi_warp, _roi_warp_backward)


def roi_pool(input: Tensor, boxes: BoxesLike, output_size, spatial_scale: float = 1.0) -> Tensor:
    """RoIPool, as ``torchvision.ops.roi_pool``; differentiable in ``input``.

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
    """
    return _roi_pool(input, _as_rois(boxes, input), _pair(output_size), float(spatial_scale))


def roi_warp(input: Tensor, boxes: BoxesLike, output_size, spatial_scale: float = 1.0, sampling_ratio: int = 2, mode: str = "max") -> Tensor:
    """RoIWarp (MNC): RoIPool's rounded box sampled bilinearly; differentiable in ``input``.

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
    """
    return _roi_warp(input, _as_rois(boxes, input), _pair(output_size), float(spatial_scale), int(sampling_ratio), mode)


# ------------------------------------------------------------------------------ SPP op


@torch.library.custom_op("roilib::spp", mutates_args=())
def _spp(input: Tensor, levels: List[int], mode: str) -> Tensor:
    return _run("spp", (input,), tuple(levels), mode)


@_spp.register_fake
def _(input, levels, mode):
    return input.new_empty((input.shape[0], input.shape[1] * sum(n * n for n in levels)))


@torch.library.custom_op("roilib::spp_backward", mutates_args=())
def _spp_backward(grad: Tensor, input: Tensor, levels: List[int], mode: str) -> Tensor:
    return _run("spp_backward", (grad, input), tuple(levels), mode)


@_spp_backward.register_fake
def _(grad, input, levels, mode):
    return torch.empty_like(input)


def _spp_setup(ctx, inputs, output):
    input, levels, mode = inputs
    ctx.save_for_backward(input)
    ctx.args = (levels, mode)


def _spp_backward_rule(ctx, grad):
    (input,) = ctx.saved_tensors
    return _spp_backward(grad, input, *ctx.args), None, None


_spp.register_autograd(_spp_backward_rule, setup_context=_spp_setup)


def spp(input: Tensor, levels: Sequence[int] = (4, 2, 1), mode: str = "max") -> Tensor:
    """Spatial pyramid pooling of whole maps; differentiable in ``input``.

    Returns
    -------
    Tensor, shape (N, C * sum(n * n for n in levels))
    """
    return _spp(input, [int(n) for n in levels], mode)


# ---------------------------------------------------------------------------- modules


class RoIAlign(nn.Module):
    """``nn.Module`` form of :func:`roi_align` (same arguments as torchvision's)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False, mode: str = "avg"):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned, self.mode = sampling_ratio, aligned, mode

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned, self.mode)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, mode={self.mode!r}"
        )


class RoIPool(nn.Module):
    """``nn.Module`` form of :func:`roi_pool` (same arguments as torchvision's)."""

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class RoIWarp(nn.Module):
    """``nn.Module`` form of :func:`roi_warp`."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int = 2, mode: str = "max"):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.mode = sampling_ratio, mode

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return roi_warp(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.mode)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, mode={self.mode!r}"


class SPP(nn.Module):
    """``nn.Module`` form of :func:`spp`."""

    def __init__(self, levels: Sequence[int] = (4, 2, 1), mode: str = "max"):
        super().__init__()
        self.levels, self.mode = tuple(levels), mode

    def forward(self, input: Tensor) -> Tensor:
        return spp(input, self.levels, self.mode)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, mode={self.mode!r}"


# ------------------------------------------- rotated RoIAlign and Precise RoI Pooling
#
# Their CUDA input gradients exist only with atomics: the bridge uses them unless
# torch.use_deterministic_algorithms(True) is set, and then raises (or warns, with
# warn_only=True) as torchvision's ops do.


def _alert_not_deterministic(name: str) -> None:
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{name} does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for "
        "this operation, or you can use the 'warn_only=True' option, if that's acceptable "
        "for your application."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        import warnings

        warnings.warn(message)
        return
    raise RuntimeError(message)


def _run_atomic(name: str, tensors: Tuple[Tensor, ...], *args) -> Tensor:
    """Like :func:`_run`, for ops whose CUDA input gradient has only the atomic kernel."""
    first = tensors[0]
    arrays = [_to_array(t) for t in tensors]
    if not first.is_cuda:
        return _to_tensor(getattr(reference, name)(*arrays, *args), first)
    import cupy

    from .cuda import gpu

    kwargs = {}
    if name.endswith("_backward") and not name.endswith("rois_backward"):
        _alert_not_deterministic(f"roilib::{name}")
        kwargs["deterministic"] = False
    with cupy.cuda.ExternalStream(torch.cuda.current_stream(first.device).cuda_stream):
        return _to_tensor(getattr(gpu, name)(*arrays, *args, **kwargs), first)


def _as_rotated_rois(boxes: BoxesLike, input: Tensor) -> Tensor:
    """``(K, 6)`` rotated boxes from a tensor or a list of per-image ``(K_i, 5)`` tensors."""
    if isinstance(boxes, (list, tuple)):
        for i, b in enumerate(boxes):
            if not isinstance(b, Tensor) or b.dim() != 2 or b.shape[1] != 5:
                raise ValueError(f"boxes[{i}] must be a tensor of shape (K_{i}, 5) [cx, cy, w, h, angle_degrees]")
        if not boxes:
            return input.new_zeros((0, 6))
        index = torch.cat([torch.full((b.shape[0], 1), float(i), dtype=b.dtype, device=b.device) for i, b in enumerate(boxes)])
        return torch.cat([index, torch.cat(list(boxes))], dim=1)
    if not isinstance(boxes, Tensor):
        raise TypeError(f"boxes must be a (K, 6) tensor or a list of (K_i, 5) tensors, got {type(boxes).__name__}")
    return boxes


@torch.library.custom_op("roilib::roi_align_rotated", mutates_args=())
def _roi_align_rotated(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    return _run_atomic("roi_align_rotated", (input, rois.to(input.dtype)), tuple(output_size), spatial_scale, sampling_ratio, aligned)


@_roi_align_rotated.register_fake
def _(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("roilib::roi_align_rotated_backward", mutates_args=())
def _roi_align_rotated_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    return _run_atomic("roi_align_rotated_backward", (grad, input, rois.to(input.dtype)), tuple(output_size), spatial_scale, sampling_ratio, aligned)


@_roi_align_rotated_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return torch.empty_like(input)


@torch.library.custom_op("roilib::roi_align_rotated_rois_backward", mutates_args=())
def _roi_align_rotated_rois_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    out = _run_atomic("roi_align_rotated_rois_backward", (grad, input, rois.to(input.dtype)), tuple(output_size), spatial_scale, sampling_ratio, aligned)
    return out.to(rois.dtype)


@_roi_align_rotated_rois_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return torch.empty_like(rois)


@torch.library.custom_op("roilib::prroi_pool", mutates_args=())
def _prroi_pool(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    return _run_atomic("prroi_pool", (input, rois.to(input.dtype)), tuple(output_size), spatial_scale)


@_prroi_pool.register_fake
def _(input, rois, output_size, spatial_scale):
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("roilib::prroi_pool_backward", mutates_args=())
def _prroi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    return _run_atomic("prroi_pool_backward", (grad, input, rois.to(input.dtype)), tuple(output_size), spatial_scale)


@_prroi_pool_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale):
    return torch.empty_like(input)


@torch.library.custom_op("roilib::prroi_pool_rois_backward", mutates_args=())
def _prroi_pool_rois_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    out = _run_atomic("prroi_pool_rois_backward", (grad, input, rois.to(input.dtype)), tuple(output_size), spatial_scale)
    return out.to(rois.dtype)


@_prroi_pool_rois_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale):
    return torch.empty_like(rois)


_register_backward(_roi_align_rotated, _roi_align_rotated_backward, _roi_align_rotated_rois_backward)
_register_backward(_prroi_pool, _prroi_pool_backward, _prroi_pool_rois_backward)


def roi_align_rotated(
    input: Tensor,
    boxes: BoxesLike,
    output_size,
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = True,
) -> Tensor:
    """Rotated RoIAlign (detectron2's ``ROIAlignRotated``), differentiable in ``input`` and
    in the box coordinates (centre, size and angle).

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W)
    boxes : Tensor (K, 6) ``[batch_index, cx, cy, w, h, angle_degrees]`` or list of
        (K_i, 5) Tensors ``[cx, cy, w, h, angle_degrees]``
    output_size : int or (int, int)
    spatial_scale : float
    sampling_ratio : int
    aligned : bool
        ``True`` (detectron2); ``False`` is mmcv's legacy option.

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
    """
    return _roi_align_rotated(
        input, _as_rotated_rois(boxes, input), _pair(output_size), float(spatial_scale), int(sampling_ratio), bool(aligned)
    )


def prroi_pool(input: Tensor, boxes: BoxesLike, output_size, spatial_scale: float = 1.0) -> Tensor:
    """Precise RoI Pooling (IoU-Net), differentiable in ``input`` and in the box coordinates.

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W)
    boxes : Tensor (K, 5) ``[batch_index, x1, y1, x2, y2]`` or list of (K_i, 4) Tensors
    output_size : int or (int, int)
    spatial_scale : float

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
    """
    return _prroi_pool(input, _as_rois(boxes, input), _pair(output_size), float(spatial_scale))


class RoIAlignRotated(nn.Module):
    """``nn.Module`` form of :func:`roi_align_rotated` (detectron2's ``ROIAlignRotated``)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = True):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale
        self.sampling_ratio, self.aligned = sampling_ratio, aligned

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return roi_align_rotated(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}"
        )


class PrRoIPool(nn.Module):
    """``nn.Module`` form of :func:`prroi_pool` (mmcv's ``PrRoIPool``)."""

    def __init__(self, output_size, spatial_scale: float = 1.0):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return prroi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


__all__ += ["roi_align_rotated", "prroi_pool", "RoIAlignRotated", "PrRoIPool"]
