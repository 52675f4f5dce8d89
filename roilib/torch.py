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


# ------------------------------------- FPN multiscale RoIAlign, PS-RoIPool, PS-RoIAlign
#
# Their kernels have an atomic backward only (a deterministic one is planned): on CUDA
# the backward uses it unless torch.use_deterministic_algorithms(True) is on, in which
# case it raises (or warns, with warn_only=True) as torch's own nondeterministic ops do.

__all__ += ["multiscale_roi_align", "ps_roi_pool", "ps_roi_align", "MultiScaleRoIAlign", "PSRoIPool", "PSRoIAlign"]


def _alert_not_deterministic(name: str) -> None:
    """torch's ``alertNotDeterministic``: raise (or warn) when determinism is required."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (
        f"{name} does not have a deterministic implementation, but you set "
        "'torch.use_deterministic_algorithms(True)'. You can turn off determinism just for this "
        "operation, or you can use the 'warn_only=True' option, if that's acceptable for your application."
    )
    if torch.is_deterministic_algorithms_warn_only_enabled():
        import warnings

        warnings.warn(message)
        return
    raise RuntimeError(message)


def _run_atomic(name: str, tensors: Tuple[Tensor, ...], *args):
    """Like :func:`_run`, for ops whose CUDA backward exists only with atomics.

    ``tensors`` may contain lists of tensors (a pyramid), passed on as lists of arrays.
    """
    first = tensors[0][0] if isinstance(tensors[0], (list, tuple)) else tensors[0]
    backend = _backend(first)
    arrays = [[_to_array(t) for t in a] if isinstance(a, (list, tuple)) else _to_array(a) for a in tensors]

    def wrap(result):
        if isinstance(result, (list, tuple)):
            return [_to_tensor(r, first) for r in result]
        return _to_tensor(result, first)

    if not first.is_cuda:
        return wrap(getattr(backend, name)(*arrays, *args))
    import cupy

    kwargs = {}
    if name.endswith("backward"):
        _alert_not_deterministic(f"roilib.{name} (CUDA)")
        kwargs["deterministic"] = False
    with cupy.cuda.ExternalStream(torch.cuda.current_stream(first.device).cuda_stream):
        return wrap(getattr(backend, name)(*arrays, *args, **kwargs))


@torch.library.custom_op("roilib::ps_roi_pool", mutates_args=())
def _ps_roi_pool(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    return _run_atomic("ps_roi_pool", (input, rois.to(input.dtype)), tuple(output_size), spatial_scale)


@_ps_roi_pool.register_fake
def _(input, rois, output_size, spatial_scale):
    c_out = input.shape[1] // (output_size[0] * output_size[1])
    return input.new_empty((rois.shape[0], c_out, output_size[0], output_size[1]))


@torch.library.custom_op("roilib::ps_roi_pool_backward", mutates_args=())
def _ps_roi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    return _run_atomic("ps_roi_pool_backward", (grad, input, rois.to(input.dtype)), tuple(output_size), spatial_scale)


@_ps_roi_pool_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale):
    return torch.empty_like(input)


@torch.library.custom_op("roilib::ps_roi_align", mutates_args=())
def _ps_roi_align(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int) -> Tensor:
    return _run_atomic("ps_roi_align", (input, rois.to(input.dtype)), tuple(output_size), spatial_scale, sampling_ratio)


@_ps_roi_align.register_fake
def _(input, rois, output_size, spatial_scale, sampling_ratio):
    c_out = input.shape[1] // (output_size[0] * output_size[1])
    return input.new_empty((rois.shape[0], c_out, output_size[0], output_size[1]))


@torch.library.custom_op("roilib::ps_roi_align_backward", mutates_args=())
def _ps_roi_align_backward(
    grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int
) -> Tensor:
    return _run_atomic(
        "ps_roi_align_backward", (grad, input, rois.to(input.dtype)), tuple(output_size), spatial_scale, sampling_ratio
    )


@_ps_roi_align_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale, sampling_ratio):
    return torch.empty_like(input)


_register_backward(_ps_roi_pool, _ps_roi_pool_backward)
_register_backward(_ps_roi_align, _ps_roi_align_backward)


def _check_ps_channels(input: Tensor, output_size: List[int]) -> None:
    if input.dim() == 4 and input.shape[1] % (output_size[0] * output_size[1]) != 0:
        raise ValueError(
            f"input has {input.shape[1]} channels, which is not a multiple of PH * PW = "
            f"{output_size[0]} * {output_size[1]} = {output_size[0] * output_size[1]}"
        )


def ps_roi_pool(input: Tensor, boxes: BoxesLike, output_size, spatial_scale: float = 1.0) -> Tensor:
    """Position-sensitive RoIPool (R-FCN), as ``torchvision.ops.ps_roi_pool``;
    differentiable in ``input``.

    ``input`` has ``C_out * PH * PW`` channels; output ``(c, ph, pw)`` averages channel
    ``(c * PH + ph) * PW + pw`` over its bin. The backward is the forward's exact
    transpose (torchvision's differs at the map's last row/column; see the API page).

    Returns
    -------
    Tensor, shape (K, C_out, PH, PW)
    """
    size = _pair(output_size)
    _check_ps_channels(input, size)
    return _ps_roi_pool(input, _as_rois(boxes, input), size, float(spatial_scale))


def ps_roi_align(input: Tensor, boxes: BoxesLike, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1) -> Tensor:
    """Position-sensitive RoIAlign, as ``torchvision.ops.ps_roi_align`` (half-pixel
    offset always on); differentiable in ``input``. A box whose adaptive grid is empty
    gives 0 where torchvision gives NaN.

    Returns
    -------
    Tensor, shape (K, C_out, PH, PW)
    """
    size = _pair(output_size)
    _check_ps_channels(input, size)
    return _ps_roi_align(input, _as_rois(boxes, input), size, float(spatial_scale), int(sampling_ratio))


@torch.library.custom_op("roilib::multiscale_roi_align", mutates_args=())
def _multiscale_roi_align(
    features: List[Tensor], rois: Tensor, output_size: List[int], scales: List[float], sampling_ratio: int,
    canonical_scale: float, canonical_level: int, eps: float, aligned: bool,
) -> Tensor:
    return _run_atomic(
        "multiscale_roi_align", (list(features), rois.to(features[0].dtype)), tuple(output_size), list(scales),
        sampling_ratio, canonical_scale, canonical_level, eps, aligned,
    )


@_multiscale_roi_align.register_fake
def _(features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level, eps, aligned):
    return features[0].new_empty((rois.shape[0], features[0].shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("roilib::multiscale_roi_align_backward", mutates_args=())
def _multiscale_roi_align_backward(
    grad: Tensor, features: List[Tensor], rois: Tensor, output_size: List[int], scales: List[float],
    sampling_ratio: int, canonical_scale: float, canonical_level: int, eps: float, aligned: bool,
) -> List[Tensor]:
    return _run_atomic(
        "multiscale_roi_align_backward", (grad, list(features), rois.to(features[0].dtype)), tuple(output_size),
        list(scales), sampling_ratio, canonical_scale, canonical_level, eps, aligned,
    )


@_multiscale_roi_align_backward.register_fake
def _(grad, features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level, eps, aligned):
    return [torch.empty_like(f) for f in features]


def _multiscale_setup(ctx, inputs, output):
    features, rois, *args = inputs
    ctx.save_for_backward(rois, *features)
    ctx.args = args


def _multiscale_backward_rule(ctx, grad):
    rois, *features = ctx.saved_tensors
    grads = None
    if ctx.needs_input_grad[0]:
        grads = list(_multiscale_roi_align_backward(grad.contiguous(), features, rois, *ctx.args))
    return (grads, None) + (None,) * len(ctx.args)


_multiscale_roi_align.register_autograd(_multiscale_backward_rule, setup_context=_multiscale_setup)


def multiscale_roi_align(
    features: Sequence[Tensor],
    boxes: BoxesLike,
    output_size,
    scales: Sequence[float],
    sampling_ratio: int = 2,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    eps: float = 1e-6,
    aligned: bool = False,
) -> Tensor:
    """RoIAlign over a feature pyramid, each box on its FPN level, in one call;
    differentiable in every map.

    Parameters
    ----------
    features : list of Tensor, each (N, C, H_l, W_l), finest first
    boxes : Tensor (K, 5) or list of (K_i, 4) Tensors, image pixels
    output_size : int or (int, int)
    scales : list of float
        Each map's spatial scale (powers of two, halving level to level).
    sampling_ratio, canonical_scale, canonical_level, eps, aligned
        As in :func:`roilib.multiscale_roi_align`.

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
    """
    features = list(features)
    if not features:
        raise ValueError("features must hold at least one map")
    return _multiscale_roi_align(
        features, _as_rois(boxes, features[0]), _pair(output_size), [float(s) for s in scales], int(sampling_ratio),
        float(canonical_scale), int(canonical_level), float(eps), bool(aligned),
    )


class PSRoIPool(nn.Module):
    """``nn.Module`` form of :func:`ps_roi_pool` (torchvision's ``PSRoIPool``)."""

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return ps_roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class PSRoIAlign(nn.Module):
    """``nn.Module`` form of :func:`ps_roi_align` (torchvision's ``PSRoIAlign``)."""

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int):
        super().__init__()
        self.output_size, self.spatial_scale, self.sampling_ratio = output_size, spatial_scale, sampling_ratio

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return ps_roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}"


