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
import math
import numbers
import operator
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import Tensor, nn
from torch.jit.annotations import BroadcastingList2

from . import _validate, reference

__all__ = [
    "roi_align",
    "roi_pool",
    "roi_warp",
    "spp",
    "RoIAlign",
    "RoIPool",
    "RoIWarp",
    "SPP",
    "DETERMINISTIC",
    "onnx_translations",
]

#: CUDA input gradients: ``None`` follows ``torch.are_deterministic_algorithms_enabled()``
#: (as torchvision does); ``True``/``False`` force the deterministic/atomic backward
DETERMINISTIC: Optional[bool] = None

#: torchvision's two box formats; ``List`` (not ``Sequence``) so that TorchScript accepts it
BoxesLike = Union[Tensor, List[Tensor]]


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
        arrays = [_each(_to_array, t) for t in tensors]
        return _each(buffers.tensor_of, getattr(gpu, name)(*arrays, *args, **kwargs))


def _each(f, obj):
    """``f`` applied to a tensor, or to each tensor of a list (a pyramid of maps)."""
    return [f(t) for t in obj] if isinstance(obj, (list, tuple)) else f(obj)


def _run(name: str, tensors: Tuple, *args, deterministic: Optional[bool] = None):
    """Call op ``name`` of the tensors' backend: NumPy on the CPU, the kernels on CUDA.

    An entry of ``tensors`` may be a list of tensors (a pyramid), and the result a list.
    Tensors the kernels cannot read (bfloat16) are computed in float32 and the result
    is returned in their dtype. ``deterministic`` overrides :func:`_deterministic` for a
    CUDA input gradient.
    """
    first = tensors[0][0] if isinstance(tensors[0], (list, tuple)) else tensors[0]
    narrow = first.dtype if first.is_floating_point() and first.dtype not in _NATIVE else None
    if narrow is not None:
        tensors = tuple(_each(lambda t: t.float() if t.dtype == narrow else t, a) for a in tensors)
    if first.is_cuda:
        kwargs = {}
        if name.endswith("backward") and not name.endswith("rois_backward"):
            kwargs["deterministic"] = _deterministic() if deterministic is None else deterministic
        out = _run_cuda(name, tensors, args, kwargs, first.device)
    else:
        arrays = [_each(_to_array, a) for a in tensors]
        out = _each(lambda a: torch.from_numpy(np.ascontiguousarray(a)), getattr(reference, name)(*arrays, *args))
    if narrow is None:
        return out
    return _each(lambda t: t.to(narrow) if t.is_floating_point() else t, out)


# ------------------------------------------------------------- argument normalisation
#
# The public functions below are written in the subset of Python that TorchScript
# compiles. Eager-only conveniences (NumPy scalars, tuples of boxes, quantized tensors)
# sit under ``if not torch.jit.is_scripting():``, a branch TorchScript does not compile.


def _index(value, name: str) -> int:
    """``value`` as a Python int; accepts NumPy and 0-d tensor integers, rejects
    floats and bools (``operator.index`` semantics)."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be an integer, got bool {value!r}")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}") from None


def _spatial_scale(value) -> float:
    """``spatial_scale`` as a positive finite Python float (NumPy scalars welcome).

    Checked with :mod:`math`, not NumPy, so that ``torch.compile`` traces it as constants."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"spatial_scale must be a real number (1 / stride), got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"spatial_scale must be positive and finite (1 / stride), got {value!r}")
    return value


@torch.jit.unused
def _pair_eager(output_size: List[int]) -> List[int]:
    """Eager-mode ``output_size`` (an integer or a pair; NumPy integers welcome) ->
    ``[h, w]`` of positive Python ints."""
    if isinstance(output_size, (numbers.Integral, np.integer)) or (
        isinstance(output_size, (np.ndarray, Tensor)) and output_size.ndim == 0
    ):
        values = [_index(output_size, "output_size")] * 2
    else:
        try:
            if isinstance(output_size, (str, bytes)):
                raise TypeError
            items = list(output_size)
        except TypeError:
            raise TypeError(
                f"output_size must be an integer or a pair of integers (h, w), got {type(output_size).__name__}"
            ) from None
        if len(items) != 2:
            raise ValueError(f"output_size must be an integer or a pair of integers (h, w), got {len(items)} values")
        values = [_index(v, "output_size") for v in items]
    if min(values) < 1:
        raise ValueError(f"output_size must be positive, got {tuple(values)}")
    return values


