"""PyTorch bridge: roilib's ops as differentiable, ``torch.compile``-able torch ops.

The functions and modules mirror ``torchvision.ops`` (same argument names and order),
with roilib's extras: RoIAlign's ``mode="max"``, RoIWarp, SPP, and gradients with
respect to the RoIAlign and RoIWarp box coordinates.

CPU tensors run the NumPy reference (:mod:`roilib.reference`), CUDA tensors the CUDA
kernels (:mod:`roilib.cuda.gpu`) through DLPack, without copies, on torch's current
stream. Each op is registered with ``torch.library.custom_op`` (namespace ``roilib``)
with a fake implementation for shape propagation and a registered backward, so it works
in eager mode, under ``torch.autograd.gradcheck`` and inside ``torch.compile`` graphs.

On CUDA, each op runs on its tensors' own device and torch's current stream there,
with no host synchronisation (box values are checked by the kernels, which output NaN
for a bad row), and every tensor it returns (and every scratch buffer) comes from
torch's caching allocator. The input gradient uses the kernels' deterministic
backward when ``torch.are_deterministic_algorithms_enabled()`` (or when
``roilib.torch.DETERMINISTIC`` is set to ``True``; ``False`` forces the atomic one).

float16 and bfloat16 inputs compute in float32, with float32 boxes. Under
``torch.autocast`` (CPU or CUDA) the ops behave as torchvision's: they compute in
float32 and return the input's dtype.
"""
from __future__ import annotations

import contextlib
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn

from . import reference

__all__ = ["roi_align", "roi_pool", "roi_warp", "spp", "RoIAlign", "RoIPool", "RoIWarp", "SPP", "DETERMINISTIC"]

#: CUDA input gradients: ``None`` follows ``torch.are_deterministic_algorithms_enabled()``
#: (as torchvision does); ``True``/``False`` force the deterministic/atomic backward
DETERMINISTIC: Optional[bool] = None

BoxesLike = Union[Tensor, Sequence[Tensor]]


# ----------------------------------------------------------------------------- backends

_NUMPY_TO_TORCH = {
    np.dtype(np.float16): torch.float16,
    np.dtype(np.float32): torch.float32,
    np.dtype(np.float64): torch.float64,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.uint8): torch.uint8,
}
#: dtypes the kernels read directly; others (bfloat16) are computed in float32
_NATIVE = (torch.float16, torch.float32, torch.float64)


def _box_dtype(input: Tensor) -> torch.dtype:
    """Boxes stay float32 for half-precision inputs: float16 steps by 1 px past 1024."""
    return input.dtype if input.dtype in (torch.float32, torch.float64) else torch.float32


def _deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled() if DETERMINISTIC is None else bool(DETERMINISTIC)


def _to_array(t: Tensor):
    """A NumPy (CPU) or CuPy (CUDA) view of a tensor, sharing its memory."""
    t = t.detach().contiguous()
    if t.is_cuda:
        import cupy

        return cupy.from_dlpack(t)
    return t.numpy()


