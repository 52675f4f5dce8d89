"""Memory layout helpers shared by the reference ops.

The reference works channels-last, ``(N, H, W, C)``: a box then touches a small block
of rows and columns whose channels are contiguous, so each box costs a couple of BLAS
calls over all channels at once instead of a Python loop over channels. A channels-last
copy of a whole map can cost more memory than the output, so RoIAlign's average copies
one group of channels at a time (:func:`channel_groups`), or none at all when few boxes
read the map.
"""
from __future__ import annotations

import numpy as np

from .._validate import compute_dtype


def channels_last(x: np.ndarray) -> np.ndarray:
    """``(N, C, H, W)`` -> contiguous ``(N, H, W, C)`` in the compute dtype."""
    return np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=compute_dtype(x.dtype))


def channels_first(x: np.ndarray, dtype) -> np.ndarray:
    """``(..., H, W, C)`` -> contiguous ``(..., C, H, W)`` cast to ``dtype``."""
    axes = tuple(range(x.ndim - 3)) + (x.ndim - 1, x.ndim - 3, x.ndim - 2)
    return np.ascontiguousarray(x.transpose(axes), dtype=dtype)


def block(index):
    """A slice when ``index`` (sorted, unique) is a contiguous run, else the index itself.

    Slicing keeps the gathered block a view; fancy indexing would copy it. A slice is
    returned as it is.
    """
    if isinstance(index, slice):
        return index
    if index.size and index[-1] - index[0] + 1 == index.size:
        return slice(int(index[0]), int(index[-1]) + 1)
    return index


def _block_index(rows: np.ndarray, cols: np.ndarray):
    """Index of ``plane[rows][:, cols]``: slices for contiguous runs, ``ix_`` if neither is."""
    r, c = block(rows), block(cols)
    if isinstance(r, slice) or isinstance(c, slice):
        return r, c  # at most one advanced index: NumPy keeps the (rows, cols) layout
    return np.ix_(r, c)


def take_block(plane: np.ndarray, rows, cols) -> np.ndarray:
    """``plane[rows][:, cols]`` for a ``(H, W, C)`` plane, as a view where possible
    (``rows`` and ``cols``: sorted unique indices, or slices)."""
    return plane[_block_index(rows, cols)]