def _pair(output_size: List[int]) -> List[int]:
    """``output_size`` -> ``[h, w]``. Under TorchScript a ``BroadcastingList2[int]``
    argument already arrives as a list of two ints (an int is repeated)."""
    if torch.jit.is_scripting():
        if len(output_size) != 2 or min(output_size) < 1:
            raise ValueError("output_size must be a positive integer or a pair of positive integers (h, w)")
        return output_size
    return _pair_eager(output_size)


@torch.jit.unused
def _traced_call(name: str, *args):
    """Inside ``torch.fx`` tracing, a call with a ``Proxy`` argument becomes one graph node
    that calls the public function ``name`` (a leaf, as ``torch.fx.wrap`` makes it);
    otherwise ``None``.

    ``torch.fx.wrap`` covers calls through this module's namespace (``rt.roi_align``,
    the modules); this also covers a name imported into the caller's own module."""
    tensors = list(args[:2]) + (list(args[1]) if isinstance(args[1], (list, tuple)) else [])
    proxies = [a for a in tensors if isinstance(a, torch.fx.Proxy)]
    if not proxies:
        return None
    # the function itself, not the stand-in torch.fx.wrap puts in this module's globals
    return proxies[0].tracer.create_proxy("call_function", _FX_LEAVES[name], args, {})


def _check_input(input: Tensor) -> None:
    if not isinstance(input, Tensor):
        raise TypeError(f"input must be a torch.Tensor of shape (N, C, H, W), got {type(input).__name__}")


def _as_rois(boxes: BoxesLike, input: Tensor) -> Tensor:
    """torchvision's two box formats -> one ``(K, 5)`` tensor (keeps autograd).

    A ``(K, 5)`` tensor ``[batch_index, x1, y1, x2, y2]`` passes through; a list (or,
    in eager mode, a tuple) of per-image ``(K_i, 4)`` tensors gets batch index ``i``.
    """
    if not torch.jit.is_scripting():
        if isinstance(boxes, tuple):
            boxes = list(boxes)
        if not isinstance(boxes, (Tensor, list)):
            raise TypeError(
                f"boxes must be a (K, 5) tensor or a list of (K_i, 4) tensors, got {type(boxes).__name__}"
            )
        if isinstance(boxes, list):
            for i, b in enumerate(boxes):
                if not isinstance(b, Tensor):
                    raise TypeError(f"boxes[{i}] must be a tensor of shape (K_{i}, 4), got {type(b).__name__}")
    # (shape checks are skipped while torch.jit.trace records: the op checks the values)
    if isinstance(boxes, Tensor):
        if not torch.jit.is_tracing() and (boxes.dim() != 2 or boxes.size(1) != 5):
            raise ValueError(
                f"boxes: a single tensor of rois must have shape (K, 5) [batch_index, x1, y1, x2, y2] "
                f"(or pass a list of (K_i, 4) tensors), got shape {list(boxes.shape)}"
            )
        return boxes
    if len(boxes) == 0:
        return input.new_zeros((0, 5))
    index: List[Tensor] = []
    for i, b in enumerate(boxes):
        if not torch.jit.is_tracing() and (b.dim() != 2 or b.size(1) != 4):
            raise ValueError(f"boxes[{i}] must be a tensor of shape (K_{i}, 4), got shape {list(b.shape)}")
        index.append(torch.full_like(b[:, :1], float(i)))
    return torch.cat([torch.cat(index), torch.cat(boxes)], dim=1)


@torch.jit.unused
def _levels(levels: List[int]) -> List[int]:
    """Eager-mode SPP ``levels`` (a sequence of positive integers) -> list of Python ints."""
    if isinstance(levels, (numbers.Integral, np.integer, str)):
        raise TypeError(f"levels must be a sequence of integers such as (4, 2, 1), got {levels!r}")
    values = [_index(n, "levels") for n in levels]
    if not values or min(values) < 1:
        raise ValueError(f"levels must be a non-empty sequence of positive integers, got {tuple(values)}")
    return values


