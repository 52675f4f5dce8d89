"""Host code of the kernels, shared by the CPU (ctypes) and GPU (CuPy) backends.

``KernelOps`` holds everything between a public call and a kernel launch: argument
checks (``roilib._validate``), output and scratch buffers, the typed scalars in each
kernel's parameter order, and the choice between the atomic and the deterministic
backward. A backend supplies only ``xp`` (``numpy`` or ``cupy``), ``launch`` and, on a
GPU, ``device_scope``, so the CPU tests exercise exactly the host code the GPU runs.

Rules this host code keeps for device arrays (``xp`` is not NumPy), because the GPU
cannot be checked by the CPU build (``tests/test_device_host_code.py`` runs it against a
fake device array type that refuses host conversion and counts transfers):

* every op runs inside ``device_scope`` of its first array, so buffers are allocated
  and kernels launched on that array's GPU, whichever device is current;
* nothing is copied to the host and nothing synchronises: box *values* (finite
  coordinates, integral batch index in range) are checked by the kernels themselves,
  which output NaN for a bad row (see ``roi_is_valid`` in ``common.cuh``); shapes and
  dtypes are still checked here, from metadata;
* every buffer comes from ``_alloc``, which a caller can redirect (``use_allocator``;
  the torch bridge hands out tensors from torch's caching allocator), and outputs that
  every work item writes are not zero-filled.

Kernel names are ``<family>_<kernel>_<f16|f32|f64|i32>``; every kernel's first
parameter is the number of work items ``n`` (``long long``) of its grid-stride loop,
which ``launch`` passes.
"""
from __future__ import annotations

import contextlib
import functools
import threading
from typing import Callable, Iterator, Optional

import numpy as np

from .. import _validate as v

_SUFFIX = {
    np.dtype(np.float16): "f16",
    np.dtype(np.float32): "f32",
    np.dtype(np.float64): "f64",
    np.dtype(np.int32): "i32",
}
_MODE = {"avg": 0, "max": 1}  # ROILIB_AVG, ROILIB_MAX in common.cuh
#: entries of the per-tile box lists above which the tile side doubles (memory bound)
TILE_LIST_BUDGET = 1 << 24

_state = threading.local()


@contextlib.contextmanager
def use_allocator(alloc: Callable) -> Iterator[None]:
    """Within the block, every buffer the kernels' host code makes is ``alloc(shape, dtype)``.

    ``alloc`` must return an array of the backend's type (C-contiguous, uninitialised is
    fine). The torch bridge uses this so that outputs are tensors from torch's caching
    allocator; the setting is per thread.
    """
    previous = getattr(_state, "alloc", None)
    _state.alloc = alloc
    try:
        yield
    finally:
        _state.alloc = previous


def _ints(*values):
    return tuple(np.int32(x) for x in values)


def _real(dtype, value):
    """A float scalar of the kernels' arithmetic type (float32 for float16 inputs)."""
    return v.compute_dtype(dtype).type(value)


