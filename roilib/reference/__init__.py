"""NumPy reference implementations: the oracle every other backend is tested against.

One module per op family; all geometry comes from :mod:`roilib.geometry`.
"""
from .roi_align import (
    roi_align,
    roi_align_backward,
    roi_align_rois_backward,
)
from .roi_warp import roi_warp, roi_warp_backward, roi_warp_rois_backward
from .roi_pool import roi_pool, roi_pool_backward
from .spp import spp, spp_backward
from .multiscale import multiscale_roi_align, multiscale_roi_align_backward
from .ps_roi import ps_roi_align, ps_roi_align_backward, ps_roi_pool, ps_roi_pool_backward

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
]

from .prroi_pool import prroi_pool, prroi_pool_backward, prroi_pool_rois_backward  # noqa: E402
from .roi_align_rotated import (  # noqa: E402
    roi_align_rotated,
    roi_align_rotated_backward,
    roi_align_rotated_rois_backward,
)

__all__ += [
    "roi_align_rotated",
    "roi_align_rotated_backward",
    "roi_align_rotated_rois_backward",
    "prroi_pool",
    "prroi_pool_backward",
    "prroi_pool_rois_backward",

    "multiscale_roi_align",
    "multiscale_roi_align_backward",
    "ps_roi_pool",
    "ps_roi_pool_backward",
    "ps_roi_align",
    "ps_roi_align_backward",
]