@torch.jit.unused
def _quantized_roi_align(
    input: Tensor,
    boxes: BoxesLike,
    output_size: List[int],
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    mode: str,
) -> Tensor:
    """RoIAlign of a per-tensor quantized ``input`` (quint8, qint8, qint32), as
    torchvision's quantized RoIAlign defines it: the dequantized values are pooled in
    float32 and the result is quantized with the input's scale and zero point. Boxes
    may be quantized (dequantized first) or floating point."""
    if input.qscheme() not in (torch.per_tensor_affine, torch.per_tensor_symmetric):
        raise TypeError(f"a quantized input must be quantized per tensor, got qscheme {input.qscheme()}")

    def dequantize(b):
        return b.dequantize() if isinstance(b, Tensor) and b.is_quantized else b

    boxes = [dequantize(b) for b in boxes] if isinstance(boxes, (list, tuple)) else dequantize(boxes)
    out = roi_align(input.dequantize(), boxes, output_size, spatial_scale, sampling_ratio, aligned, mode)
    return torch.quantize_per_tensor(out, input.q_scale(), input.q_zero_point(), input.dtype)


def _reject_quantized(input: Tensor, op: str) -> None:
    if input.is_quantized:
        raise TypeError(
            f"{op} does not take a quantized input (like torchvision, roilib supports quantized tensors "
            f"in roi_align only); pass input.dequantize()"
        )


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