class MultiScaleRoIAlign(nn.Module):
    """Drop-in for ``torchvision.ops.MultiScaleRoIAlign``, pooling all levels in one call.

    ``forward(x, boxes, image_shapes)`` takes a dict of maps (those named in
    ``featmap_names`` are used, in the dict's order, finest first), a list of per-image
    ``(K_i, 4)`` boxes in image pixels and the images' ``(height, width)`` before
    padding. As in torchvision, each map's scale is inferred on the first call from the
    largest image size (the power of two nearest ``map size / image size``) and then
    kept; the pyramid levels follow from the scales; each box is pooled by RoIAlign
    (``aligned=False``) on level ``floor(canonical_level + log2(sqrt(w h) /
    canonical_scale) + 1e-6)``, clamped to the levels present.

    Unlike torchvision, names missing from ``x``, and scales that differ between the
    height and the width or do not halve from one map to the next, raise a
    ``ValueError`` instead of pooling silently from the wrong level.
    """

    def __init__(self, featmap_names: List[str], output_size, sampling_ratio: int, *, canonical_scale: int = 224,
                 canonical_level: int = 4):
        super().__init__()
        if isinstance(output_size, int):
            output_size = (output_size, output_size)
        self.featmap_names = featmap_names
        self.sampling_ratio = sampling_ratio
        self.output_size = tuple(output_size)
        self.scales = None
        self.canonical_scale = canonical_scale
        self.canonical_level = canonical_level

    def _select(self, x) -> List[Tensor]:
        missing = [name for name in self.featmap_names if name not in x]
        if missing:
            raise ValueError(f"featmap_names {missing} are not among the feature maps' names {list(x)}")
        return [v for k, v in x.items() if k in self.featmap_names]

    def _setup_scales(self, maps: List[Tensor], image_shapes) -> List[float]:
        from ._validate import check_scales
        from .family import infer_scale

        if not image_shapes:
            raise ValueError("image_shapes must list at least one (height, width)")
        largest = (max(int(s[0]) for s in image_shapes), max(int(s[1]) for s in image_shapes))
        scales = []
        for m in maps:
            from_h, from_w = infer_scale(tuple(m.shape[-2:]), largest)
            if from_h != from_w:
                raise ValueError(
                    f"mismatched scales: a map of size {tuple(m.shape[-2:])} for images up to {largest} has scale "
                    f"{from_h} by its height but {from_w} by its width"
                )
            scales.append(from_h)
        check_scales(scales, len(maps))
        return scales

    def forward(self, x, boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        maps = self._select(x)
        if self.scales is None:
            self.scales = self._setup_scales(maps, image_shapes)
        return multiscale_roi_align(
            maps, boxes, self.output_size, self.scales, self.sampling_ratio, self.canonical_scale, self.canonical_level
        )

    def extra_repr(self) -> str:
        return f"featmap_names={self.featmap_names}, output_size={self.output_size}, sampling_ratio={self.sampling_ratio}"
