"""Host code of the kernels, shared by the CPU (ctypes) and GPU (CuPy) backends.

``KernelOps`` holds everything between a public call and a kernel launch: argument
checks (``roilib._validate``), output and scratch buffers, the typed scalars in each
kernel's parameter order, and the choice between the atomic and the deterministic
backward. A backend supplies only ``xp`` (``numpy`` or ``cupy``) and ``launch``, so
the CPU tests exercise exactly the host code the GPU runs.

Kernel names are ``<family>_<kernel>_<f16|f32|f64>``; every kernel's first parameter is
the number of work items ``n`` of its grid-stride loop, which ``launch`` passes.
"""
from __future__ import annotations

import numpy as np

from .. import _validate as v

_SUFFIX = {np.dtype(np.float16): "f16", np.dtype(np.float32): "f32", np.dtype(np.float64): "f64"}
_MODE = {"avg": 0, "max": 1}  # ROILIB_AVG, ROILIB_MAX in common.cuh


def _ints(*values):
    return tuple(np.int32(x) for x in values)


def _real(dtype, value):
    """A float scalar of the kernels' arithmetic type (float32 for float16 inputs)."""
    return v.compute_dtype(dtype).type(value)


class KernelOps:
    """The ops, written once against ``self.xp`` and ``self.launch``.

    Signatures match ``roilib.reference``; the backward functions add
    ``deterministic``: ``True`` gathers gradients without floating-point atomics
    (bitwise identical run to run), ``False`` scatters them with ``atomicAdd``.
    """

    xp = np

    def launch(self, family: str, kernel: str, dtype, n: int, *args) -> None:
        """Run kernel ``<family>_<kernel>_<suffix of dtype>`` over ``n`` work items."""
        raise NotImplementedError

    def _run(self, family, kernel, dtype, n, *args):
        if n > 0:
            self.launch(family, kernel, dtype, n, *args)

    # -- argument preparation ------------------------------------------------------

    def _input(self, array, name="input"):
        v.check_input(array, name)
        if v.array_module(array) is not self.xp:
            raise TypeError(f"{name} must be a {self.xp.__name__} array for this backend, got {type(array).__name__}")
        return self.xp.ascontiguousarray(array)

    def _rois(self, rois, x):
        """``(K, 5)`` boxes, contiguous, in the arithmetic dtype, on this backend's device."""
        return self.xp.asarray(np.ascontiguousarray(v.check_rois(rois, x)))

    def _grad(self, grad_output, shape, x):
        v.check_grad_output(grad_output, shape, x)
        return self.xp.ascontiguousarray(grad_output)

    def _zeros_acc(self, shape, dtype):
        return self.xp.zeros(shape, dtype=v.compute_dtype(dtype))

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
        x, r, ph, pw, scale = self._box_args(input, rois, output_size, spatial_scale)
        return x, r, ph, pw, (scale, *_ints(v.check_sampling_ratio(sampling_ratio))), _MODE[v.check_mode(mode)]

    # -- bilinear-sampled ops (RoIAlign, RoIWarp): same kernels, different box ------

    def _sampled_forward(self, family, x, r, ph, pw, box, mode):
        n, c, h, w = x.shape
        out = self.xp.zeros((r.shape[0], c, ph, pw), dtype=x.dtype)
        self._run(family, "forward", x.dtype, out.size, x, r, *_ints(c, h, w, ph, pw), *box, np.int32(mode), out)
        return out

    def _sampled_backward(self, family, grad_output, x, r, ph, pw, box, mode, deterministic):
        n, c, h, w = x.shape
        k = r.shape[0]
        g = self._grad(grad_output, (k, c, ph, pw), x)
        grad = self._zeros_acc(x.shape, x.dtype)
        dims = _ints(c, h, w, ph, pw)
        if not deterministic:
            self._run(family, "backward_atomic", x.dtype, g.size, g, x, r, *dims, *box, np.int32(mode), grad)
        else:
            ranges = self.xp.empty((k, 5), dtype=np.int32)
            self._run(family, "ranges", x.dtype, k, r, *dims[1:], *box, ranges)
            if mode == _MODE["max"]:
                winner = self.xp.empty(g.shape, dtype=np.int32)
                self._run(family, "argmax", x.dtype, g.size, x, r, *dims, *box, winner)
            else:
                winner = self.xp.zeros(1, dtype=np.int32)  # not read in avg mode
            self._run(
                family, "backward_gather", x.dtype, grad.size,
                g, r, ranges, winner, np.int32(k), *dims, *box, np.int32(mode), grad,
            )
        return grad.astype(x.dtype, copy=False)

    # -- RoIAlign --------------------------------------------------------------------

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

    def roi_align_backward(
        self, grad_output, input, rois, output_size, spatial_scale=1.0, sampling_ratio=-1, aligned=False,
        mode="avg", deterministic=True,
    ):
        """Gradient of ``roi_align`` with respect to ``input``.

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode
            As in ``roilib.reference.roi_align``.
        deterministic : bool
            ``True``: gather without floating-point atomics, bitwise identical run to run.
            ``False``: scatter with ``atomicAdd`` (faster on a GPU; the order of additions varies).

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        x, r, ph, pw, box, m = self._align_args(input, rois, output_size, spatial_scale, sampling_ratio, aligned, mode)
        return self._sampled_backward("roi_align", grad_output, x, r, ph, pw, box, m, deterministic)

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
        partial = self._zeros_acc((k, c, 4), x.dtype)
        out = self._zeros_acc((k, 5), x.dtype)
        self._run("roi_align", "box_partial", x.dtype, k * c, g, x, r, *_ints(c, h, w, ph, pw), *box, np.int32(m), partial)
        self._run("roi_align", "box_reduce", x.dtype, k * 5, partial, np.int32(c), out)
        return out.astype(x.dtype, copy=False)

    # -- RoIWarp ---------------------------------------------------------------------

    def roi_warp(self, input, rois, output_size, spatial_scale=1.0, sampling_ratio=2, mode="max"):
        """RoIWarp forward.

        Parameters
        ----------
        input, rois, output_size, spatial_scale, sampling_ratio, mode
            As in ``roilib.reference.roi_warp``.

        Returns
        -------
        array, shape (K, C, PH, PW), the input's dtype
        """
        x, r, ph, pw, box, m = self._warp_args(input, rois, output_size, spatial_scale, sampling_ratio, mode)
        return self._sampled_forward("roi_warp", x, r, ph, pw, box, m)

    def roi_warp_backward(
        self, grad_output, input, rois, output_size, spatial_scale=1.0, sampling_ratio=2, mode="max",
        deterministic=True,
    ):
        """Gradient of ``roi_warp`` with respect to ``input``.

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale, sampling_ratio, mode
            As in ``roilib.reference.roi_warp``.
        deterministic : bool
            ``True``: gather without floating-point atomics, bitwise identical run to run.
            ``False``: scatter with ``atomicAdd`` (faster on a GPU; the order of additions varies).

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        x, r, ph, pw, box, m = self._warp_args(input, rois, output_size, spatial_scale, sampling_ratio, mode)
        return self._sampled_backward("roi_warp", grad_output, x, r, ph, pw, box, m, deterministic)

    # -- RoIPool ---------------------------------------------------------------------

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
        out = self.xp.zeros((r.shape[0], c, ph, pw), dtype=x.dtype)
        self._run("roi_pool", "forward", x.dtype, out.size, x, r, *_ints(c, h, w, ph, pw), scale, out)
        return out

    def roi_pool_backward(self, grad_output, input, rois, output_size, spatial_scale=1.0, deterministic=True):
        """Gradient of ``roi_pool`` with respect to ``input``.

        Parameters
        ----------
        grad_output : array, shape (K, C, PH, PW)
        input, rois, output_size, spatial_scale
            As in ``roilib.reference.roi_pool``.
        deterministic : bool
            ``True``: gather without floating-point atomics, bitwise identical run to run.
            ``False``: scatter with ``atomicAdd`` (faster on a GPU; the order of additions varies).

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        x, r, ph, pw, scale = self._box_args(input, rois, output_size, spatial_scale)
        n, c, h, w = x.shape
        k = r.shape[0]
        g = self._grad(grad_output, (k, c, ph, pw), x)
        grad = self._zeros_acc(x.shape, x.dtype)
        dims = _ints(c, h, w, ph, pw)
        if not deterministic:
            self._run("roi_pool", "backward_atomic", x.dtype, g.size, g, x, r, *dims, scale, grad)
        else:
            ranges = self.xp.empty((k, 5), dtype=np.int32)
            argmax = self.xp.empty(g.shape, dtype=np.int32)
            self._run("roi_pool", "ranges", x.dtype, k, r, *dims[1:], scale, ranges)
            self._run("roi_pool", "argmax", x.dtype, g.size, x, r, *dims, scale, argmax)
            self._run(
                "roi_pool", "backward_gather", x.dtype, grad.size, g, r, ranges, argmax, np.int32(k), *dims, scale, grad
            )
        return grad.astype(x.dtype, copy=False)

    # -- SPP -------------------------------------------------------------------------

    def _spp_levels(self, levels, c):
        """``(level, column offset)`` per pyramid level, and the output width."""
        out, offset = [], 0
        for n in levels:
            out.append((n, offset))
            offset += c * n * n
        return out, offset

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
        out = self.xp.zeros((n, width), dtype=x.dtype)
        for level, offset in plan:
            self._run("spp", "forward", x.dtype, n * c * level * level, x, *_ints(c, h, w, level, offset, width, m), out)
        return out

    def spp_backward(self, grad_output, input, levels=(4, 2, 1), mode="max", deterministic=True):
        """Gradient of ``spp`` with respect to ``input``.

        Parameters
        ----------
        grad_output : array, shape (N, C * sum(n * n))
        input, levels, mode
            As in ``roilib.reference.spp``.
        deterministic : bool
            ``True``: gather without floating-point atomics, bitwise identical run to run.
            ``False``: scatter with ``atomicAdd`` (faster on a GPU; the order of additions varies).

        Returns
        -------
        array, shape (N, C, H, W), the input's dtype
        """
        x = self._input(input)
        levels, m = v.check_levels(levels), _MODE[v.check_mode(mode)]
        n, c, h, w = x.shape
        plan, width = self._spp_levels(levels, c)
        g = self._grad(grad_output, (n, width), x)
        grad = self._zeros_acc(x.shape, x.dtype)
        for level, offset in plan:
            cells = n * c * level * level
            if not deterministic:
                self._run(
                    "spp", "backward_atomic", x.dtype, cells, g, x, *_ints(c, h, w, level, offset, width, m), grad
                )
                continue
            argmax = self.xp.zeros(cells if m == _MODE["max"] else 1, dtype=np.int32)
            if m == _MODE["max"]:
                self._run("spp", "argmax", x.dtype, cells, x, *_ints(h, w, level), argmax)
            self._run(
                "spp", "backward_gather", x.dtype, grad.size, g, argmax, *_ints(c, h, w, level, offset, width, m), grad
            )
        return grad.astype(x.dtype, copy=False)

    # -- issue 11: position-sensitive pooling and FPN multiscale RoIAlign -------------
    #
    # Their backward kernels use atomics only so far; ``deterministic=True`` raises
    # NotImplementedError naming the op until a deterministic kernel exists.

    def _empty(self, shape, dtype):
        """An output buffer that every work item writes (no zero-fill needed)."""
        return self.xp.empty(shape, dtype=dtype)

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

    def ps_roi_pool(self, input, rois, output_size, spatial_scale=1.0):
        """Position-sensitive RoIPool forward (as ``roilib.reference.ps_roi_pool``).

        Returns
        -------
        array, shape (K, C_out, PH, PW), the input's dtype
        """
        x, r, ph, pw, scale, c_out = self._ps_args(input, rois, output_size, spatial_scale)
        n, c, h, w = x.shape
        out = self._empty((r.shape[0], c_out, ph, pw), x.dtype)
        self._run("ps_roi", "pool_forward", x.dtype, out.size, x, r, *_ints(c, h, w, ph, pw, c_out), scale, out)
        return out

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
        self._run("ps_roi", "pool_backward_atomic", x.dtype, g.size, g, r, *_ints(c, h, w, ph, pw, c_out), scale, grad)
        return grad.astype(x.dtype, copy=False)

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
        self._run("ps_roi", "align_forward", x.dtype, out.size, x, r, *_ints(c, h, w, ph, pw, c_out), scale, sr, out)
        return out

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
            "ps_roi", "align_backward_atomic", x.dtype, g.size, g, r, *_ints(c, h, w, ph, pw, c_out), scale, sr, grad
        )
        return grad.astype(x.dtype, copy=False)

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
            "multiscale", "levels", x.dtype, r.shape[0], r, *_ints(len(maps), k_min, k_max, k0),
            _real(x.dtype, s0), _real(x.dtype, eps), levels,
        )
        scale_table = self.xp.asarray(np.array(scales, dtype=v.compute_dtype(x.dtype)))
        return maps, r, levels, scale_table, _ints(x.shape[1], ph, pw, sr, al)

    def _level_table(self, arrays):
        """``(L, 3)`` int64 ``{address, H, W}`` per level, on this backend's device."""
        rows = [(self._address(a), a.shape[2], a.shape[3]) for a in arrays]
        return self.xp.asarray(np.array(rows, dtype=np.int64))

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
        return [gr.astype(m.dtype, copy=False) for gr, m in zip(grads, maps)]