@torch.fx.wrap
def roi_align(
    input: Tensor,
    boxes: BoxesLike,
    output_size: BroadcastingList2[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
) -> Tensor:
    """RoIAlign, as ``torchvision.ops.roi_align`` (plus ``mode``), differentiable in
    ``input`` and in the box coordinates.

    Works in eager mode, under ``torch.compile``, ``torch.jit.script``/``trace`` and
    ``torch.fx.symbolic_trace`` (a leaf call, as torchvision's), and exports to ONNX
    ``RoiAlign`` (``mode="avg"``; see :func:`onnx_translations`).

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W)
        Floating point, or (eager mode) quantized per tensor: then it is dequantized,
        pooled in float32 and quantized again with its scale and zero point.
    boxes : Tensor (K, 5) ``[batch_index, x1, y1, x2, y2]`` or list of (K_i, 4) Tensors
    output_size : int or (int, int)
        Python or NumPy integers.
    spatial_scale : float
    sampling_ratio : int
        Samples per bin and axis; ``<= 0`` is adaptive (``ceil(roi_size / output_size)``).
    aligned : bool
    mode : {"avg", "max"}

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
    """
    if not torch.jit.is_scripting():
        traced = _traced_call("roi_align", input, boxes, output_size, spatial_scale, sampling_ratio, aligned, mode)
        if traced is not None:
            return traced
        _check_input(input)
        if input.is_quantized:
            return _quantized_roi_align(input, boxes, output_size, spatial_scale, sampling_ratio, aligned, mode)
        spatial_scale = _spatial_scale(spatial_scale)
        sampling_ratio = _validate.check_sampling_ratio(sampling_ratio)
        aligned = _validate.check_aligned(aligned)
        mode = _validate.check_mode(mode)
    rois = _as_rois(boxes, input)
    return torch.ops.roilib.roi_align(input, rois, _pair(output_size), spatial_scale, sampling_ratio, aligned, mode)


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


# RoIPool with its argmax kept for the backward (CPU, eager training). ``roilib::roi_pool``
# alone must find every bin's max again in its backward, which costs as much as the
# forward; this pair of ops keeps the forward's argmax instead, as torchvision's does.
# Traces, exports and CUDA tensors use ``roilib::roi_pool`` (one output, ONNX MaxRoiPool).


@torch.library.custom_op("roilib::roi_pool_with_argmax", mutates_args=())
def _roi_pool_with_argmax(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tuple[Tensor, Tensor]:
    if input.is_cuda:
        raise NotImplementedError("roilib::roi_pool_with_argmax runs on CPU tensors; CUDA uses roilib::roi_pool")
    out, argmax = _run("roi_pool", (input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, True)
    return out, argmax


@_roi_pool_with_argmax.register_fake
def _(input, rois, output_size, spatial_scale):
    shape = (rois.shape[0], input.shape[1], output_size[0], output_size[1])
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("roilib::roi_pool_argmax_backward", mutates_args=())
def _roi_pool_argmax_backward(
    grad: Tensor, input: Tensor, rois: Tensor, argmax: Tensor, output_size: List[int], spatial_scale: float
) -> Tensor:
    dtype, rois = input.dtype, rois.to(_box_dtype(input))
    if dtype not in _NATIVE:  # bfloat16 computes in float32, as in _run
        grad, input = grad.float(), input.float()
    g, x, r, arg = [_to_array(t) for t in (grad, input, rois, argmax)]
    out = reference.roi_pool_backward(g, x, r, tuple(output_size), spatial_scale, argmax=arg)
    return torch.from_numpy(np.ascontiguousarray(out)).to(dtype)


@_roi_pool_argmax_backward.register_fake
def _(grad, input, rois, argmax, output_size, spatial_scale):
    return torch.empty_like(input)


def _roi_pool_with_argmax_setup(ctx, inputs, output):
    input, rois, output_size, spatial_scale = inputs
    ctx.save_for_backward(input, rois, output[1])
    ctx.args = (output_size, spatial_scale)


def _roi_pool_with_argmax_grad(ctx, grad, grad_argmax):
    input, rois, argmax = ctx.saved_tensors
    grad_input = None
    if ctx.needs_input_grad[0]:
        grad_input = _roi_pool_argmax_backward(grad, input, rois, argmax, *ctx.args)
    return grad_input, None, None, None


_roi_pool_with_argmax.register_autograd(_roi_pool_with_argmax_grad, setup_context=_roi_pool_with_argmax_setup)


def _keeps_argmax(input: Tensor) -> bool:
    """Whether :func:`roi_pool` takes the argmax-keeping op: an eager CPU call that
    autograd records (never while tracing or exporting, which want one output)."""
    if torch.jit.is_scripting():
        return input.requires_grad and torch.is_grad_enabled() and not input.is_cuda
    if torch.jit.is_tracing() or torch.compiler.is_exporting() or torch.onnx.is_in_onnx_export():
        return False
    return input.requires_grad and torch.is_grad_enabled() and not input.is_cuda


@torch.fx.wrap
def roi_pool(input: Tensor, boxes: BoxesLike, output_size: BroadcastingList2[int], spatial_scale: float = 1.0) -> Tensor:
    """RoIPool, as ``torchvision.ops.roi_pool``; differentiable in ``input``.

    When autograd records a CPU call, the forward keeps each bin's argmax for the
    backward (as torchvision's op does), so the backward only routes gradients; traced,
    exported and CUDA calls use the one-output op. Exports to ONNX ``MaxRoiPool``.

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
    if not torch.jit.is_scripting():
        traced = _traced_call("roi_pool", input, boxes, output_size, spatial_scale)
        if traced is not None:
            return traced
        _check_input(input)
        _reject_quantized(input, "roi_pool")
        spatial_scale = _spatial_scale(spatial_scale)
    rois = _as_rois(boxes, input)
    if _keeps_argmax(input):
        return torch.ops.roilib.roi_pool_with_argmax(input, rois, _pair(output_size), spatial_scale)[0]
    return torch.ops.roilib.roi_pool(input, rois, _pair(output_size), spatial_scale)


@torch.fx.wrap
def roi_warp(
    input: Tensor,
    boxes: BoxesLike,
    output_size: BroadcastingList2[int],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    mode: str = "max",
) -> Tensor:
    """RoIWarp, MNC's RoI warping layer; differentiable in ``input`` and, as in MNC, in
    the box coordinates (the rounding of the corners taken as the identity; see
    :func:`roilib.roi_warp_rois_backward`).

    ONNX has no equivalent: exporting it raises an error.

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W)
    boxes : Tensor (K, 5) ``[batch_index, x1, y1, x2, y2]`` or list of (K_i, 4) Tensors
    output_size : int or (int, int)
    spatial_scale : float
    sampling_ratio : int
    mode : {"max", "avg"}

    Returns
    -------
    Tensor, shape (K, C, PH, PW)
    """
    if not torch.jit.is_scripting():
        traced = _traced_call("roi_warp", input, boxes, output_size, spatial_scale, sampling_ratio, mode)
        if traced is not None:
            return traced
        _check_input(input)
        _reject_quantized(input, "roi_warp")
        spatial_scale = _spatial_scale(spatial_scale)
        sampling_ratio = _validate.check_sampling_ratio(sampling_ratio)
        mode = _validate.check_mode(mode)
    rois = _as_rois(boxes, input)
    return torch.ops.roilib.roi_warp(input, rois, _pair(output_size), spatial_scale, sampling_ratio, mode)


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


@torch.fx.wrap
def spp(input: Tensor, levels: List[int] = (4, 2, 1), mode: str = "max") -> Tensor:
    """Spatial pyramid pooling of whole maps; differentiable in ``input``.

    ONNX has no equivalent: exporting it raises an error.

    Parameters
    ----------
    input : Tensor, shape (N, C, H, W)
    levels : sequence of int
        Bins per axis of each pyramid level, coarse to fine as given.
    mode : {"max", "avg"}

    Returns
    -------
    Tensor, shape (N, C * sum(n * n for n in levels))
    """
    if not torch.jit.is_scripting():
        traced = _traced_call("spp", input, levels, mode)
        if traced is not None:
            return traced
        _check_input(input)
        _reject_quantized(input, "spp")
        levels = _levels(levels)
        mode = _validate.check_mode(mode)
    return torch.ops.roilib.spp(input, levels, mode)


#: the public functions as defined (torch.fx.wrap swaps the module globals while tracing)
_FX_LEAVES = {"roi_align": roi_align, "roi_pool": roi_pool, "roi_warp": roi_warp, "spp": spp}


# --------------------------------------------------------------------------- autocast

_autocast_library = torch.library.Library("roilib", "IMPL")


def _register_autocast(name: str) -> None:
    """Give op ``roilib::<name>`` torchvision's autocast rule, on the CPU and on CUDA:
    float16/bfloat16 tensor arguments are cast to float32, the op runs with autocast
    off, and the output comes back in the input's dtype (float64 is left alone)."""
    op = getattr(torch.ops.roilib, name)

    def make_kernel(device_type: str):
        def widen(a):
            if isinstance(a, (list, tuple)):
                return [widen(t) for t in a]
            return a.float() if isinstance(a, Tensor) and a.dtype in (torch.float16, torch.bfloat16) else a

        def kernel(input, *args):
            with torch.autocast(device_type, enabled=False):
                out = op(*[widen(a) for a in (input, *args)])
            return out.to(input[0].dtype if isinstance(input, (list, tuple)) else input.dtype)

        return kernel

    for device_type in ("cpu", "cuda"):
        _autocast_library.impl(name, make_kernel(device_type), "Autocast" + device_type.upper())


for _name in ("roi_align", "roi_pool", "roi_warp", "spp"):
    _register_autocast(_name)


# ---------------------------------------------------------------------------- modules
#
# Constructor arguments are stored as plain Python values (an int or a tuple of ints for
# ``output_size``, a list for ``levels``), so that ``torch.jit.script`` can type the
# module's attributes even when they were given as NumPy scalars.


def _size_attribute(output_size) -> Union[int, Tuple[int, int]]:
    """``output_size`` as given (int or pair), converted to Python ints and checked."""
    h, w = _pair_eager(output_size)
    if isinstance(output_size, (numbers.Integral, np.integer)):
        return h
    return (h, w)


class RoIAlign(nn.Module):
    """``nn.Module`` form of :func:`roi_align` (same arguments as torchvision's, plus ``mode``).

    Parameters
    ----------
    output_size : int or (int, int)
    spatial_scale : float
    sampling_ratio : int
    aligned : bool, default False
    mode : {"avg", "max"}, default "avg"
    """

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int, aligned: bool = False, mode: str = "avg"):
        super().__init__()
        self.output_size = _size_attribute(output_size)
        self.spatial_scale = _spatial_scale(spatial_scale)
        self.sampling_ratio = _validate.check_sampling_ratio(sampling_ratio)
        self.aligned, self.mode = _validate.check_aligned(aligned), _validate.check_mode(mode)

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return roi_align(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned, self.mode)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}, mode={self.mode!r}"
        )


