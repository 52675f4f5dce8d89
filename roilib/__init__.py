"""roilib: RoI feature extraction (SPP, RoIPool, RoIAlign, RoIWarp) with exact semantics.

The public functions take NumPy or CuPy arrays and dispatch on the array type: NumPy
arrays run the reference implementation (:mod:`roilib.reference`), CuPy arrays the CUDA
kernels (:mod:`roilib.cuda`). PyTorch users go through :mod:`roilib.torch`.

``input`` is ``(N, C, H, W)``; ``rois`` is a ``(K, 5)`` array
``[batch_index, x1, y1, x2, y2]`` in image pixels or a list of per-image ``(K_i, 4)``
arrays; ``output_size`` is an int or ``(h, w)``. Each ``<op>_backward`` takes the
forward's arguments plus ``grad_output`` and returns the gradient for ``input``;
:func:`roi_align_rois_backward` and :func:`roi_warp_rois_backward` return the gradient
for the box coordinates.
"""
from __future__ import annotations

import functools

from . import geometry, reference
from ._validate import array_module
from ._version import __version__

__all__ = [
    "spp",
    "spp_backward",
    "roi_pool",
    "roi_pool_backward",
    "roi_align",
    "roi_align_backward",
    "roi_align_rois_backward",
    "roi_warp",
    "roi_warp_backward",
    "roi_warp_rois_backward",

    "multiscale_roi_align",
    "multiscale_roi_align_backward",
    "ps_roi_pool",
    "ps_roi_pool_backward",
    "ps_roi_align",
    "ps_roi_align_backward",
    "geometry",
    "reference",
]


def _backend_for(array):
    """The module implementing the ops for ``array``'s type."""
    if array_module(array) is not __import__("numpy"):
        from .cuda import gpu

        return gpu
    return reference


def _dispatch(name: str):
    """A public op that runs ``name`` from the backend matching its first array."""
    ref = getattr(reference, name)

    @functools.wraps(ref)
    def op(*args, **kwargs):
        first = args[0] if args else kwargs.get("grad_output", kwargs.get("input"))
        return getattr(_backend_for(first), name)(*args, **kwargs)

    return op


spp = _dispatch("spp")
spp_backward = _dispatch("spp_backward")
roi_pool = _dispatch("roi_pool")
roi_pool_backward = _dispatch("roi_pool_backward")
roi_align = _dispatch("roi_align")
roi_align_backward = _dispatch("roi_align_backward")
roi_align_rois_backward = _dispatch("roi_align_rois_backward")
roi_warp = _dispatch("roi_warp")
roi_warp_backward = _dispatch("roi_warp_backward")
roi_warp_rois_backward = _dispatch("roi_warp_rois_backward")

# Rotated RoIAlign and Precise RoI Pooling (issue 12)
from . import geometry_prroi, geometry_rotated  # noqa: E402

__all__ += [
    "roi_align_rotated",
    "roi_align_rotated_backward",
    "roi_align_rotated_rois_backward",
    "prroi_pool",
    "prroi_pool_backward",
    "prroi_pool_rois_backward",
]
roi_align_rotated = _dispatch("roi_align_rotated")
roi_align_rotated_backward = _dispatch("roi_align_rotated_backward")
roi_align_rotated_rois_backward = _dispatch("roi_align_rotated_rois_backward")
prroi_pool = _dispatch("prroi_pool")
prroi_pool_backward = _dispatch("prroi_pool_backward")
prroi_pool_rois_backward = _dispatch("prroi_pool_rois_backward")


# -- FPN and position-sensitive pooling (roilib.family holds their geometry) ---------

ps_roi_pool = _dispatch("ps_roi_pool")
ps_roi_pool_backward = _dispatch("ps_roi_pool_backward")
ps_roi_align = _dispatch("ps_roi_align")
ps_roi_align_backward = _dispatch("ps_roi_align_backward")


def _first_map(features):
    """The first map of a pyramid (or ``features`` itself when it is not a sequence)."""
    return features[0] if isinstance(features, (list, tuple)) and features else features


@functools.wraps(reference.multiscale_roi_align)
def multiscale_roi_align(features, *args, **kwargs):
    return _backend_for(_first_map(features)).multiscale_roi_align(features, *args, **kwargs)


@functools.wraps(reference.multiscale_roi_align_backward)
def multiscale_roi_align_backward(grad_output, *args, **kwargs):
    return _backend_for(grad_output).multiscale_roi_align_backward(grad_output, *args, **kwargs)