def add_block(plane: np.ndarray, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
    """``plane[rows][:, cols] += values`` in place (rows and cols are unique)."""
    plane[_block_index(rows, cols)] += values


#: boxes reading fewer map cells than this many maps' worth are read block by block
#: (each block gathered and transposed on its own) instead of copying the whole map
#: channels-last; measured on the benchmark's map, the two cost the same near 3
WHOLE_MAP_FRACTION = 3.0
#: the same choice for a gradient: adding blocks straight into ``(N, C, H, W)`` is
#: strided, but it saves zeroing and transposing a channels-last copy; even near 6
GRAD_WHOLE_MAP_FRACTION = 6.0
#: channels of one channels-last copy (:func:`channel_groups`): a quarter of the
#: benchmark's 256-channel map; 64 to 128 were the fastest (a box's block of a group
#: stays in cache between its two products), and the copy is what memory it costs
CHANNEL_GROUP = 64
#: RoIAlign's average reads the map a channel group at a time, channels-last, when its
#: boxes read more than this many maps' worth of cells (on the benchmark's map the two
#: ways cost the same near 3) and the map has more channels than one group; otherwise it
#: reads each box's block of the ``(N, C, H, W)`` map where it is, copying nothing. With
#: at most one group's channels the copy would be the whole map, the memory the groups
#: are there to save; reading in place then took up to 1.6 times as long with a fixed
#: sampling ratio, as long with the adaptive one (16 and 64 channels, 256 to 2000 boxes)
GROUPED_MAP_FRACTION = 3.0


def cells_read(rois: np.ndarray, spatial_scale: float, height: int, width: int) -> int:
    """An upper estimate of the map cells the boxes read: each box's scaled extent plus a
    cell of bilinear reach on every side, clipped to the map. It only chooses a layout
    (:class:`MapBlocks`, :class:`GradBlocks`, :func:`reads_in_groups`); no result depends
    on it beyond rounding (RoIAlign's average multiplies in another order in groups)."""
    if rois.shape[0] == 0:
        return 0
    s = float(spatial_scale)
    span_h = np.clip(np.ceil(np.abs(rois[:, 4] - rois[:, 2]) * s) + 3, 1, height)
    span_w = np.clip(np.ceil(np.abs(rois[:, 3] - rois[:, 1]) * s) + 3, 1, width)
    return int(np.sum(span_h * span_w))


def _reads_most_of_the_map(cells: int, shape, fraction=None) -> bool:
    n, _, h, w = shape
    return cells >= (WHOLE_MAP_FRACTION if fraction is None else fraction) * n * h * w


def reads_in_groups(cells: int, shape) -> bool:
    """Whether RoIAlign's average should read a map of ``shape`` ``(N, C, H, W)`` through
    :func:`channel_groups`, its boxes reading ``cells`` cells (:data:`GROUPED_MAP_FRACTION`)."""
    return shape[1] > CHANNEL_GROUP and _reads_most_of_the_map(cells, shape, GROUPED_MAP_FRACTION)


def channel_groups(x: np.ndarray, group: int = None):
    """Yield ``(c0, copy)``: each run of ``group`` channels of ``x`` ``(N, C, H, W)``
    from channel ``c0``, as a contiguous channels-last ``(N, H, W, G)`` copy in the compute
    dtype (the last group may be narrower). The next copy is made when the next group is
    asked for: drop the last one first (and any view of it), so only one lives at a time."""
    group = CHANNEL_GROUP if group is None else group
    for c0 in range(0, x.shape[1], group):
        yield c0, channels_last(x[:, c0 : c0 + group])


class MapBlocks:
    """Channels-last blocks of an ``(N, C, H, W)`` map, in the compute dtype.

    When the boxes read the map several times over (:data:`WHOLE_MAP_FRACTION`), the
    whole map is copied channels-last once and blocks are views of it. When few boxes
    read a large map that copy would cost more than the boxes themselves, so each block
    is gathered and transposed on its own instead.

    Parameters
    ----------
    x : ndarray, shape (N, C, H, W)
    cells : int
        How many map cells the boxes read in all (:func:`cells_read`).
    """

    def __init__(self, x: np.ndarray, cells: int):
        self.x, self.shape = x, x.shape
        self.dtype = compute_dtype(x.dtype)
        self.hwc = channels_last(x) if _reads_most_of_the_map(cells, x.shape) else None

    @classmethod
    def of_channels_last(cls, x_hwc: np.ndarray) -> "MapBlocks":
        """Blocks of a map already channels-last, ``(N, H, W, C)``, in its own dtype."""
        blocks = cls.__new__(cls)
        n, h, w, c = x_hwc.shape
        blocks.x, blocks.shape, blocks.dtype, blocks.hwc = None, (n, c, h, w), x_hwc.dtype, x_hwc
        return blocks

    def block(self, image: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
        """Rows ``r0:r1`` and columns ``c0:c1`` of one image, shape ``(R, S, C)``."""
        if self.hwc is not None:
            return self.hwc[image, r0:r1, c0:c1]
        region = self.x[image, :, r0:r1, c0:c1].transpose(1, 2, 0)
        return np.ascontiguousarray(region, dtype=self.dtype)

    def take(self, image: int, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
        """``plane[rows][:, cols]`` of one image (sorted unique indices), ``(R, S, C)``.

        Without the channels-last copy only the listed cells are gathered and
        transposed: a large box sampled sparsely reads few of the rows it spans.
        """
        if self.hwc is not None:
            return take_block(self.hwc[image], rows, cols)
        r, c = block(rows), block(cols)
        plane = self.x[image]
        if isinstance(r, slice) and isinstance(c, slice):
            region = plane[:, r, c]
        elif isinstance(r, slice):
            region = plane[:, r][:, :, cols]  # a view of the rows, then one gather
        else:
            region = plane[:, rows[:, None], cols]  # never copies whole rows of the map
        return np.ascontiguousarray(region.transpose(1, 2, 0), dtype=self.dtype)


class GradBlocks:
    """An ``(N, C, H, W)`` gradient accumulated from channels-last blocks.

    Like :class:`MapBlocks`: channels-last when the boxes cover the map many times over
    (:data:`GRAD_WHOLE_MAP_FRACTION`; one transpose at the end), otherwise added straight
    into the ``(N, C, H, W)`` result, whose untouched pages ``np.zeros`` never even
    writes. The additions are the same either way.
    """

    def __init__(self, shape, dtype, cells: int):
        n, c, h, w = self.shape = tuple(shape)
        self.dtype = compute_dtype(np.dtype(dtype))
        self.channels_last = _reads_most_of_the_map(cells, shape, GRAD_WHOLE_MAP_FRACTION)
        self.grad = np.zeros((n, h, w, c) if self.channels_last else (n, c, h, w), dtype=self.dtype)

    @classmethod
    def channels_last_like(cls, x_hwc: np.ndarray) -> "GradBlocks":
        """A channels-last gradient for the ``(N, H, W, C)`` map ``x_hwc``, in its dtype."""
        n, h, w, c = x_hwc.shape
        grad = cls.__new__(cls)
        grad.shape, grad.dtype, grad.channels_last = (n, c, h, w), x_hwc.dtype, True
        grad.grad = np.zeros_like(x_hwc)
        return grad

    def plane(self, image: int) -> np.ndarray:
        """One image's gradient as a writable ``(H, W, C)`` view."""
        return self.grad[image] if self.channels_last else self.grad[image].transpose(1, 2, 0)

    def add(self, image: int, rows: np.ndarray, cols: np.ndarray, values: np.ndarray) -> None:
        """``grad[image][rows][:, cols] += values`` (``(R, S, C)``; unique indices)."""
        add_block(self.plane(image), rows, cols, values)

    def result(self, dtype) -> np.ndarray:
        """The gradient, ``(N, C, H, W)`` in ``dtype``."""
        if self.channels_last:
            return channels_first(self.grad, dtype)
        return self.grad.astype(dtype, copy=False)