class RoIPool(nn.Module):
    """``nn.Module`` form of :func:`roi_pool` (same arguments as torchvision's).

    Parameters
    ----------
    output_size : int or (int, int)
    spatial_scale : float
    """

    def __init__(self, output_size, spatial_scale: float):
        super().__init__()
        self.output_size = _size_attribute(output_size)
        self.spatial_scale = _spatial_scale(spatial_scale)

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return roi_pool(input, rois, self.output_size, self.spatial_scale)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class RoIWarp(nn.Module):
    """``nn.Module`` form of :func:`roi_warp`.

    Parameters
    ----------
    output_size : int or (int, int)
    spatial_scale : float
    sampling_ratio : int, default -1 (MNC's adaptive step)
    mode : {"max"}, default "max" (MNC's layer takes the largest sample)
    """

    def __init__(self, output_size, spatial_scale: float, sampling_ratio: int = -1, mode: str = "max"):
        super().__init__()
        self.output_size = _size_attribute(output_size)
        self.spatial_scale = _spatial_scale(spatial_scale)
        self.sampling_ratio = _validate.check_sampling_ratio(sampling_ratio)
        self.mode = _validate.check_mode(mode)

    def forward(self, input: Tensor, rois: BoxesLike) -> Tensor:
        return roi_warp(input, rois, self.output_size, self.spatial_scale, self.sampling_ratio, self.mode)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, sampling_ratio={self.sampling_ratio}, mode={self.mode!r}"