def _on_device(method):
    """Run a public op inside ``self.device_scope`` of its first array argument."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        first = args[0] if args else kwargs.get("grad_output", kwargs.get("input", kwargs.get("features")))
        if isinstance(first, (list, tuple)):  # a pyramid of maps
            first = first[0]
        with self.device_scope(first):
            return method(self, *args, **kwargs)

    return wrapper


class KernelOps:
    """The ops, written once against ``self.xp`` and ``self.launch``.

    Signatures match ``roilib.reference``; the backward functions add
    ``deterministic``: ``True`` gathers gradients tile by tile without floating-point
    atomics (bitwise identical run to run), ``False`` (the default, as in torchvision)
    scatters them with ``atomicAdd``. ``roilib.torch`` picks ``True`` when
    ``torch.are_deterministic_algorithms_enabled()``.
    """

    xp = np
    #: side of the deterministic backward's tiles; grows up to ``max_tile`` (the
    #: kernels' ROILIB_TILE) when the per-tile box lists would pass TILE_LIST_BUDGET
    tile = 16
    max_tile = 16
    #: channels a work item of RoIAlign's tiled backward handles together (sharing the
    #: box geometry); at most the kernels' ROILIB_TILE_CHANNELS (8 on the CPU build)
    tile_channels = 8

    def launch(self, family: str, kernel: str, dtype, n: int, *args) -> None:
        """Run kernel ``<family>_<kernel>_<suffix of dtype>`` over ``n`` work items."""
        raise NotImplementedError

    def device_scope(self, array):
        """Context in which ``array``'s device is current (nothing to do on the CPU)."""
        return contextlib.nullcontext()

    @property
    def on_host(self) -> bool:
        """True when arrays live in host memory (NumPy), so values may be read."""
        return self.xp is np

    def _run(self, family, kernel, dtype, n, *args):
        if n > 0:
            self.launch(family, kernel, dtype, n, *args)

    # -- buffers -------------------------------------------------------------------

    def _alloc(self, shape, dtype):
        """An uninitialised C-contiguous buffer (from ``use_allocator``'s allocator if set)."""
        alloc: Optional[Callable] = getattr(_state, "alloc", None)
        if alloc is not None:
            return alloc(tuple(int(d) for d in shape), np.dtype(dtype))
        return self.xp.empty(shape, dtype=dtype)

    def _zeros(self, shape, dtype):
        out = self._alloc(shape, dtype)
        out.fill(0)
        return out

    def _cast(self, acc, dtype):
        """``acc`` in ``dtype``: itself when it already is, else a new buffer from ``_alloc``."""
        if acc.dtype == np.dtype(dtype):
            return acc
        out = self._alloc(acc.shape, dtype)
        with np.errstate(over="ignore"):  # float16 overflow gives inf, as astype does
            out[...] = acc
        return out

    # -- argument preparation ------------------------------------------------------

    def _input(self, array, name="input"):
        v.check_input(array, name)
        if v.array_module(array) is not self.xp:
            raise TypeError(f"{name} must be a {self.xp.__name__} array for this backend, got {type(array).__name__}")
        return self.xp.ascontiguousarray(array)

    def _rois(self, rois, x):
        """``(K, 5)`` boxes, contiguous, in the arithmetic dtype, on ``x``'s device.

        Host arrays are checked in full (``_validate.check_rois``). Device arrays are
        checked from their metadata only, and built on the device, with no transfer:
        the kernels check their values (see the module docstring).
        """
        if self.on_host:
            return np.ascontiguousarray(v.check_rois(rois, x))
        return v.check_rois_on_device(rois, x, self.xp)

    def _grad(self, grad_output, shape, x):
        v.check_grad_output(grad_output, shape, x)
        return self.xp.ascontiguousarray(grad_output)

    def _empty(self, shape, dtype):
        """An uninitialised buffer, for outputs that every work item writes (``_alloc``)."""
        return self._alloc(shape, dtype)

    def _zeros_acc(self, shape, dtype):
        return self._zeros(shape, v.compute_dtype(dtype))

    def _box_gradient(self, family, x, g, boxes, args, channels_arg, columns):
        """The two passes of every box gradient (``<family>_box_partial`` per (box,
        channel), then ``<family>_box_reduce`` over the channels in order): a
        ``(K, columns)`` array, batch column 0, in ``x``'s dtype. ``boxes`` are the box
        arrays the kernels read, ``args`` the scalars that follow them."""
        k, c = g.shape[0], g.shape[1]
        acc = v.compute_dtype(x.dtype)
        partial = self._alloc((k, c, columns - 1), acc)  # both passes write every element
        out = self._alloc((k, columns), acc)
        self._run(family, "box_partial", x.dtype, k * c, g, x, *boxes, *args, partial)
        self._run(family, "box_reduce", x.dtype, k * columns, partial, channels_arg, out)
        return self._cast(out, x.dtype)

    def _box_tiles(self, ranges, n_images, h, w):
        """Per-tile box lists for the deterministic backward (see ``tiles.cu``).

        Returns ``lists, cumsum, (ts, TY, TX)``: tile ``t``'s boxes are
        ``lists[t, :cumsum[t, K - 1]]``, in box order. Three ``(N * TY * TX, K)`` int32
        buffers: the tile side starts at ``self.tile`` and doubles, up to
        ``self.max_tile``, while they would hold more than ``TILE_LIST_BUDGET`` entries.
        """
        k = ranges.shape[0]
        ts = self.tile
        ty, tx = -(-h // ts), -(-w // ts)
        while n_images * ty * tx * k > TILE_LIST_BUDGET and ts < self.max_tile:
            ts *= 2
            ty, tx = -(-h // ts), -(-w // ts)
        tiles = n_images * ty * tx
        flags = self._zeros((tiles, k), np.int32)
        self._run("tiles", "flags", np.int32, k, ranges, *_ints(ts, ty, tx), flags)
        cumsum = self._alloc((tiles, k), np.int32)
        self.xp.cumsum(flags, axis=1, dtype=np.int32, out=cumsum)
        lists = self._alloc((tiles, k), np.int32)
        self._run("tiles", "lists", np.int32, tiles * k, flags, cumsum, np.int32(k), lists)
        return lists, cumsum, (ts, ty, tx)

    def _box_args(self, input, rois, output_size, spatial_scale):
        """Checked arguments shared by the box ops: ``x, rois, PH, PW, typed scale``."""
        x = self._input(input)
        ph, pw = v.check_output_size(output_size)
        return x, self._rois(rois, x), ph, pw, _real(x.dtype, v.check_spatial_scale(spatial_scale))

    def _align_args(self, input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode):
        x, r, ph, pw, scale = self._box_args(input, rois, output_size, spatial_scale)
        box = (scale, *_ints(v.check_sampling_ratio(sampling_ratio), v.check_aligned(aligned)))
        return x, r, ph, pw, box, _MODE[v.check_mode(mode)]

    def _warp_args(self, input, rois, output_size, spatial_scale, sampling_ratio, mode):
        """Checked RoIWarp arguments: ``x, rois, PH, PW, (typed scale, sampling_ratio)``."""
        x, r, ph, pw, scale = self._box_args(input, rois, output_size, spatial_scale)
        if mode != "max":
            raise ValueError(f"mode must be 'max' for roi_warp (MNC's layer takes the largest sample), got {mode!r}")
        return x, r, ph, pw, (scale, np.int32(v.check_sampling_ratio(sampling_ratio)))

    # -- bilinear-sampled ops (RoIAlign, RoIWarp): same kernels, different box ------

    def _sampled_forward(self, family, x, r, ph, pw, box, mode):
        n, c, h, w = x.shape
        out = self._alloc((r.shape[0], c, ph, pw), x.dtype)
        self._run(family, "forward", x.dtype, out.size, x, r, *_ints(n, c, h, w, ph, pw), *box, np.int32(mode), out)
        return out

    def _sampled_backward(self, family, grad_output, x, r, ph, pw, box, mode, deterministic):
        n, c, h, w = x.shape
        k = r.shape[0]
        g = self._grad(grad_output, (k, c, ph, pw), x)
        dims = _ints(n, c, h, w, ph, pw)
        if not deterministic or k == 0:
            grad = self._zeros_acc(x.shape, x.dtype)
            self._run(family, "backward_atomic", x.dtype, g.size, g, x, r, *dims, *box, np.int32(mode), grad)
            return self._cast(grad, x.dtype)
        ranges = self._alloc((k, 5), np.int32)
        self._run(family, "ranges", x.dtype, k, r, np.int32(n), *dims[2:], *box, ranges)
        if mode == _MODE["max"]:
            winner = self._alloc(g.shape, np.int32)
            self._run(family, "argmax", x.dtype, g.size, x, r, *dims, *box, winner)
        else:
            winner = self._alloc((1,), np.int32)  # not read in avg mode
        lists, cumsum, (ts, ty, tx) = self._box_tiles(ranges, n, h, w)
        cg = min(self.tile_channels, c)
        grad = self._alloc(x.shape, v.compute_dtype(x.dtype))  # every element is written
        self._run(
            family, "backward_tiles", x.dtype, n * (-(-c // cg)) * ty * tx,
            g, r, lists, cumsum, winner, np.int32(k), *dims, *box, np.int32(mode), *_ints(ts, cg, ty, tx), grad,
        )  # fmt: skip
        return self._cast(grad, x.dtype)

    # -- RoIAlign --------------------------------------------------------------------

    @_on_device
    def roi_align(self, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg"):
        """RoIAlign forward.

        Parameters
        ----------
        input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
            As in ``roilib.reference.roi_align``.

        Returns
        -------
        array, shape (K, C, PH, PW), the input's dtype
        """
        x, r, ph, pw, box, m = self._align_args(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode)
        return self._sampled_forward("roi_align", x, r, ph, pw, box, m)

    @_on_device
    def roi_align_backward(
        self, grad_output, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
        mode="avg", deterministic=False,
    ):
        """Gradient of ``roi_align`` with respect to ``input``.

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
            As in ``roilib.reference.roi_align``.
        deterministic : bool
            ``True``: gather per tile without floating-point atomics, bitwise identical
            run to run. ``False`` (default, as torchvision): scatter with ``atomicAdd``;
            on a GPU the order of additions, so the last bits, may vary.

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        x, r, ph, pw, box, m = self._align_args(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode)
        return self._sampled_backward("roi_align", grad_output, x, r, ph, pw, box, m, deterministic)

    @_on_device
    def roi_align_rois_backward(
        self, grad_output, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False, mode="avg"
    ):
        """Gradient of ``roi_align`` with respect to the box coordinates.

        Always deterministic: one partial sum per (box, channel), then one sum over the
        channels per box, in channel order.

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
            As in ``roilib.reference.roi_align_rois_backward``.

        Returns
        -------
        array, shape (K, 5), the input's dtype
            ``d loss / d [batch_index, x1, y1, x2, y2]``; the batch column is 0.
        """
        x, r, ph, pw, box, m = self._align_args(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode)
        n, c, h, w = x.shape
        k = r.shape[0]
        g = self._grad(grad_output, (k, c, ph, pw), x)
        args = (*_ints(n, c, h, w, ph, pw), *box, np.int32(m))
        return self._box_gradient("roi_align", x, g, (r,), args, np.int32(c), 5)

    # -- RoIWarp (MNC's layer; kernels in roi_warp.cu) ------------------------------

    @_on_device
    def roi_warp(self, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, mode="max"):
        """RoIWarp forward.

        Parameters
        ----------
        input, rois, output_size, spatial_scale, sampling_ratio, mode
            As in ``roilib.reference.roi_warp``.

        Returns
        -------
        array, shape (K, C, PH, PW), the input's dtype
        """
        x, r, ph, pw, box = self._warp_args(input, rois, output_size, spatial_scale, sampling_ratio, mode)
        n, c, h, w = x.shape
        out = self._alloc((r.shape[0], c, ph, pw), x.dtype)  # every element is written
        self._run("roi_warp", "forward", x.dtype, out.size, x, r, *_ints(n, c, h, w, ph, pw), *box, out)
        return out

    @_on_device
    def roi_warp_backward(
        self, grad_output, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, mode="max",
        deterministic=False,
    ):
        """Gradient of ``roi_warp`` with respect to ``input``.

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale, sampling_ratio, mode
            As in ``roilib.reference.roi_warp``.
        deterministic : bool
            ``True``: gather per tile without floating-point atomics, bitwise identical
            run to run. ``False`` (default, as torchvision): scatter with ``atomicAdd``;
            on a GPU the order of additions, so the last bits, may vary.

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        x, r, ph, pw, box = self._warp_args(input, rois, output_size, spatial_scale, sampling_ratio, mode)
        n, c, h, w = x.shape
        k = r.shape[0]
        g = self._grad(grad_output, (k, c, ph, pw), x)
        dims = _ints(n, c, h, w, ph, pw)
        if not deterministic or k == 0:
            grad = self._zeros_acc(x.shape, x.dtype)
            self._run("roi_warp", "backward_atomic", x.dtype, g.size, g, x, r, *dims, *box, grad)
            return self._cast(grad, x.dtype)
        ranges = self._alloc((k, 5), np.int32)
        self._run("roi_warp", "ranges", x.dtype, k, r, np.int32(n), *dims[2:], *box, ranges)
        winner = self._alloc(g.shape, np.int32)
        self._run("roi_warp", "argmax", x.dtype, g.size, x, r, *dims, *box, winner)
        lists, cumsum, (ts, ty, tx) = self._box_tiles(ranges, n, h, w)
        grad = self._alloc(x.shape, v.compute_dtype(x.dtype))  # every element is written
        self._run(
            "roi_warp", "backward_tiles", x.dtype, n * c * ty * tx,
            g, r, lists, cumsum, winner, np.int32(k), *dims, *box, *_ints(ts, ty, tx), grad,
        )  # fmt: skip
        return self._cast(grad, x.dtype)

    @_on_device
    def roi_warp_rois_backward(
        self, grad_output, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, mode="max"
    ):
        """Gradient of ``roi_warp`` with respect to the box coordinates.

        Always deterministic: one partial sum per (box, channel), then one sum over the
        channels per box, in channel order.

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale, sampling_ratio, mode
            As in ``roilib.reference.roi_warp_rois_backward``.

        Returns
        -------
        array, shape (K, 5), the input's dtype
            ``d loss / d [batch_index, x1, y1, x2, y2]``; the batch column is 0.
        """
        x, r, ph, pw, box = self._warp_args(input, rois, output_size, spatial_scale, sampling_ratio, mode)
        n, c, h, w = x.shape
        k = r.shape[0]
        g = self._grad(grad_output, (k, c, ph, pw), x)
        args = (*_ints(n, c, h, w, ph, pw), *box)
        return self._box_gradient("roi_warp", x, g, (r,), args, np.int32(c), 5)

    # -- RoIPool ---------------------------------------------------------------------

    @_on_device
    def roi_pool(self, input, rois, output_size, spatial_scale=1.0):
        """RoIPool forward.

        Parameters
        ----------
        input, rois, output_size, spatial_scale
            As in ``roilib.reference.roi_pool``.

        Returns
        -------
        array, shape (K, C, PH, PW), the input's dtype
        """
        x, r, ph, pw, scale = self._box_args(input, rois, output_size, spatial_scale)
        n, c, h, w = x.shape
        out = self._alloc((r.shape[0], c, ph, pw), x.dtype)
        self._run("roi_pool", "forward", x.dtype, out.size, x, r, *_ints(n, c, h, w, ph, pw), scale, out)
        return out

    @_on_device
    def roi_pool_backward(self, grad_output, input, rois, output_size, spatial_scale=1.0, deterministic=False):
        """Gradient of ``roi_pool`` with respect to ``input``.

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale
            As in ``roilib.reference.roi_pool``.
        deterministic : bool
            ``True``: gather per tile without floating-point atomics, bitwise identical
            run to run. ``False`` (default, as torchvision): scatter with ``atomicAdd``;
            on a GPU the order of additions, so the last bits, may vary.

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        x, r, ph, pw, scale = self._box_args(input, rois, output_size, spatial_scale)
        n, c, h, w = x.shape
        k = r.shape[0]
        g = self._grad(grad_output, (k, c, ph, pw), x)
        dims = _ints(n, c, h, w, ph, pw)
        if not deterministic or k == 0:
            grad = self._zeros_acc(x.shape, x.dtype)
            self._run("roi_pool", "backward_atomic", x.dtype, g.size, g, x, r, *dims, scale, grad)
            return self._cast(grad, x.dtype)
        ranges = self._alloc((k, 5), np.int32)
        argmax = self._alloc(g.shape, np.int32)
        self._run("roi_pool", "ranges", x.dtype, k, r, np.int32(n), *dims[2:], scale, ranges)
        self._run("roi_pool", "argmax", x.dtype, g.size, x, r, *dims, scale, argmax)
        lists, cumsum, (ts, ty, tx) = self._box_tiles(ranges, n, h, w)
        grad = self._alloc(x.shape, v.compute_dtype(x.dtype))  # every element is written
        self._run(
            "roi_pool", "backward_tiles", x.dtype, n * c * ty * tx,
            g, r, lists, cumsum, argmax, np.int32(k), *dims, scale, *_ints(ts, ty, tx), grad,
        )  # fmt: skip
        return self._cast(grad, x.dtype)

    # -- SPP -------------------------------------------------------------------------

    def _spp_levels(self, levels, c):
        """``(level, column offset)`` per pyramid level, and the output width."""
        out, offset = [], 0
        for n in levels:
            out.append((n, offset))
            offset += c * n * n
        return out, offset

    @_on_device
    def spp(self, input, levels=(4, 2, 1), mode="max"):
        """Spatial pyramid pooling.

        Parameters
        ----------
        input, levels, mode
            As in ``roilib.reference.spp``.

        Returns
        -------
        array, shape (N, C * sum(n * n for n in levels)), the input's dtype
        """
        x = self._input(input)
        levels, m = v.check_levels(levels), _MODE[v.check_mode(mode)]
        n, c, h, w = x.shape
        plan, width = self._spp_levels(levels, c)
        out = self._alloc((n, width), x.dtype)  # the levels together write every column
        for level, offset in plan:
            self._run("spp", "forward", x.dtype, n * c * level * level, x, *_ints(c, h, w, level, offset, width, m), out)
        return out

    @_on_device
    def spp_backward(self, grad_output, input, levels=(4, 2, 1), mode="max", deterministic=False):
        """Gradient of ``spp`` with respect to ``input``.

        Parameters
        ----------
        grad_output : array, shape (N, C * sum(n * n))
        input, levels, mode
            As in ``roilib.reference.spp``.
        deterministic : bool
            ``True``: gather per tile without floating-point atomics, bitwise identical
            run to run. ``False`` (default, as torchvision): scatter with ``atomicAdd``;
            on a GPU the order of additions, so the last bits, may vary.

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        x = self._input(input)
        levels, m = v.check_levels(levels), _MODE[v.check_mode(mode)]
        n, c, h, w = x.shape
        plan, width = self._spp_levels(levels, c)
        g = self._grad(grad_output, (n, width), x)
        if not deterministic:
            grad = self._zeros_acc(x.shape, x.dtype)
            for level, offset in plan:
                cells = n * c * level * level
                self._run("spp", "backward_atomic", x.dtype, cells, g, x, *_ints(c, h, w, level, offset, width, m), grad)
            return self._cast(grad, x.dtype)
        grad = self._alloc(x.shape, v.compute_dtype(x.dtype))  # the first level zeroes each plane
        for index, (level, offset) in enumerate(plan):
            self._run(
                "spp", "backward_planes", x.dtype, n * c,
                g, x, *_ints(c, h, w, level, offset, width, m, index == 0), grad,
            )  # fmt: skip
        return self._cast(grad, x.dtype)

    # -- rotated RoIAlign and Precise RoI Pooling (issue 12) ---------------------------

    def _rotated_args(self, input, rois, output_size, spatial_scale, sampling_ratio, aligned):
        x = self._input(input)
        ph, pw = v.check_output_size(output_size)
        if self.on_host:
            r = np.ascontiguousarray(v.check_rotated_rois(rois, x))
            # cos and sin once per box, exactly as the NumPy reference computes them
            trig = np.ascontiguousarray(np.stack(angle_cos_sin(r[:, 5], r.dtype), axis=1))
        else:
            # device boxes: metadata checks here, values in the kernel (no transfer);
            # cos and sin computed on the device, in float64 like the reference
            r = v.check_rois_on_device(rois, x, self.xp, columns=6)
            theta = r[:, 5].astype(np.float64) * (np.pi / 180.0)
            trig = self.xp.ascontiguousarray(self.xp.stack([self.xp.cos(theta), self.xp.sin(theta)], axis=1).astype(r.dtype))
        scale = _real(x.dtype, v.check_spatial_scale(spatial_scale))
        box = (scale, *_ints(v.check_sampling_ratio(sampling_ratio), v.check_aligned(aligned)))
        return x, (r, trig), ph, pw, box

    @staticmethod
    def _no_deterministic_kernel(op: str, deterministic: bool) -> None:
        if deterministic:
            raise NotImplementedError(
                f"{op} has no deterministic kernel yet: call it with deterministic=False "
                "(floating-point atomics; the order of additions varies run to run)"
            )

    @_on_device
    def roi_align_rotated(self, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True):
        """Rotated RoIAlign forward.

        Parameters
        ----------
        input, rois, output_size, spatial_scale, sampling_ratio, aligned
            As in ``roilib.reference.roi_align_rotated``.

        Returns
        -------
        array, shape (K, C, PH, PW), the input's dtype
        """
        x, (r, trig), ph, pw, box = self._rotated_args(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
        n, c, h, w = x.shape
        out = self._empty((r.shape[0], c, ph, pw), x.dtype)
        self._run("roi_align_rotated", "forward", x.dtype, out.size, x, r, trig, *_longs(n, c, h, w, ph, pw), *box, out)
        return out

    @_on_device
    def roi_align_rotated_backward(
        self, grad_output, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True,
        deterministic=False,
    ):
        """Gradient of ``roi_align_rotated`` with respect to ``input`` (atomic scatter).

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale, sampling_ratio, aligned
            As in ``roilib.reference.roi_align_rotated``.
        deterministic : bool
            Must be ``False``: there is no deterministic kernel for this op yet, and
            ``True`` raises ``NotImplementedError``.

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        self._no_deterministic_kernel("roi_align_rotated_backward", deterministic)
        x, (r, trig), ph, pw, box = self._rotated_args(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
        n, c, h, w = x.shape
        g = self._grad(grad_output, (r.shape[0], c, ph, pw), x)
        grad = self._zeros_acc(x.shape, x.dtype)
        dims = _longs(n, c, h, w, ph, pw)
        self._run("roi_align_rotated", "backward_atomic", x.dtype, g.size, g, r, trig, *dims, *box, grad)
        return self._cast(grad, x.dtype)

    @_on_device
    def roi_align_rotated_rois_backward(
        self, grad_output, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=True
    ):
        """Gradient of ``roi_align_rotated`` with respect to the boxes.

        Always deterministic: one partial sum per (box, channel), then one sum over the
        channels per box, in channel order.

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale, sampling_ratio, aligned
            As in ``roilib.reference.roi_align_rotated_rois_backward``.

        Returns
        -------
        array, shape (K, 6), the input's dtype
            ``d loss / d [batch_index, cx, cy, w, h, angle_degrees]``; the batch column is 0.
        """
        x, (r, trig), ph, pw, box = self._rotated_args(input, rois, output_size, spatial_scale, sampling_ratio, aligned)
        n, c, h, w = x.shape
        k = r.shape[0]
        g = self._grad(grad_output, (k, c, ph, pw), x)
        args = (*_longs(n, c, h, w, ph, pw), *box)
        return self._box_gradient("roi_align_rotated", x, g, (r, trig), args, np.int64(c), 6)

    @_on_device
    def prroi_pool(self, input, rois, output_size, spatial_scale=1.0):
        """Precise RoI Pooling forward.

        Parameters
        ----------
        input, rois, output_size, spatial_scale
            As in ``roilib.reference.prroi_pool``.

        Returns
        -------
        array, shape (K, C, PH, PW), the input's dtype
        """
        x, r, ph, pw, scale = self._box_args(input, rois, output_size, spatial_scale)
        n, c, h, w = x.shape
        out = self._empty((r.shape[0], c, ph, pw), x.dtype)
        self._run("prroi_pool", "forward", x.dtype, out.size, x, r, *_longs(n, c, h, w, ph, pw), scale, out)
        return out

    @_on_device
    def prroi_pool_backward(self, grad_output, input, rois, output_size, spatial_scale=1.0, deterministic=False):
        """Gradient of ``prroi_pool`` with respect to ``input`` (atomic scatter).

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale
            As in ``roilib.reference.prroi_pool``.
        deterministic : bool
            Must be ``False``: there is no deterministic kernel for this op yet, and
            ``True`` raises ``NotImplementedError``.

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        self._no_deterministic_kernel("prroi_pool_backward", deterministic)
        x, r, ph, pw, scale = self._box_args(input, rois, output_size, spatial_scale)
        n, c, h, w = x.shape
        g = self._grad(grad_output, (r.shape[0], c, ph, pw), x)
        grad = self._zeros_acc(x.shape, x.dtype)
        self._run("prroi_pool", "backward_atomic", x.dtype, g.size, g, r, *_longs(n, c, h, w, ph, pw), scale, grad)
        return self._cast(grad, x.dtype)

    @_on_device
    def prroi_pool_rois_backward(self, grad_output, input, rois, output_size, spatial_scale=1.0):
        """Gradient of ``prroi_pool`` with respect to the box coordinates.

        Always deterministic: one partial sum per (box, channel), then one sum over the
        channels per box, in channel order.

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale
            As in ``roilib.reference.prroi_pool_rois_backward``.

        Returns
        -------
        array, shape (K, 5), the input's dtype
            ``d loss / d [batch_index, x1, y1, x2, y2]``; the batch column is 0.
        """
        x, r, ph, pw, scale = self._box_args(input, rois, output_size, spatial_scale)
        n, c, h, w = x.shape
        k = r.shape[0]
        g = self._grad(grad_output, (k, c, ph, pw), x)
        args = (*_longs(n, c, h, w, ph, pw), scale)
        return self._box_gradient("prroi_pool", x, g, (r,), args, np.int64(c), 5)

    # -- issue 11: position-sensitive pooling and FPN multiscale RoIAlign -------------
    #
    # Their backward kernels use atomics only so far; ``deterministic=True`` raises
    # NotImplementedError naming the op until a deterministic kernel exists.

    def _address(self, array) -> int:
        """Device (or host) address of an array's first element, for pointer tables."""
        return int(array.ctypes.data) if self.xp is np else int(array.data.ptr)

    @staticmethod
    def _atomic_only(op: str, deterministic: bool) -> None:
        if deterministic:
            raise NotImplementedError(
                f"{op}: no deterministic backward kernel yet; call it with deterministic=False for the atomic one"
            )

    def _ps_args(self, input, rois, output_size, spatial_scale):
        x, r, ph, pw, scale = self._box_args(input, rois, output_size, spatial_scale)
        return x, r, ph, pw, scale, v.check_ps_channels(x, (ph, pw))

    @_on_device
    def ps_roi_pool(self, input, rois, output_size, spatial_scale=1.0):
        """Position-sensitive RoIPool forward (as ``roilib.reference.ps_roi_pool``).

        Returns
        -------
        array, shape (K, C_out, PH, PW), the input's dtype
        """
        x, r, ph, pw, scale, c_out = self._ps_args(input, rois, output_size, spatial_scale)
        n, c, h, w = x.shape
        out = self._empty((r.shape[0], c_out, ph, pw), x.dtype)
        self._run("ps_roi", "pool_forward", x.dtype, out.size, x, r, *_ints(n, c, h, w, ph, pw, c_out), scale, out)
        return out

    @_on_device
    def ps_roi_pool_backward(self, grad_output, input, rois, output_size, spatial_scale=1.0, deterministic=False):
        """Gradient of ``ps_roi_pool`` with respect to ``input`` (atomic scatter).

        Parameters
        ----------
        grad_output : array, shape (K, C_out, PH, PW)
        input, rois, output_size, spatial_scale
            As in ``roilib.reference.ps_roi_pool``.
        deterministic : bool
            Must be ``False`` for now (no deterministic kernel yet).

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        self._atomic_only("ps_roi_pool_backward", deterministic)
        x, r, ph, pw, scale, c_out = self._ps_args(input, rois, output_size, spatial_scale)
        n, c, h, w = x.shape
        g = self._grad(grad_output, (r.shape[0], c_out, ph, pw), x)
        grad = self._zeros_acc(x.shape, x.dtype)
        self._run("ps_roi", "pool_backward_atomic", x.dtype, g.size, g, r, *_ints(n, c, h, w, ph, pw, c_out), scale, grad)
        return self._cast(grad, x.dtype)

    @_on_device
    def ps_roi_align(self, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1):
        """Position-sensitive RoIAlign forward (as ``roilib.reference.ps_roi_align``).

        Returns
        -------
        array, shape (K, C_out, PH, PW), the input's dtype
        """
        x, r, ph, pw, scale, c_out = self._ps_args(input, rois, output_size, spatial_scale)
        sr = np.int32(v.check_sampling_ratio(sampling_ratio))
        n, c, h, w = x.shape
        out = self._empty((r.shape[0], c_out, ph, pw), x.dtype)
        self._run("ps_roi", "align_forward", x.dtype, out.size, x, r, *_ints(n, c, h, w, ph, pw, c_out), scale, sr, out)
        return out

    @_on_device
    def ps_roi_align_backward(
        self, grad_output, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, deterministic=False
    ):
        """Gradient of ``ps_roi_align`` with respect to ``input`` (atomic scatter).

        Parameters
        ----------
        grad_output : array, shape (K, C_out, PH, PW)
        input, rois, output_size, spatial_scale, sampling_ratio
            As in ``roilib.reference.ps_roi_align``.
        deterministic : bool
            Must be ``False`` for now (no deterministic kernel yet).

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        self._atomic_only("ps_roi_align_backward", deterministic)
        x, r, ph, pw, scale, c_out = self._ps_args(input, rois, output_size, spatial_scale)
        sr = np.int32(v.check_sampling_ratio(sampling_ratio))
        n, c, h, w = x.shape
        g = self._grad(grad_output, (r.shape[0], c_out, ph, pw), x)
        grad = self._zeros_acc(x.shape, x.dtype)
        self._run(
            "ps_roi", "align_backward_atomic", x.dtype, g.size, g, r, *_ints(n, c, h, w, ph, pw, c_out), scale, sr, grad
        )
        return self._cast(grad, x.dtype)

    def _pyramid_args(self, features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level,
                      eps, aligned):
        """Checked maps and boxes, the per-box level array (computed on the device),
        the scales table and the ints every multiscale kernel takes."""
        from ..family import level_range

        maps = [self._input(f, f"features[{i}]") for i, f in enumerate(v.check_features(features))]
        x = maps[0]
        ph, pw = v.check_output_size(output_size)
        scales = v.check_scales(scales, len(maps))
        sr = v.check_sampling_ratio(sampling_ratio)
        s0, k0, eps = v.check_fpn_mapping(canonical_scale, canonical_level, eps)
        al = v.check_aligned(aligned)
        r = self._rois(rois, x)
        k_min, k_max = level_range(scales)
        levels = self._empty((r.shape[0],), np.int32)
        self._run(
            "multiscale", "levels", x.dtype, r.shape[0], r, *_ints(x.shape[0], len(maps), k_min, k_max, k0),
            _real(x.dtype, s0), _real(x.dtype, eps), levels,
        )
        # host-to-device copies of two small tables (levels' scales; in _level_table the
        # maps' addresses and sizes): no read-back, but not capturable in a CUDA graph
        scale_table = self.xp.asarray(np.array(scales, dtype=v.compute_dtype(x.dtype)))
        return maps, r, levels, scale_table, _ints(x.shape[1], ph, pw, sr, al)

    def _level_table(self, arrays):
        """``(L, 3)`` int64 ``{address, H, W}`` per level, on this backend's device."""
        rows = [(self._address(a), a.shape[2], a.shape[3]) for a in arrays]
        return self.xp.asarray(np.array(rows, dtype=np.int64))

    @_on_device
    def multiscale_roi_align(self, features, rois, output_size, scales, sampling_ratio=2, canonical_scale=224,
                             canonical_level=4, eps=1e-6, aligned=False):
        """RoIAlign over a pyramid, each box on its FPN level: one launch for the levels,
        one for the pooling (as ``roilib.reference.multiscale_roi_align``).

        Returns
        -------
        array, shape (K, C, PH, PW), the maps' dtype
        """
        maps, r, levels, scale_table, ints = self._pyramid_args(
            features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level, eps, aligned
        )
        c, ph, pw = (int(i) for i in ints[:3])
        out = self._empty((r.shape[0], c, ph, pw), maps[0].dtype)
        table = self._level_table(maps)
        self._run("multiscale", "forward", maps[0].dtype, out.size, table, scale_table, levels, r, *ints, out)
        return out

    @_on_device
    def multiscale_roi_align_backward(self, grad_output, features, rois, output_size, scales, sampling_ratio=2,
                                      canonical_scale=224, canonical_level=4, eps=1e-6, aligned=False,
                                      deterministic=False):
        """Gradient of ``multiscale_roi_align`` for every map (atomic scatter, one launch).

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level, eps, aligned
            As in ``roilib.reference.multiscale_roi_align``.
        deterministic : bool
            Must be ``False`` for now (no deterministic kernel yet).

        Returns
        -------
        list of arrays, one per map, with its shape and dtype
        """
        self._atomic_only("multiscale_roi_align_backward", deterministic)
        maps, r, levels, scale_table, ints = self._pyramid_args(
            features, rois, output_size, scales, sampling_ratio, canonical_scale, canonical_level, eps, aligned
        )
        c, ph, pw = (int(i) for i in ints[:3])
        g = self._grad(grad_output, (r.shape[0], c, ph, pw), maps[0])
        grads = [self._zeros_acc(m.shape, m.dtype) for m in maps]
        table = self._level_table(grads)
        self._run("multiscale", "backward_atomic", maps[0].dtype, g.size, g, table, scale_table, levels, r, *ints)
        return [self._cast(gr, m.dtype) for gr, m in zip(grads, maps)]


def angle_cos_sin(angle_degrees, dtype):
    """``roilib.geometry_rotated.angle_cos_sin`` (imported late: the geometry needs no host code)."""
    from ..geometry_rotated import angle_cos_sin as f

    return f(angle_degrees, dtype)


def _longs(*values):
    """Sizes as the kernels of issue 12 take them: ``long long`` (``np.int64``)."""
    return tuple(np.int64(x) for x in values)