class _TorchBuffers:
    """Buffers for the kernels' host code, allocated by torch on one device.

    ``alloc`` is given to ``roilib.cuda._host.use_allocator``: it makes a tensor with
    ``torch.empty`` and hands CuPy a view of it. ``tensor_of`` finds the tensor behind
    the array an op returns, so the caller gets torch's own tensor back. ``cupy_malloc``
    serves CuPy's internal temporaries (a prefix sum's scratch) from torch too, so
    nothing in an op touches CuPy's memory pool.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.made: Dict[Tuple[int, tuple, str], Tensor] = {}

    def alloc(self, shape, dtype):
        import cupy

        t = torch.empty(shape, dtype=_NUMPY_TO_TORCH[np.dtype(dtype)], device=self.device)
        a = cupy.from_dlpack(t)
        self.made[(a.data.ptr, a.shape, a.dtype.str)] = t
        return a

    def cupy_malloc(self, size: int):
        import cupy

        t = torch.empty(max(int(size), 1), dtype=torch.uint8, device=self.device)
        memory = cupy.cuda.UnownedMemory(t.data_ptr(), t.numel(), t, self.device.index)
        return cupy.cuda.MemoryPointer(memory, 0)

    def tensor_of(self, a) -> Tensor:
        t = self.made.get((a.data.ptr, a.shape, a.dtype.str))
        return t if t is not None else torch.from_dlpack(a)


def _run_cuda(name: str, tensors, args, kwargs, device: torch.device):
    """Run op ``name`` of the CuPy backend on ``device`` and torch's current stream there.

    The DLPack exchanges happen inside the stream scope, so producer and consumer are the
    same stream and torch inserts no cross-stream wait (which CUDA-graph capture forbids
    against CuPy's default stream).
    """
    import cupy

    from .cuda import _host, gpu

    buffers = _TorchBuffers(device)
    with contextlib.ExitStack() as scope:
        scope.enter_context(torch.cuda.device(device))
        scope.enter_context(cupy.cuda.Device(device.index))
        scope.enter_context(gpu.external_stream(torch.cuda.current_stream(device), device.index))
        scope.enter_context(cupy.cuda.using_allocator(buffers.cupy_malloc))
        scope.enter_context(_host.use_allocator(buffers.alloc))
        arrays = [_to_array(t) for t in tensors]
        return buffers.tensor_of(getattr(gpu, name)(*arrays, *args, **kwargs))


def _run(name: str, tensors: Tuple[Tensor, ...], *args) -> Tensor:
    """Call op ``name`` of the tensors' backend: NumPy on the CPU, the kernels on CUDA.

    Tensors the kernels cannot read (bfloat16) are computed in float32 and the result
    is returned in their dtype.
    """
    first = tensors[0]
    narrow = first.dtype if first.is_floating_point() and first.dtype not in _NATIVE else None
    if narrow is not None:
        tensors = tuple(t.float() if t.dtype == narrow else t for t in tensors)
    if first.is_cuda:
        kwargs = {}
        if name.endswith("backward") and not name.endswith("rois_backward"):
            kwargs["deterministic"] = _deterministic()
        out = _run_cuda(name, tensors, args, kwargs, first.device)
    else:
        arrays = [_to_array(t) for t in tensors]
        out = torch.from_numpy(np.ascontiguousarray(getattr(reference, name)(*arrays, *args)))
    return out.to(narrow) if narrow is not None and out.is_floating_point() else out


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
    return _run("roi_align", (input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, sampling_ratio, aligned, mode)


@_roi_align.register_fake
def _(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("roilib::roi_align_backward", mutates_args=())
def _roi_align_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    return _run("roi_align_backward", (grad, input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, sampling_ratio, aligned, mode)


@_roi_align_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
    return torch.empty_like(input)


@torch.library.custom_op("roilib::roi_align_rois_backward", mutates_args=())
def _roi_align_rois_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool, mode: str) -> Tensor:
    out = _run("roi_align_rois_backward", (grad, input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, sampling_ratio, aligned, mode)
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
    return _run("roi_pool", (input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale)


@_roi_pool.register_fake
def _(input, rois, output_size, spatial_scale):
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("roilib::roi_pool_backward", mutates_args=())
def _roi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    return _run("roi_pool_backward", (grad, input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale)


@_roi_pool_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale):
    return torch.empty_like(input)


@torch.library.custom_op("roilib::roi_warp", mutates_args=())
def _roi_warp(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, mode: str) -> Tensor:
    return _run("roi_warp", (input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, sampling_ratio, mode)


@_roi_warp.register_fake
def _(input, rois, output_size, spatial_scale, sampling_ratio, mode):
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("roilib::roi_warp_backward", mutates_args=())
def _roi_warp_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, mode: str) -> Tensor:
    return _run("roi_warp_backward", (grad, input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, sampling_ratio, mode)


@_roi_warp_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale, sampling_ratio, mode):
    return torch.empty_like(input)


@torch.library.custom_op("roilib::roi_warp_rois_backward", mutates_args=())
def _roi_warp_rois_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, mode: str) -> Tensor:
    out = _run("roi_warp_rois_backward", (grad, input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, sampling_ratio, mode)
    return out.to(rois.dtype)


@_roi_warp_rois_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale, sampling_ratio, mode):
    return torch.empty_like(rois)


_register_backward(_roi_pool, _roi_pool_backward)
_register_backward(_roi_warp, _roi_warp_backward, _roi_warp_rois_backward)


def roi_pool(input: Tensor, boxes: BoxesLike, output_size, spatial_scale: float = 1.0) -> Tensor:
    """RoIPool, as ``torchvision.ops.roi_pool``; differentiable in ``input``.

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
    """
    return _roi_pool(input, _as_rois(boxes, input), _pair(output_size), float(spatial_scale))


def roi_warp(input: Tensor, boxes: BoxesLike, output_size, spatial_scale: float = 1.0, sampling_ratio: int = -1, mode: str = "max") -> Tensor:
    """RoIWarp, MNC's RoI warping layer; differentiable in ``input`` and, as in MNC, in
    the box coordinates (the rounding of the corners taken as the identity; see
    :func:`roilib.roi_warp_rois_backward`).

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


# --------------------------------------------------------------------------- autocast

_autocast_library = torch.library.Library("roilib", "IMPL")


def _register_autocast(name: str) -> None:
    """Give op ``roilib::<name>`` torchvision's autocast rule, on the CPU and on CUDA:
    float16/bfloat16 tensor arguments are cast to float32, the op runs with autocast
    off, and the output comes back in the input's dtype (float64 is left alone)."""
    op = getattr(torch.ops.roilib, name)

    def make_kernel(device_type: str):
        def kernel(input, *args):
            with torch.autocast(device_type, enabled=False):
                cast = [
                    a.float() if isinstance(a, Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a
                    for a in (input, *args)
                ]
                out = op(*cast)
            return out.to(input.dtype)

        return kernel

    for device_type in ("cpu", "cuda"):
        _autocast_library.impl(name, make_kernel(device_type), "Autocast" + device_type.upper())


for _name in ("roi_align", "roi_pool", "roi_warp", "spp"):
    _register_autocast(_name)


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

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int = -1, mode: str = "max"):
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