class SPP(nn.Module):
    """``nn.Module`` form of :func:`spp`.

    Parameters
    ----------
    levels : sequence of int, default (4, 2, 1)
    mode : {"max", "avg"}, default "max"
    """

    def __init__(self, levels: Sequence[int] = (4, 2, 1), mode: str = "max"):
        super().__init__()
        self.levels: List[int] = _levels(levels)
        self.mode = _validate.check_mode(mode)

    def forward(self, input: Tensor) -> Tensor:
        return spp(input, self.levels, self.mode)

    def extra_repr(self) -> str:
        return f"levels={tuple(self.levels)}, mode={self.mode!r}"


# -------------------------------------------------------------------------------- ONNX


def onnx_translations() -> dict:
    """The ONNX translations of roilib's ops for the dynamo-based exporter.

    Pass the result as ``torch.onnx.export(..., dynamo=True,
    custom_translation_table=roilib.torch.onnx_translations())``. RoIAlign
    (``mode="avg"``) becomes ONNX ``RoiAlign`` (opset 16 or later) and RoIPool
    ``MaxRoiPool``; max-mode RoIAlign, RoIWarp and SPP raise an error at export, since
    ONNX has no operator that computes them. The TorchScript-based exporter
    (``dynamo=False``) needs no extra step: importing :mod:`roilib.torch` registers
    the same mapping with it. Needs ``onnxscript``.

    Returns
    -------
    dict
        ``{torch op overload: translation function}``.
    """
    from . import _onnx

    return _onnx.translations()


def _register_onnx_symbolics() -> None:
    from . import _onnx

    _onnx.register_symbolics()


_register_onnx_symbolics()


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


