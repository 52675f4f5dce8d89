"""Argument checks shared by every op and backend (one place, as torchvision keeps them).

Each checker either returns a normalised value or raises ``TypeError``/``ValueError``
whose message names the argument and says what was expected. They accept NumPy and
CuPy arrays alike (``rois`` are validated on the host: they are small).
"""
from __future__ import annotations

import numbers
from typing import Sequence, Tuple, Union

import numpy as np

FLOAT_DTYPES = (np.float16, np.float32, np.float64)
POOL_MODES = ("avg", "max")


def array_module(x):
    """``numpy`` or ``cupy``, whichever ``x`` belongs to (without importing CuPy).

    A device array type of the tests' (``__roilib_xp__``) names its own module.
    """
    fake = getattr(type(x), "__roilib_xp__", None)
    if fake is not None:
        return fake
    if type(x).__module__.split(".")[0] == "cupy":
        import cupy

        return cupy
    return np


def to_host(x) -> np.ndarray:
    """A NumPy view or copy of a NumPy/CuPy array."""
    return x.get() if hasattr(x, "get") and not isinstance(x, np.ndarray) else np.asarray(x)


def is_array(x) -> bool:
    """True for NumPy and CuPy arrays (and the tests' stand-in for device arrays)."""
    return (
        isinstance(x, np.ndarray)
        or type(x).__module__.split(".")[0] == "cupy"
        or getattr(type(x), "__roilib_xp__", None) is not None
    )