def _run_atomic(name: str, tensors: Tuple, *args):
    """:func:`_run` for ops whose CUDA input gradient exists only with atomics: under
    ``torch.use_deterministic_algorithms(True)`` it raises (or warns) as torchvision's
    ops do."""
    first = tensors[0][0] if isinstance(tensors[0], (list, tuple)) else tensors[0]
    if first.is_cuda and name.endswith("_backward") and not name.endswith("rois_backward"):
        _alert_not_deterministic(f"roilib::{name}")
        return _run(name, tensors, *args, deterministic=False)
    return _run(name, tensors, *args)


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
    return _run_atomic("roi_align_rotated", (input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, sampling_ratio, aligned)


@_roi_align_rotated.register_fake
def _(input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("roilib::roi_align_rotated_backward", mutates_args=())
def _roi_align_rotated_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    return _run_atomic("roi_align_rotated_backward", (grad, input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, sampling_ratio, aligned)


@_roi_align_rotated_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return torch.empty_like(input)


@torch.library.custom_op("roilib::roi_align_rotated_rois_backward", mutates_args=())
def _roi_align_rotated_rois_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int, aligned: bool) -> Tensor:
    out = _run_atomic("roi_align_rotated_rois_backward", (grad, input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, sampling_ratio, aligned)
    return out.to(rois.dtype)


@_roi_align_rotated_rois_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
    return torch.empty_like(rois)


@torch.library.custom_op("roilib::prroi_pool", mutates_args=())
def _prroi_pool(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    return _run_atomic("prroi_pool", (input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale)


@_prroi_pool.register_fake
def _(input, rois, output_size, spatial_scale):
    return input.new_empty((rois.shape[0], input.shape[1], output_size[0], output_size[1]))


@torch.library.custom_op("roilib::prroi_pool_backward", mutates_args=())
def _prroi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    return _run_atomic("prroi_pool_backward", (grad, input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale)


@_prroi_pool_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale):
    return torch.empty_like(input)


@torch.library.custom_op("roilib::prroi_pool_rois_backward", mutates_args=())
def _prroi_pool_rois_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    out = _run_atomic("prroi_pool_rois_backward", (grad, input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale)
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


for _name in ("roi_align_rotated", "prroi_pool"):
    _register_autocast(_name)


# ------------------------------------- FPN multiscale RoIAlign, PS-RoIPool, PS-RoIAlign
#
# Their kernels have an atomic backward only (a deterministic one is planned): on CUDA
# the backward uses it unless torch.use_deterministic_algorithms(True) is on, in which
# case it raises (or warns, with warn_only=True) as torch's own nondeterministic ops do.

__all__ += ["multiscale_roi_align", "ps_roi_pool", "ps_roi_align", "MultiScaleRoIAlign", "PSRoIPool", "PSRoIAlign"]


@torch.library.custom_op("roilib::ps_roi_pool", mutates_args=())
def _ps_roi_pool(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    return _run_atomic("ps_roi_pool", (input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale)


@_ps_roi_pool.register_fake
def _(input, rois, output_size, spatial_scale):
    c_out = input.shape[1] // (output_size[0] * output_size[1])
    return input.new_empty((rois.shape[0], c_out, output_size[0], output_size[1]))


@torch.library.custom_op("roilib::ps_roi_pool_backward", mutates_args=())
def _ps_roi_pool_backward(grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float) -> Tensor:
    return _run_atomic("ps_roi_pool_backward", (grad, input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale)


@_ps_roi_pool_backward.register_fake
def _(grad, input, rois, output_size, spatial_scale):
    return torch.empty_like(input)


@torch.library.custom_op("roilib::ps_roi_align", mutates_args=())
def _ps_roi_align(input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int) -> Tensor:
    return _run_atomic("ps_roi_align", (input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, sampling_ratio)


@_ps_roi_align.register_fake
def _(input, rois, output_size, spatial_scale, sampling_ratio):
    c_out = input.shape[1] // (output_size[0] * output_size[1])
    return input.new_empty((rois.shape[0], c_out, output_size[0], output_size[1]))


@torch.library.custom_op("roilib::ps_roi_align_backward", mutates_args=())
def _ps_roi_align_backward(
    grad: Tensor, input: Tensor, rois: Tensor, output_size: List[int], spatial_scale: float, sampling_ratio: int
) -> Tensor:
    return _run_atomic(
        "ps_roi_align_backward", (grad, input, rois.to(_box_dtype(input))), tuple(output_size), spatial_scale, sampling_ratio
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
        "multiscale_roi_align", (list(features), rois.to(_box_dtype(features[0]))), tuple(output_size), list(scales),
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
        "multiscale_roi_align_backward", (grad, list(features), rois.to(_box_dtype(features[0]))), tuple(output_size),
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


for _name in ("ps_roi_pool", "ps_roi_align", "multiscale_roi_align"):
    _register_autocast(_name)