def compute_dtype(dtype) -> np.dtype:
    """Arithmetic dtype for an input dtype: float16 is computed in float32."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype == np.float16 else dtype


def check_input(input, name: str = "input"):
    """``input`` must be a 4-D floating array ``(N, C, H, W)``."""
    if not is_array(input):
        raise TypeError(
            f"{name} must be a NumPy or CuPy array of shape (N, C, H, W), got {type(input).__name__}"
            " (torch tensors go through roilib.torch)"
        )
    if input.ndim != 4:
        raise ValueError(f"{name} must have 4 dimensions (N, C, H, W), got shape {tuple(input.shape)}")
    if input.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, float32 or float64, got dtype {input.dtype}")
    if min(input.shape[2:]) < 1:
        raise ValueError(f"{name} must have a non-empty spatial size (H, W >= 1), got shape {tuple(input.shape)}")
    return input


def check_rois(rois, input, name: str = "rois") -> np.ndarray:
    """Normalise ``rois`` to a host ``(K, 5)`` array in the input's compute dtype.

    Accepts a ``(K, 5)`` array ``[batch_index, x1, y1, x2, y2]`` or a list/tuple of
    per-image ``(K_i, 4)`` arrays (image ``i`` gets batch index ``i``).
    """
    n_images = input.shape[0]
    dtype = compute_dtype(input.dtype)
    if isinstance(rois, (list, tuple)):
        _check_list_length(rois, n_images, name)
        parts = []
        for i, boxes in enumerate(rois):
            if not is_array(boxes):
                raise TypeError(f"{name}[{i}] must be an array of shape (K_{i}, 4), got {type(boxes).__name__}")
            boxes = to_host(boxes)
            _check_image_boxes_shape(boxes, f"{name}[{i}]", i)
            _check_numeric(boxes, f"{name}[{i}]")
            batch = np.full((boxes.shape[0], 1), i, dtype=np.float64)
            parts.append(np.concatenate([batch, boxes.astype(np.float64)], axis=1))
        out = np.concatenate(parts, axis=0) if parts else np.zeros((0, 5))
        return _check_boxes(out, n_images, name).astype(dtype)
    _check_is_rois_array(rois, name)
    rois = to_host(rois)
    _check_rois_shape(rois, name)
    _check_numeric(rois, name)
    return _check_boxes(rois.astype(np.float64), n_images, name).astype(dtype)


def _check_list_length(rois, n_images: int, name: str) -> None:
    if len(rois) > n_images:
        raise ValueError(f"{name} is a list of {len(rois)} per-image box arrays but input has only {n_images} images")


def _check_is_rois_array(rois, name: str, columns: int = 5) -> None:
    if not is_array(rois):
        raise TypeError(
            f"{name} must be a (K, {columns}) array or a list of per-image (K_i, {columns - 1}) arrays, "
            f"got {type(rois).__name__}"
        )


def _check_image_boxes_shape(boxes, label: str, i: int, columns: int = 4) -> None:
    if boxes.ndim != 2 or boxes.shape[1] != columns:
        layout = _ROW_LAYOUT[columns + 1].replace("batch_index, ", "")
        raise ValueError(f"{label} must have shape (K_{i}, {columns}) {layout}, got shape {tuple(boxes.shape)}")


def _check_rois_shape(rois, name: str, columns: int = 5) -> None:
    if rois.ndim != 2 or rois.shape[1] != columns:
        hint = ""
        if rois.ndim == 2 and rois.shape[1] == columns - 1:
            hint = "; a (K, {}) array lacks the batch index: prepend it or pass a list of per-image arrays".format(
                columns - 1
            )
        raise ValueError(
            f"{name} must have shape (K, {columns}) {_ROW_LAYOUT[columns]}, got shape {tuple(rois.shape)}{hint}"
        )


_ROW_LAYOUT = {5: "[batch_index, x1, y1, x2, y2]", 6: "[batch_index, cx, cy, w, h, angle_degrees]"}


def check_rois_on_device(rois, input, xp, name: str = "rois", columns: int = 5):
    """``rois`` as a contiguous device ``(K, columns)`` array in the input's compute
    dtype (5 columns: axis-aligned boxes; 6: rotated boxes), checked and built without
    reading a value (no device-to-host copy, no sync).

    Shapes, dtypes, list lengths and devices are checked here, from metadata. The
    values (finite coordinates, an integral batch index in ``[0, N)``) are checked by
    the kernels, which output NaN for a bad row: reading them here would synchronise
    the GPU on every call and break CUDA-graph capture.
    """
    n_images = input.shape[0]
    dtype = compute_dtype(input.dtype)
    device = getattr(input, "device", None)

    def on_input_device(a, label):
        if not is_array(a) or array_module(a) is not xp:
            raise TypeError(f"{label} must be a {xp.__name__} array on the input's device, got {type(a).__name__}")
        if getattr(a, "device", None) != device:
            raise ValueError(f"{label} is on device {a.device} but input is on device {device}")
        if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
            raise TypeError(f"{label} must hold real numbers, got dtype {a.dtype}")

    if isinstance(rois, (list, tuple)):
        _check_list_length(rois, n_images, name)
        parts = []
        for i, boxes in enumerate(rois):
            on_input_device(boxes, f"{name}[{i}]")
            _check_image_boxes_shape(boxes, f"{name}[{i}]", i, columns - 1)
            parts.append(xp.concatenate([xp.full((boxes.shape[0], 1), i, dtype=dtype), boxes.astype(dtype)], axis=1))
        out = xp.concatenate(parts, axis=0) if parts else xp.zeros((0, 5), dtype=dtype)
        return xp.ascontiguousarray(out)
    _check_is_rois_array(rois, name, columns)
    on_input_device(rois, name)
    _check_rois_shape(rois, name, columns)
    return xp.ascontiguousarray(rois.astype(dtype, copy=False))


def _check_numeric(a: np.ndarray, name: str) -> None:
    if not (np.issubdtype(a.dtype, np.floating) or np.issubdtype(a.dtype, np.integer)):
        raise TypeError(f"{name} must hold real numbers, got dtype {a.dtype}")


def _check_boxes(rois: np.ndarray, n_images: int, name: str) -> np.ndarray:
    if not np.isfinite(rois).all():
        bad = int(np.argwhere(~np.isfinite(rois))[0, 0])
        raise ValueError(f"{name} must be finite; row {bad} is {rois[bad].tolist()}")
    batch = rois[:, 0]
    if (batch != np.round(batch)).any():
        bad = int(np.argwhere(batch != np.round(batch))[0, 0])
        raise ValueError(f"{name}[:, 0] is the batch index and must be an integer; row {bad} has {batch[bad]}")
    if ((batch < 0) | (batch >= n_images)).any():
        bad = int(np.argwhere((batch < 0) | (batch >= n_images))[0, 0])
        raise ValueError(
            f"{name}[:, 0] is the batch index and must be in [0, {n_images}) for an input of {n_images} images;"
            f" row {bad} has {int(batch[bad])}"
        )
    return rois


def check_output_size(output_size, name: str = "output_size") -> Tuple[int, int]:
    """An int or a pair of positive ints -> ``(PH, PW)``."""
    if _is_int(output_size):
        pair = (output_size, output_size)
    elif isinstance(output_size, (tuple, list)) and len(output_size) == 2 and all(_is_int(v) for v in output_size):
        pair = tuple(output_size)
    else:
        raise TypeError(f"{name} must be an int or a pair of ints (h, w), got {output_size!r}")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {output_size!r}")
    return int(pair[0]), int(pair[1])


def check_spatial_scale(spatial_scale, name: str = "spatial_scale") -> float:
    """A positive finite real number."""
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, numbers.Real):
        raise TypeError(f"{name} must be a real number (1 / stride), got {spatial_scale!r}")
    if not np.isfinite(spatial_scale) or spatial_scale <= 0:
        raise ValueError(f"{name} must be positive and finite (1 / stride), got {spatial_scale!r}")
    return float(spatial_scale)


def check_sampling_ratio(sampling_ratio, name: str = "sampling_ratio") -> int:
    """An int; ``<= 0`` selects the adaptive grid ``ceil(roi_size / output_size)``."""
    if not _is_int(sampling_ratio):
        raise TypeError(f"{name} must be an int (samples per bin and axis, or -1 for adaptive), got {sampling_ratio!r}")
    return int(sampling_ratio)


def check_aligned(aligned, name: str = "aligned") -> bool:
    if not isinstance(aligned, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {aligned!r}")
    return bool(aligned)


def check_mode(mode, name: str = "mode") -> str:
    if mode not in POOL_MODES:
        raise ValueError(f"{name} must be one of {POOL_MODES}, got {mode!r}")
    return mode


def check_levels(levels, name: str = "levels") -> Tuple[int, ...]:
    """A non-empty sequence of positive ints (pyramid bins per side, coarse to fine)."""
    if _is_int(levels) or not isinstance(levels, Sequence) or len(levels) == 0:
        raise TypeError(f"{name} must be a non-empty sequence of ints such as (4, 2, 1), got {levels!r}")
    if not all(_is_int(n) for n in levels):
        raise TypeError(f"{name} must contain ints, got {levels!r}")
    if min(levels) < 1:
        raise ValueError(f"{name} must be positive, got {levels!r}")
    return tuple(int(n) for n in levels)


def check_grad_output(grad_output, expected_shape: Tuple[int, ...], input, name: str = "grad_output"):
    """``grad_output`` must match the forward's output shape and the input's dtype."""
    if not is_array(grad_output):
        raise TypeError(f"{name} must be an array of shape {expected_shape}, got {type(grad_output).__name__}")
    if tuple(grad_output.shape) != tuple(expected_shape):
        raise ValueError(f"{name} must have the forward output's shape {tuple(expected_shape)}, got {tuple(grad_output.shape)}")
    if grad_output.dtype != input.dtype:
        raise TypeError(f"{name} must have the input's dtype {input.dtype}, got {grad_output.dtype}")
    if array_module(grad_output) is not array_module(input):
        raise TypeError(f"{name} and input must live on the same device (both NumPy or both CuPy)")
    if getattr(grad_output, "device", None) != getattr(input, "device", None):
        raise ValueError(f"{name} is on device {grad_output.device} but input is on device {input.device}")
    return grad_output


def _is_int(v) -> bool:
    return isinstance(v, (numbers.Integral, np.integer)) and not isinstance(v, (bool, np.bool_))


Rois = Union[np.ndarray, Sequence[np.ndarray]]


def check_rotated_rois(rois, input, name: str = "rois") -> np.ndarray:
    """Normalise rotated boxes to a host ``(K, 6)`` array in the input's compute dtype.

    Accepts a ``(K, 6)`` array ``[batch_index, cx, cy, w, h, angle_degrees]`` or a
    list/tuple of per-image ``(K_i, 5)`` arrays ``[cx, cy, w, h, angle_degrees]``
    (image ``i`` gets batch index ``i``). Widths and heights must be non-negative and
    every entry finite (a NaN or infinite angle is an error, not a zero).
    """
    n_images = input.shape[0]
    dtype = compute_dtype(input.dtype)
    if isinstance(rois, (list, tuple)):
        if len(rois) > n_images:
            raise ValueError(
                f"{name} is a list of {len(rois)} per-image box arrays but input has only {n_images} images"
            )
        parts = []
        for i, boxes in enumerate(rois):
            if not is_array(boxes):
                raise TypeError(f"{name}[{i}] must be an array of shape (K_{i}, 5), got {type(boxes).__name__}")
            boxes = to_host(boxes)
            if boxes.ndim != 2 or boxes.shape[1] != 5:
                raise ValueError(
                    f"{name}[{i}] must have shape (K_{i}, 5) [cx, cy, w, h, angle_degrees], got shape {boxes.shape}"
                )
            _check_numeric(boxes, f"{name}[{i}]")
            batch = np.full((boxes.shape[0], 1), i, dtype=np.float64)
            parts.append(np.concatenate([batch, boxes.astype(np.float64)], axis=1))
        out = np.concatenate(parts, axis=0) if parts else np.zeros((0, 6))
    else:
        if not is_array(rois):
            raise TypeError(
                f"{name} must be a (K, 6) array or a list of per-image (K_i, 5) arrays, got {type(rois).__name__}"
            )
        rois = to_host(rois)
        if rois.ndim != 2 or rois.shape[1] != 6:
            hint = (
                "; rotated boxes are [batch_index, cx, cy, w, h, angle_degrees]: a (K, 5) array is either"
                " axis-aligned [batch_index, x1, y1, x2, y2] (use roi_align) or lacks the batch index"
                if rois.ndim == 2 and rois.shape[1] == 5
                else ""
            )
            raise ValueError(
                f"{name} must have shape (K, 6) [batch_index, cx, cy, w, h, angle_degrees], got shape {rois.shape}{hint}"
            )
        _check_numeric(rois, name)
        out = rois.astype(np.float64)
    if out.shape[0] and not np.isfinite(out[:, 5]).all():
        bad = int(np.argwhere(~np.isfinite(out[:, 5]))[0, 0])
        raise ValueError(f"{name}[:, 5] is the angle in degrees and must be finite; row {bad} has {out[bad, 5]}")
    out = _check_boxes(out, n_images, name)
    if (out[:, 3:5] < 0).any():
        bad = int(np.argwhere((out[:, 3:5] < 0).any(axis=1))[0, 0])
        raise ValueError(f"{name}[:, 3:5] are the width and height and must be non-negative; row {bad} is {out[bad].tolist()}")
    return out.astype(dtype)

# -- FPN (multiscale RoIAlign) and position-sensitive pooling ------------------------


def check_features(features, name: str = "features") -> list:
    """A non-empty sequence of ``(N, C, H_l, W_l)`` maps sharing N, C, dtype and device."""
    if is_array(features) or not isinstance(features, Sequence) or len(features) == 0:
        raise TypeError(
            f"{name} must be a non-empty list of (N, C, H_l, W_l) arrays, one per pyramid level,"
            f" got {type(features).__name__}"
        )
    maps = [check_input(f, f"{name}[{i}]") for i, f in enumerate(features)]
    first = maps[0]
    for i, f in enumerate(maps[1:], start=1):
        if tuple(f.shape[:2]) != tuple(first.shape[:2]):
            raise ValueError(
                f"{name}[{i}] has (N, C) = {tuple(f.shape[:2])} but {name}[0] has {tuple(first.shape[:2])};"
                " every level must have the same images and channels"
            )
        if f.dtype != first.dtype:
            raise TypeError(f"{name}[{i}] has dtype {f.dtype} but {name}[0] has {first.dtype}")
        if array_module(f) is not array_module(first):
            raise TypeError(f"{name}[{i}] and {name}[0] must live on the same device (both NumPy or both CuPy)")
    return maps


def check_scales(scales, n_levels: int, name: str = "scales") -> Tuple[float, ...]:
    """One scale per level: powers of two, halving from each level to the next.

    FPN's levels are inferred from the scales (a map at ``2**-k`` is level ``k``), so
    they must be exact powers of two, finest first, one level apart.
    """
    if isinstance(scales, np.ndarray) and scales.ndim == 1:
        scales = scales.tolist()
    if _is_real(scales) or not isinstance(scales, Sequence):
        raise TypeError(f"{name} must be a sequence of spatial scales, one per level, got {scales!r}")
    if len(scales) != n_levels:
        raise ValueError(f"{name} has {len(scales)} entries but there are {n_levels} feature maps; give one per map")
    out = tuple(check_spatial_scale(s, f"{name}[{i}]") for i, s in enumerate(scales))
    for i, s in enumerate(out):
        m, _ = np.frexp(s)
        if m != 0.5:
            raise ValueError(f"{name}[{i}] = {s!r} is not a power of two (2**-k for pyramid level k)")
        if i and s != out[i - 1] / 2:
            raise ValueError(
                f"{name} must halve from each level to the next (finest map first), got {list(out)}"
            )
    return out


def check_fpn_mapping(canonical_scale, canonical_level, eps) -> Tuple[float, int, float]:
    """FPN's ``s0`` (positive), ``k0`` (an int) and ``eps`` (finite, >= 0)."""
    if not _is_real(canonical_scale) or not np.isfinite(canonical_scale) or canonical_scale <= 0:
        raise ValueError(f"canonical_scale must be a positive number (224 in FPN), got {canonical_scale!r}")
    if not _is_int(canonical_level):
        raise TypeError(f"canonical_level must be an int (4 in FPN), got {canonical_level!r}")
    if not _is_real(eps) or not np.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0 (1e-6 in torchvision), got {eps!r}")
    return float(canonical_scale), int(canonical_level), float(eps)


def check_ps_channels(input, output_size: Tuple[int, int], name: str = "input") -> int:
    """Position-sensitive pooling needs ``C = C_out * PH * PW``; returns ``C_out``."""
    c = input.shape[1]
    ph, pw = output_size
    if c % (ph * pw) != 0:
        raise ValueError(
            f"{name} has {c} channels, which is not a multiple of PH * PW = {ph} * {pw} = {ph * pw};"
            " position-sensitive pooling reads one channel group per output bin"
        )
    return c // (ph * pw)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))
