"""Matplotlib drawings of RoI geometry, computed by :mod:`roilib.geometry`.

Every picture in the book comes from here, and every coordinate drawn is taken from
``roilib.geometry`` rather than recomputed, so a figure cannot disagree with the ops.

The book has one pixel convention (see :mod:`roilib.geometry`): map cell ``i`` covers
``[i, i + 1)`` of the scaled box's axis and holds its value at ``i + 1/2``. The axes of
the drawings are *array indices*: cell ``(i, j)`` is drawn as the unit square centred on
``(x, y) = (j, i)``, so its tick label sits under its centre. A point ``u`` of the
book's axis (a box corner ``x1 * s``) is therefore drawn at ``u - 1/2``; the functions
that take boxes or regions say which of the two they expect. Rows grow downwards, as in
an image.

Importing this module sets the book's figure style (:func:`style`): text of at least
10 points on figures at most :data:`MAX_WIDTH` inches wide, so that a figure shown at
the width of the book's text column keeps its text legible. Every RoI operation has one
colour (:data:`METHOD_COLORS`) in every figure.

matplotlib is imported lazily: ``pip install roilib[plot]``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import geometry

#: colours used consistently across the book
COLORS = dict(box="#d62728", bins="#1f77b4", samples="#ff7f0e", lost="#d62728", gained="#2ca02c", grid="#999999")

#: one colour per RoI operation, the same in every chapter
METHOD_COLORS = {
    "RoIPool": "#1f77b4",
    "RoIWarp": "#9467bd",
    "RoIAlign": "#ff7f0e",
    "RoIAlign, aligned": "#8c564b",
}
_METHOD_KEYS = {"pool": "RoIPool", "warp": "RoIWarp", "align": "RoIAlign", "aligned": "RoIAlign, aligned"}

#: widest figure, in inches: at 100 dpi it is shown at (nearly) its natural size in the
#: book's text column, so 10-point text stays about 10 pixels tall or more
MAX_WIDTH = 7.0
#: smallest text on a figure, in points
FONT_SIZE = 10


def method_color(name: str) -> str:
    """The colour of an RoI operation, by label (``"RoIPool"``, ``"RoIAlign, aligned"``,
    ``"RoIWarp, max"``...) or key (``"pool"``, ``"warp"``, ``"align"``, ``"aligned"``).

    A label is matched by its longest known prefix; unknown labels raise ``KeyError``.
    """
    name = _METHOD_KEYS.get(name, name)
    for label in sorted(METHOD_COLORS, key=len, reverse=True):
        if name.startswith(label):
            return METHOD_COLORS[label]
    raise KeyError(f"no colour for {name!r}; known: {sorted(METHOD_COLORS)}")


def style() -> None:
    """Set the book's matplotlib style: legible text, 100 dpi, legends that stay readable."""
    plt = _plt()
    plt.rcParams.update(
        {
            "figure.dpi": 100,
            "font.size": FONT_SIZE + 1,
            "axes.titlesize": FONT_SIZE + 1,
            "axes.labelsize": FONT_SIZE + 1,
            "xtick.labelsize": FONT_SIZE,
            "ytick.labelsize": FONT_SIZE,
            "legend.fontsize": FONT_SIZE,
            "legend.framealpha": 0.9,
            "figure.titlesize": FONT_SIZE + 1,
        }
    )


def _plt():
    import matplotlib.pyplot as plt

    return plt


def feature_grid(ax, height: int, width: int, values: Optional[np.ndarray] = None, fmt: str = "{:g}", cmap: str = "Greys", fontsize: float = FONT_SIZE):
    """Draw an ``height x width`` map as unit cells centred on integer coordinates.

    Parameters
    ----------
    ax : matplotlib Axes
    height, width : int
        Map size in pixels.
    values : ndarray, shape (height, width), optional
        Shown as a faint image with each value printed in its cell.
    fmt : str
        Format of the printed values.
    cmap : str
        Colour map for ``values``.
    fontsize : float
    """
    if values is not None:
        ax.imshow(values, cmap=cmap, alpha=0.35, extent=(-0.5, width - 0.5, height - 0.5, -0.5), interpolation="nearest")
        if height * width <= 400:
            for i in range(height):
                for j in range(width):
                    ax.text(j, i, fmt.format(values[i, j]), ha="center", va="center", fontsize=fontsize, color="#333333")
    for k in range(width + 1):
        ax.plot([k - 0.5, k - 0.5], [-0.5, height - 0.5], color=COLORS["grid"], lw=0.6)
    for k in range(height + 1):
        ax.plot([-0.5, width - 0.5], [k - 0.5, k - 0.5], color=COLORS["grid"], lw=0.6)
    ax.set_xlim(-0.5 - 0.5, width - 0.5 + 0.5)
    ax.set_ylim(height - 0.5 + 0.5, -0.5 - 0.5)
    ax.set_aspect("equal")
    # one label per cell while they fit; every 2nd or 5th on larger maps
    ax.set_xticks(range(0, width, 1 if width <= 8 else 2 if width <= 24 else 5))
    ax.set_yticks(range(0, height, 1 if height <= 8 else 2 if height <= 24 else 5))
    ax.tick_params(labelsize=fontsize)


def rectangle(ax, x_lo: float, y_lo: float, x_hi: float, y_hi: float, fill: bool = False, **style):
    """Draw one axis-aligned rectangle given by its corners (index coordinates)."""
    from matplotlib.patches import Rectangle

    style.setdefault("lw", 1.8)
    ax.add_patch(Rectangle((x_lo, y_lo), x_hi - x_lo, y_hi - y_lo, fill=fill, **style))


def roi_pool_bins(ax, roi: Sequence[float], output_size, spatial_scale: float, height: int, width: int, label_bins: bool = True):
    """The exact box (dashed) and RoIPool's integer bins (filled cells), alternately shaded.

    Bins come from :func:`roilib.geometry.roi_pool_bins`; overlapping cells look darker.
    """
    roi = np.asarray(roi, dtype=np.float64).reshape(1, 5)
    out = (output_size, output_size) if np.isscalar(output_size) else tuple(output_size)
    bins = geometry.roi_pool_bins(roi, out, spatial_scale, height, width)
    palette = ["#1f77b4", "#9467bd"]
    for p in range(out[0]):
        for q in range(out[1]):
            hs, he, ws, we = bins.hstart[0, p], bins.hend[0, p], bins.wstart[0, q], bins.wend[0, q]
            if he > hs and we > ws:
                color = palette[(p + q) % 2]
                rectangle(ax, ws - 0.5, hs - 0.5, we - 0.5, he - 0.5, fill=True, color=color, alpha=0.22, lw=0)
                rectangle(ax, ws - 0.5, hs - 0.5, we - 0.5, he - 0.5, edgecolor=color, lw=1.2)
                if label_bins:
                    ax.text((ws + we - 1) / 2, (hs + he - 1) / 2, f"{p},{q}", ha="center", va="center", fontsize=FONT_SIZE, color=color)
    # the box on the book's axis, drawn in array indices (cell i around i)
    exact = geometry.scale_boxes(roi, spatial_scale)[0] - 0.5
    rectangle(ax, *exact, edgecolor=COLORS["box"], ls="--", lw=1.8)
    return bins


def roi_align_samples(
    ax,
    roi: Sequence[float],
    output_size,
    spatial_scale: float,
    sampling_ratio: int,
    aligned: bool,
    height: int,
    width: int,
    marker_size: float = 12,
):
    """The box as RoIAlign sees it, its bin lines and its bilinear sample points.

    Out-of-range samples (beyond ``[-1, size]``) are drawn hollow. Returns the
    ``(AxisSamples_y, AxisSamples_x)`` pair that was drawn.
    """
    roi = np.asarray(roi, dtype=np.float64).reshape(1, 5)
    out = (output_size, output_size) if np.isscalar(output_size) else tuple(output_size)
    geo = geometry.roi_align_boxes(roi, out, spatial_scale, sampling_ratio, aligned)
    y0, x0, bh, bw = geo.start_y[0], geo.start_x[0], geo.bin_h[0], geo.bin_w[0]
    rectangle(ax, x0, y0, x0 + bw * out[1], y0 + bh * out[0], edgecolor=COLORS["box"], lw=2)
    for p in range(1, out[0]):
        ax.plot([x0, x0 + bw * out[1]], [y0 + p * bh] * 2, color=COLORS["bins"], lw=1)
    for q in range(1, out[1]):
        ax.plot([x0 + q * bw] * 2, [y0, y0 + bh * out[0]], color=COLORS["bins"], lw=1)
    ys = geometry.axis_samples(y0, bh, int(geo.grid_h[0]), out[0], height)
    xs = geometry.axis_samples(x0, bw, int(geo.grid_w[0]), out[1], width)
    yy, xx = np.meshgrid(ys.coord, xs.coord, indexing="ij")
    ok = np.logical_and.outer(ys.valid, xs.valid)
    ax.scatter(xx[ok], yy[ok], s=marker_size, color=COLORS["samples"], zorder=5)
    if (~ok).any():
        ax.scatter(xx[~ok], yy[~ok], s=marker_size, facecolors="none", edgecolors=COLORS["samples"], zorder=5)
    return ys, xs


def bilinear_cell(ax, corners: "geometry.BilinearCorners", fontsize: float = FONT_SIZE):
    """One sample point in its 1x1 cell, split into the four sub-rectangles.

    Each sub-rectangle is labelled with its area; that area is the weight of the corner
    diagonally opposite it.
    """
    y, x = corners.y, corners.x
    yl, yh, xl, xh = corners.y_low, corners.y_high, corners.x_low, corners.x_high
    shades = [["#c6dbef", "#fdd0a2"], ["#c7e9c0", "#dadaeb"]]
    for a, (top, bottom) in enumerate(((yl, y), (y, yh))):
        for b, (left, right) in enumerate(((xl, x), (x, xh))):
            rectangle(ax, left, top, right, bottom, fill=True, color=shades[a][b], lw=0)
            area = (bottom - top) * (right - left)
            ax.text((left + right) / 2, (top + bottom) / 2, f"{area:.2f}", ha="center", va="center", fontsize=fontsize)
    rectangle(ax, xl, yl, xh, yh, edgecolor="black", lw=1.2)
    ax.scatter([x], [y], color=COLORS["samples"], zorder=5, s=30)
    for (cy, cx) in ((yl, xl), (yl, xh), (yh, xl), (yh, xh)):
        ax.scatter([cx], [cy], color="black", s=18, zorder=5)
        ax.annotate(f"({cy}, {cx})", (cx, cy), textcoords="offset points", xytext=(4, -10 if cy == yl else 6), fontsize=fontsize)
    ax.set_xlim(xl - 0.25, xh + 0.45)
    ax.set_ylim(yh + 0.25, yl - 0.25)
    ax.set_aspect("equal")


def lost_and_gained(ax, box: Sequence[float], region: Sequence[float], resolution: int = 400, convention: str = "cell"):
    """Shade the part of ``box`` an op does not read (lost) and what it reads outside (gained).

    Both rectangles are ``[x_lo, y_lo, x_hi, y_hi]`` on the axis of ``convention`` (see
    :func:`roilib.geometry.read_region`); they are drawn in array indices.
    Returns the ``(lost, gained)`` areas from :func:`roilib.geometry.area_lost_and_gained`.
    """
    shift = geometry.CONVENTIONS[convention]
    box, region = np.asarray(box, float) - shift, np.asarray(region, float) - shift
    lo = np.minimum(box[:2], region[:2]) - 0.5
    hi = np.maximum(box[2:], region[2:]) + 0.5
    xs = np.linspace(lo[0], hi[0], resolution)
    ys = np.linspace(lo[1], hi[1], resolution)
    gx, gy = np.meshgrid(xs, ys)

    def inside(r):
        return (gx >= r[0]) & (gx <= r[2]) & (gy >= r[1]) & (gy <= r[3])

    in_box, in_region = inside(box), inside(region)
    layer = np.zeros(gx.shape + (4,))
    for mask, color in ((in_box & ~in_region, COLORS["lost"]), (in_region & ~in_box, COLORS["gained"])):
        from matplotlib.colors import to_rgba

        layer[mask] = to_rgba(color, 0.45)
    ax.imshow(layer, extent=(lo[0], hi[0], hi[1], lo[1]), interpolation="nearest", zorder=3)
    rectangle(ax, *box, edgecolor=COLORS["box"], ls="--", lw=1.6, zorder=4)
    rectangle(ax, *region, edgecolor="black", lw=1.2, zorder=4)
    lost, gained = geometry.area_lost_and_gained(box[None], region[None])
    return float(lost[0]), float(gained[0])


def spp_pyramid(axes, height: int, width: int, levels=(4, 2, 1)):
    """One panel per pyramid level: the map with that level's bins (appendix rule)."""
    palette = ["#1f77b4", "#9467bd"]
    for ax, n in zip(axes, levels):
        feature_grid(ax, height, width)
        rows, cols = geometry.spp_bins(height, n), geometry.spp_bins(width, n)
        for p in range(n):
            for q in range(n):
                color = palette[(p + q) % 2]
                x_lo, x_hi = cols[0][q] - 0.5, cols[1][q] - 0.5
                y_lo, y_hi = rows[0][p] - 0.5, rows[1][p] - 0.5
                rectangle(ax, x_lo, y_lo, x_hi, y_hi, fill=True, color=color, alpha=0.2, lw=0)
                rectangle(ax, x_lo, y_lo, x_hi, y_hi, edgecolor=color, lw=1.2)
        ax.set_title(f"{n} x {n}")


def figure(ncols: int = 1, nrows: int = 1, size: float = 3.6, height: Optional[float] = None):
    """A figure with ``nrows x ncols`` square-ish panels (returns ``fig, axes``).

    The width is capped at :data:`MAX_WIDTH` (panels shrink to fit); ``height`` sets the
    height of one panel row (default: the panel width).
    """
    plt = _plt()
    size = min(size, MAX_WIDTH / ncols)
    row = size if height is None else height
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, row * nrows), squeeze=False)
    return fig, axes.ravel()


def wide(height: float, nrows: int = 1, ncols: int = 1):
    """A figure of the full :data:`MAX_WIDTH` and ``height`` inches (returns ``fig, axes``)."""
    plt = _plt()
    fig, axes = plt.subplots(nrows, ncols, figsize=(MAX_WIDTH, height), squeeze=False)
    return fig, axes.ravel()


def interpolation_profile(ax, values: Sequence[float], lo: Optional[float] = None, hi: Optional[float] = None, num: int = 721, fontsize: float = FONT_SIZE):
    """RoIAlign's 1-D interpolant of one row of pixel values, with its edge rules.

    The row is treated as a ``1 x W`` map (drawn in array indices: pixel ``i`` at ``i``) and read at ``num`` points of ``[lo, hi]``
    (default: from 2.5 pixels before the first to 1.5 after the last) with
    :func:`roilib.geometry.bilinear_corners`, so the curve follows the ops exactly:
    linear between neighbouring pixels, constant (clamped) on ``[-1, 0]`` and
    ``[W - 1, W]``, and 0 beyond ``[-1, W]``, where a sample is out of range. The clamped
    zones are shaded green, the out-of-range ones red; pixel values are black dots at
    their integer coordinates.

    Returns
    -------
    x, f : ndarray
        The evaluation points and the interpolated values.
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    w = values.size
    lo = -2.5 if lo is None else float(lo)
    hi = w + 1.5 if hi is None else float(hi)
    plane = values[None, :]
    x = np.linspace(lo, hi, num)
    corners = [geometry.bilinear_corners(0.0, float(xi), 1, w) for xi in x]
    f = np.array([c.interpolate(plane) for c in corners])
    valid = np.array([c.valid for c in corners])
    ax.axvspan(lo, -1, color=COLORS["lost"], alpha=0.10, lw=0)
    ax.axvspan(w, hi, color=COLORS["lost"], alpha=0.10, lw=0)
    ax.axvspan(-1, 0, color=COLORS["gained"], alpha=0.12, lw=0)
    ax.axvspan(w - 1, w, color=COLORS["gained"], alpha=0.12, lw=0)
    inside = np.where(valid, f, np.nan)
    outside = np.where(valid, np.nan, f)
    ax.plot(x, inside, color=COLORS["bins"], lw=1.8)
    ax.plot(x, outside, color=COLORS["lost"], lw=1.8)
    ax.scatter(np.arange(w), values, color="black", s=18, zorder=5)
    ax.axhline(0, color=COLORS["grid"], lw=0.6)
    ax.set_xlim(lo, hi)
    ax.set_xticks(range(int(np.ceil(lo)), int(np.floor(hi)) + 1))
    ax.tick_params(labelsize=fontsize)
    ax.set_xlabel("x (array index: pixel i's value at i)", fontsize=fontsize)
    return x, f


def samples_at_fractions(
    ax,
    roi: Sequence[float],
    output_size,
    spatial_scale: float,
    fractions: Sequence[float],
    aligned: bool,
    marker: str = "x",
    marker_size: float = 30,
    color: Optional[str] = None,
    draw_box: bool = True,
):
    """Sample points placed at chosen fractions of every RoIAlign bin.

    The box and its bins are RoIAlign's (:func:`roilib.geometry.roi_align_boxes`); only
    the place of the samples inside a bin changes: ``start + (p + f) * bin`` for each
    ``f`` in ``fractions``, on both axes. ``fractions=(1/3, 2/3)`` gives the placement
    some tutorials describe; ``((i + 0.5) / g for i in range(g))`` gives the same points
    as :func:`roi_align_samples`. Meant to be overlaid on that drawing.

    Returns
    -------
    y, x : ndarray
        The sample coordinates along each axis (index coordinates).
    """
    roi = np.asarray(roi, dtype=np.float64).reshape(1, 5)
    out = (output_size, output_size) if np.isscalar(output_size) else tuple(output_size)
    geo = geometry.roi_align_boxes(roi, out, spatial_scale, 1, aligned)
    y0, x0, bh, bw = geo.start_y[0], geo.start_x[0], geo.bin_h[0], geo.bin_w[0]
    f = np.asarray(fractions, dtype=np.float64)
    ys = y0 + (np.arange(out[0])[:, None] + f[None, :]).ravel() * bh
    xs = x0 + (np.arange(out[1])[:, None] + f[None, :]).ravel() * bw
    if draw_box:
        rectangle(ax, x0, y0, x0 + bw * out[1], y0 + bh * out[0], edgecolor=COLORS["box"], lw=2)
        for p in range(1, out[0]):
            ax.plot([x0, x0 + bw * out[1]], [y0 + p * bh] * 2, color=COLORS["bins"], lw=1)
        for q in range(1, out[1]):
            ax.plot([x0 + q * bw] * 2, [y0, y0 + bh * out[0]], color=COLORS["bins"], lw=1)
    yy, xx = np.meshgrid(ys, xs, indexing="ij")
    kwargs = dict(s=marker_size, zorder=6, marker=marker, color=color or "black")
    if marker in ("x", "+", "1", "2", "3", "4", "|", "_"):
        kwargs["linewidths"] = 1.2
    ax.scatter(xx.ravel(), yy.ravel(), **kwargs)
    return ys, xs


def shift_response(ax, shifts: Sequence[float], curves: dict, xlabel: str = "shift of the box (feature-map pixels)", ylabel: str = "output value", fontsize: float = FONT_SIZE):
    """Output of one or more ops against a box shift, one line with markers per op.

    ``curves`` maps a label to the values at ``shifts`` (for example one output cell of
    :func:`roilib.roi_pool` and :func:`roilib.roi_align` for a box slid in small steps).
    Integer shifts get vertical grid lines.
    """
    shifts = np.asarray(shifts, dtype=np.float64)
    styles = [dict(color=COLORS["box"], marker="s", ms=3), dict(color=COLORS["bins"], marker="o", ms=3), dict(color=COLORS["gained"], marker="^", ms=3)]
    used = set()
    for k, (label, values) in enumerate(curves.items()):
        style_k = dict(styles[k % len(styles)])
        try:  # an RoI operation keeps its colour; a second curve of it is dashed
            style_k["color"] = method_color(label)
        except KeyError:
            pass
        if style_k["color"] in used:
            style_k["ls"] = "--"
        used.add(style_k["color"])
        ax.plot(shifts, np.asarray(values, dtype=np.float64), label=label, lw=1.2, **style_k)
    for t in range(int(np.ceil(shifts.min())), int(np.floor(shifts.max())) + 1):
        ax.axvline(t, color=COLORS["grid"], lw=0.6, zorder=0)
    ax.set_xlabel(xlabel, fontsize=fontsize)
    ax.set_ylabel(ylabel, fontsize=fontsize)
    ax.tick_params(labelsize=fontsize)
    ax.legend(fontsize=fontsize, loc="best")


def axis_bins(ax, start, end, length: int, box: Optional[Sequence[float]] = None, title: Optional[str] = None, color: str = COLORS["bins"]):
    """Pooling intervals along one axis, one lane per bin, under a strip of the axis' cells.

    Row 0 shows the ``length`` cells of the axis (pixel ``i`` is the cell around ``i``);
    bin ``k``'s pixel range ``[start[k], end[k])`` is a bar in row ``k + 1``, so bins
    that overlap are visible. Cells that no bin covers are shaded in the strip; ``box``
    (``(lo, hi)`` on the book's axis, where cell ``i`` is ``[i, i + 1)``) draws an exact
    box's extent as a dashed line.
    ``start``/``end`` come from :func:`roilib.geometry.spp_bins`,
    :func:`roilib.geometry.spp_training_windows` or a ``PoolBins`` row.

    Returns
    -------
    ndarray of int64
        The pixels of the axis that no bin covers.
    """
    start, end = np.asarray(start, dtype=np.int64), np.asarray(end, dtype=np.int64)
    covered = np.zeros(length, dtype=bool)
    for s, e in zip(start, end):
        covered[max(s, 0):max(min(e, length), 0)] = True
    for i in range(length):
        shade = dict(fill=True, color="#f0f0f0", lw=0) if covered[i] else dict(fill=True, color=COLORS["lost"], alpha=0.35, lw=0)
        rectangle(ax, i - 0.5, -0.4, i + 0.5, 0.4, **shade)
        rectangle(ax, i - 0.5, -0.4, i + 0.5, 0.4, edgecolor=COLORS["grid"], lw=0.6)
        ax.text(i, 0, str(i), ha="center", va="center", fontsize=FONT_SIZE, color="#333333")
    for k, (s, e) in enumerate(zip(start, end)):
        if e > s:
            rectangle(ax, s - 0.5, k + 0.7, e - 0.5, k + 1.3, fill=True, color=color, alpha=0.35, lw=0)
            rectangle(ax, s - 0.5, k + 0.7, e - 0.5, k + 1.3, edgecolor=color, lw=1.0)
    if box is not None:
        box = (box[0] - 0.5, box[1] - 0.5)  # drawn in array indices
        ax.plot([box[0], box[1]], [-0.55, -0.55], color=COLORS["box"], ls="--", lw=1.6)
        for x in box:
            ax.plot([x, x], [-0.7, len(start) + 0.5], color=COLORS["box"], ls="--", lw=0.8)
    ax.set_xlim(-1.0, length)
    ax.set_ylim(len(start) + 0.6, -0.9)
    ax.set_yticks([0] + list(range(1, len(start) + 1)))
    ax.set_yticklabels(["pixel"] + [f"bin {k}" for k in range(len(start))], fontsize=FONT_SIZE)
    ax.set_xticks([])
    for side in ("top", "right", "bottom"):
        ax.spines[side].set_visible(False)
    if title:
        ax.set_title(title, fontsize=FONT_SIZE)
    return np.flatnonzero(~covered)


def sample_strips(
    ax,
    rows: dict,
    edges: Optional[Sequence[float]] = None,
    size: Optional[int] = None,
    marker_size: float = 22,
    fontsize: float = FONT_SIZE,
):
    """Where several resamplers read along one axis: one labelled row of points each.

    Meant for comparing samplers that should agree (RoIAlign's sample points from
    :func:`roilib.geometry.axis_samples` against the points a ``grid_sample`` grid or a
    ``crop_and_resize`` box reads), so a shift or a stretch of half a pixel is visible.

    Parameters
    ----------
    ax : matplotlib Axes
    rows : dict
        Label -> 1-D sample coordinates in index coordinates of the map (pixel ``i``'s
        value at ``i``). Drawn top to bottom in the dict's order.
    edges : sequence of float, optional
        Bin edges along the axis, box edges included (for example
        ``start + bin * arange(P + 1)`` from :func:`roilib.geometry.roi_align_boxes`):
        the first and last are drawn as the box (dashed), the others as bin lines.
    size : int, optional
        Map length along the axis: pixel positions ``0 .. size - 1`` get grid lines, and
        the parts of the axis beyond the first and last pixel are shaded.
    marker_size, fontsize : float
    """
    labels = list(rows)
    n = len(labels)
    coords = [np.asarray(rows[k], dtype=np.float64).ravel() for k in labels]
    lo = min([c.min() for c in coords if c.size] + ([edges[0]] if edges is not None else []))
    hi = max([c.max() for c in coords if c.size] + ([edges[-1]] if edges is not None else []))
    lo, hi = np.floor(lo) - 0.75, np.ceil(hi) + 0.75
    if size is not None:
        for t in range(int(np.ceil(lo)), int(np.floor(hi)) + 1):
            if 0 <= t <= size - 1:
                ax.axvline(t, color=COLORS["grid"], lw=0.5, zorder=0)
        if lo < 0:
            ax.axvspan(lo, 0, color=COLORS["lost"], alpha=0.08, lw=0)
        if hi > size - 1:
            ax.axvspan(size - 1, hi, color=COLORS["lost"], alpha=0.08, lw=0)
    if edges is not None:
        edges = np.asarray(edges, dtype=np.float64)
        for k, e in enumerate(edges):
            outer = k in (0, len(edges) - 1)
            ax.axvline(e, color=COLORS["box"] if outer else COLORS["bins"], ls="--" if outer else "-", lw=1.4 if outer else 0.8, zorder=1)
    palette = [COLORS["samples"], COLORS["bins"], COLORS["gained"], "#9467bd", "#8c564b", "#e377c2"]
    for k, c in enumerate(coords):
        ax.scatter(c, np.full(c.shape, n - 1 - k), s=marker_size, color=palette[k % len(palette)], zorder=5)
    ax.set_yticks(range(n))
    ax.set_yticklabels(labels[::-1], fontsize=fontsize)
    ax.set_ylim(-0.7, n - 0.3)
    ax.set_xlim(lo, hi)
    ax.tick_params(axis="x", labelsize=fontsize)
    ax.set_xlabel("x (array index: pixel i's value at i)", fontsize=fontsize)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def box_edge_sweep(
    axes,
    input: np.ndarray,
    roi: Sequence[float],
    grad_output: np.ndarray,
    output_size,
    edge: str,
    values: Sequence[float],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    mode: str = "avg",
    fontsize: float = FONT_SIZE,
    legend: bool = True,
):
    """A loss ``L = sum(roi_align(input, box) * grad_output)`` as one box edge slides, and dL/d(edge).

    The box ``roi`` (one row ``[batch_index, x1, y1, x2, y2]``, image pixels) gets its
    ``edge`` coordinate (``"x1"``, ``"y1"``, ``"x2"`` or ``"y2"``) set to each of ``values``
    (increasing) in turn. ``axes`` is a pair ``(ax_loss, ax_grad)``:

    * ``ax_loss``: ``L`` from :func:`roilib.roi_align`;
    * ``ax_grad``: the analytic derivative from :func:`roilib.roi_align_rois_backward`
      (line) and the finite-difference slope between neighbouring steps (dots), left out
      across a jump of ``L``.

    Both panels mark the events found between neighbouring steps with
    :mod:`roilib.geometry`: red dashed lines where ``L`` jumps (the number of samples per
    bin changes, or a sample enters or leaves the range ``[-1, size]``), grey dotted
    lines where it has a kink (a sample moving with the edge crosses a whole coordinate of
    the map, so its pair of neighbouring pixels changes, or it starts or stops being
    clamped at the map's edge, or the box size starts or stops being raised to 1). In ``mode="max"`` a change of winning sample is not marked.

    Returns
    -------
    dict
        ``values``, ``loss``, ``grad`` (one per value); ``slope`` (finite differences,
        NaN across a jump) at ``midpoints``; ``jumps`` and ``kinks``: the midpoints of the
        steps where those events happen.
    """
    from . import roi_align, roi_align_rois_backward

    column = {"x1": 1, "y1": 2, "x2": 3, "y2": 4}[edge]
    axis = 1 if edge[0] == "x" else 0
    values = np.asarray(values, dtype=np.float64)
    base = np.asarray(roi, dtype=np.float64).reshape(1, 5)
    out = (output_size, output_size) if np.isscalar(output_size) else tuple(output_size)
    size = input.shape[2 + axis]
    grad_output = np.asarray(grad_output, dtype=input.dtype)
    loss, grad, states = [], [], []
    for v in values:
        r = base.copy()
        r[0, column] = v
        r = r.astype(input.dtype)
        kw = dict(spatial_scale=spatial_scale, sampling_ratio=sampling_ratio, aligned=aligned, mode=mode)
        loss.append(float((roi_align(input, r, out, **kw).astype(np.float64) * grad_output).sum()))
        grad.append(float(roi_align_rois_backward(grad_output, input, r, out, **kw)[0, column]))
        geo = geometry.roi_align_boxes(r, out, spatial_scale, sampling_ratio, aligned, input.dtype)
        start, bin_size, grid = (geo.start_x, geo.bin_w, geo.grid_w) if axis else (geo.start_y, geo.bin_h, geo.grid_h)
        smp = geometry.axis_samples(start[0], bin_size[0], int(grid[0]), out[axis], size, input.dtype)
        clamped = (geo.clamped_w if axis else geo.clamped_h)[0]
        states.append((int(grid[0]), smp.valid, smp.low, smp.slope, clamped))
    loss, grad = np.array(loss), np.array(grad)
    mid = (values[1:] + values[:-1]) / 2
    jump = np.zeros(mid.size, dtype=bool)
    kink = np.zeros(mid.size, dtype=bool)
    for t, (a, b) in enumerate(zip(states[:-1], states[1:])):
        if a[0] != b[0] or not np.array_equal(a[1], b[1]):
            jump[t] = True
        elif not (np.array_equal(a[2], b[2]) and np.array_equal(a[3], b[3]) and a[4] == b[4]):
            kink[t] = True
    slope = np.diff(loss) / np.diff(values)
    slope[jump] = np.nan
    ax_loss, ax_grad = axes
    ax_loss.plot(values, loss, color=COLORS["bins"], lw=1.5)
    ax_grad.plot(values, grad, color=COLORS["bins"], lw=1.5, label="roi_align_rois_backward")
    ax_grad.scatter(mid, slope, s=4, color=COLORS["samples"], zorder=4, label="finite differences")
    for ax in axes:
        for m in mid[jump]:
            ax.axvline(m, color=COLORS["lost"], ls="--", lw=1.0, zorder=0)
        for m in mid[kink]:
            ax.axvline(m, color=COLORS["grid"], ls=":", lw=1.0, zorder=0)
        ax.tick_params(labelsize=fontsize)
    ax_loss.set_ylabel("L", fontsize=fontsize)
    ax_grad.set_ylabel(f"dL / d{edge}", fontsize=fontsize)
    ax_grad.set_xlabel(f"{edge} (image pixels)", fontsize=fontsize)
    if legend:  # callers drawing several sweeps put one legend under the figure instead
        ax_grad.legend(fontsize=fontsize)
    return dict(values=values, loss=loss, grad=grad, midpoints=mid, slope=slope, jumps=mid[jump], kinks=mid[kink])


def grid_stride_launch(ax, n: int, block: int, blocks: int, y: float = 0.0, label: Optional[str] = None, fontsize: float = FONT_SIZE):
    """Which thread of a launch handles which work item of a grid-stride loop.

    The kernels loop ``for (i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += blockDim.x * gridDim.x)``:
    with ``T = block * blocks`` threads, item ``i`` goes to global thread ``i % T`` (block
    ``(i % T) // block``) in pass ``i // T`` of the loop. Draws the items ``0 .. n-1`` as a
    strip of cells at height ``y``, coloured by block and labelled with the global thread
    id, with the passes of the loop marked underneath. Call it once per launch to compare
    launches on one axes (``y`` = 0, -1.6, ...).

    Parameters
    ----------
    ax : matplotlib Axes
    n : int
        Number of work items.
    block, blocks : int
        Threads per block (``blockDim.x``) and blocks (``gridDim.x``).
    y : float
        Bottom of the strip.
    label : str, optional
        Text left of the strip (default: the launch shape).
    fontsize : float

    Returns
    -------
    dict
        ``thread``, ``block`` and ``pass_`` (ndarray of int, one entry per item).
    """
    from matplotlib.patches import Rectangle

    total = block * blocks
    items = np.arange(n)
    thread = items % total
    block_of = thread // block
    pass_ = items // total
    palette = [COLORS["bins"], COLORS["samples"], COLORS["gained"], "#9467bd", "#8c564b", "#e377c2"]
    for i in items:
        ax.add_patch(Rectangle((i, y), 1, 0.8, facecolor=palette[block_of[i] % len(palette)], alpha=0.35,
                               edgecolor="#333333", lw=0.6))
        ax.text(i + 0.5, y + 0.4, str(thread[i]), ha="center", va="center", fontsize=fontsize)
    for p in range(int(pass_.max()) + 1 if n else 0):
        lo, hi = p * total, min((p + 1) * total, n)
        ax.plot([lo + 0.1, hi - 0.1], [y - 0.12, y - 0.12], color="#333333", lw=1.0)
        text = f"pass {p}" if hi - lo >= 3 else str(p)
        ax.text((lo + hi) / 2, y - 0.22, text, ha="center", va="top", fontsize=fontsize)
    ax.text(-0.4, y + 0.4, label if label is not None else f"{blocks} x {block} threads", ha="right", va="center",
            fontsize=fontsize)
    ax.set_xlim(-0.2, n + 0.2)
    if 0 < n <= 40:
        ax.set_xticks(items + 0.5)
        ax.set_xticklabels([str(i) for i in items])
    ax.set_yticks([])
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    ax.tick_params(axis="x", labelsize=fontsize)
    return dict(thread=thread, block=block_of, pass_=pass_)


def read_regions(
    ax,
    values: np.ndarray,
    roi: Sequence[float],
    spatial_scale: float,
    methods: Sequence[str] = ("pool", "warp", "aligned"),
    truth: Optional[Sequence[float]] = None,
    cmap: str = "gray",
    fontsize: float = FONT_SIZE,
):
    """A map with one proposal, the part of the map each RoI op reads for it, and the true box.

    The map is drawn as an image in array indices (cell ``(i, j)`` centred at ``(j, i)``).
    The regions are :func:`roilib.geometry.read_region`'s, clipped to the map, in the
    book's convention: RoIPool's whole cells (shaded), RoIWarp's samples between the
    rounded corners (dotted), RoIAlign's bins with ``aligned=False`` (dash-dotted) and
    with ``aligned=True`` (solid; this is exactly the proposal). ``truth`` (dashed) is
    drawn where the proposal's own coordinates put it. With ``spatial_scale=1`` and
    ``methods=("aligned",)`` it shows the proposal on an image. The outlines carry
    labels, so ``ax.legend()`` explains them; each op has its :data:`METHOD_COLORS`.

    Parameters
    ----------
    ax : matplotlib Axes
    values : ndarray, shape (H, W)
    roi : sequence of 4 or 5 floats
        The proposal ``[x1, y1, x2, y2]`` (or ``[batch_index, x1, y1, x2, y2]``) in image pixels.
    spatial_scale : float
    methods : sequence of {"pool", "warp", "align", "aligned"}
    truth : sequence of 4 floats, optional
        The true box ``[x1, y1, x2, y2]`` in image pixels.
    cmap : str
    fontsize : float

    Returns
    -------
    dict
        The drawn rectangles ``[x_lo, y_lo, x_hi, y_hi]`` in array indices, by method
        (and ``"truth"``).
    """
    values = np.asarray(values)
    h, w = values.shape
    ax.imshow(values, cmap=cmap, extent=(-0.5, w - 0.5, h - 0.5, -0.5), interpolation="nearest")
    roi = np.asarray(roi, dtype=np.float64).ravel()
    roi = np.concatenate([[0.0], roi]) if roi.size == 4 else roi
    rois = roi.reshape(1, 5)
    drawn = {}
    styles = dict(
        pool=dict(lw=1.6, label="RoIPool's cells"),
        warp=dict(lw=1.8, ls=":", label="RoIWarp's samples"),
        align=dict(lw=1.8, ls="-.", label="RoIAlign's bins"),
        aligned=dict(lw=1.8, label="RoIAlign's bins, aligned"),
    )
    for method in methods:
        # array indices are the "index" convention's axis: pixel i's value at i
        region = geometry.read_region(rois, spatial_scale, method, height=h, width=w, convention="index")[0]
        color = method_color(method)
        if method == "pool":
            rectangle(ax, *region, fill=True, color=color, alpha=0.25, lw=0)
        rectangle(ax, *region, edgecolor=color, **styles[method])
        drawn[method] = region
    if truth is not None:
        region = geometry.scale_boxes(np.concatenate([[0.0], np.asarray(truth, np.float64)])[None], spatial_scale)[0] - 0.5
        rectangle(ax, *region, edgecolor=COLORS["box"], ls="--", lw=1.6, label="true box")
        drawn["truth"] = region
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.tick_params(labelsize=fontsize)
    return drawn


def grouped_bars(
    ax,
    groups: Sequence[str],
    series: dict,
    ylabel: str,
    fmt: str = "{:.1f}",
    baseline: Optional[float] = None,
    baseline_label: str = "",
    colors: Optional[Sequence[str]] = None,
    fontsize: float = FONT_SIZE,
):
    """Bars for results: one group per entry of ``groups``, one bar per series, values printed.

    Parameters
    ----------
    ax : matplotlib Axes
    groups : sequence of str
        Group labels along the x axis (for example the strides).
    series : dict
        ``label -> values``, one value per group, drawn left to right in this order.
    ylabel : str
    fmt : str
        Format of the value printed above each bar.
    baseline : float, optional
        A horizontal dashed reference line (for example the error before refinement).
    baseline_label : str
    colors : sequence of str, optional
        One colour per series (default: an RoI operation's :data:`METHOD_COLORS`).
    fontsize : float
    """
    if colors is None:
        colors = [method_color(label) for label in series]
    colors = list(colors)
    n = len(series)
    width = 0.8 / n
    x = np.arange(len(groups), dtype=np.float64)
    for k, (label, values) in enumerate(series.items()):
        pos = x - 0.4 + (k + 0.5) * width
        values = np.asarray(values, dtype=np.float64)
        ax.bar(pos, values, width * 0.92, label=label, color=colors[k % len(colors)])
        for p, v in zip(pos, values):
            ax.text(p, v, fmt.format(v), ha="center", va="bottom", fontsize=fontsize)
    if baseline is not None:
        ax.axhline(baseline, color="black", ls="--", lw=1, label=baseline_label or None)
    ax.set_xticks(x)
    ax.set_xticklabels(groups, fontsize=fontsize)
    ax.set_ylabel(ylabel, fontsize=fontsize)
    ax.tick_params(labelsize=fontsize)
    ax.legend(fontsize=fontsize)



def detector_pipeline(ax, op: str = "RoIAlign", stride: int = 32, output_size: int = 7):
    """The two-stage detector as a diagram: image, backbone, proposals, RoI op, head.

    Shapes are written on the arrows (``(N, C, H, W)`` maps, ``(K, 5)`` boxes,
    ``(K, C, P, P)`` RoI features); the RoI operation's box has its
    :data:`METHOD_COLORS` colour.

    Parameters
    ----------
    ax : matplotlib Axes
    op : str
        The RoI operation named in the diagram (a :data:`METHOD_COLORS` label).
    stride : int
        The backbone's stride, written under it.
    output_size : int
        ``P``.
    """
    from matplotlib.patches import FancyBboxPatch

    def block(x, y, w, h, text, color, text_color="black"):
        ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=color, edgecolor="#333333", lw=1.0))
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", color=text_color)

    def arrow(x0, y0, x1, y1, label=None, dy=0.12):
        ax.annotate("", (x1, y1), (x0, y0), arrowprops=dict(arrowstyle="->", lw=1.3, color="#333333"))
        if label:
            ax.text((x0 + x1) / 2, (y0 + y1) / 2 + dy, label, ha="center", va="bottom")

    block(0.0, 1.6, 1.5, 0.9, "image", "#f0f0f0")
    block(2.3, 1.6, 1.7, 0.9, f"backbone\nstride {stride}", "#dadaeb")
    block(2.3, 0.0, 1.7, 0.9, "proposals\n(RPN)", "#dadaeb")
    block(4.9, 0.8, 1.7, 0.9, op, method_color(op), "white")
    block(8.3, 0.8, 1.5, 0.9, "head", "#dadaeb")
    arrow(1.5, 2.05, 2.3, 2.05)
    arrow(4.0, 2.05, 5.75, 1.7, "(N, C, H, W)", dy=0.15)
    arrow(3.15, 1.6, 3.15, 0.9)
    arrow(4.0, 0.45, 5.75, 0.8, "(K, 5) boxes", dy=-0.5)
    arrow(6.6, 1.25, 8.3, 1.25, f"(K, C, {output_size}, {output_size})", dy=0.12)
    ax.text(9.05, 0.55, "classes, boxes,\nmasks", ha="center", va="top")
    ax.set_xlim(-0.1, 9.9)
    ax.set_ylim(-0.2, 2.7)
    ax.set_aspect("equal")
    ax.axis("off")


try:  # the book's style whenever matplotlib is there (the module itself needs it lazily)
    style()
except ImportError:  # pragma: no cover - roilib without the plot extra
    pass

    ax.legend(fontsize=fontsize - 1)


# -- rotated RoIAlign and Precise RoI Pooling (issue 12) -------------------------------


def rotated_box_samples(
    ax,
    roi: Sequence[float],
    output_size,
    spatial_scale: float,
    sampling_ratio: int,
    height: int,
    width: int,
    aligned: bool = True,
    marker_size: float = 12,
    color: Optional[str] = None,
):
    """A rotated box as ``roi_align_rotated`` sees it: outline, bin lines and samples.

    Everything comes from :mod:`roilib.geometry_rotated`; out-of-range samples are drawn
    hollow, and the box's first bin row is marked with a thicker edge (the ``ph = 0``
    side) so that the rotation's direction can be read off. Returns the
    ``RotatedSamples`` drawn.
    """
    from matplotlib.patches import Polygon

    from . import geometry_rotated as gr

    roi = np.asarray(roi, dtype=np.float64).reshape(1, 6)
    out = (output_size, output_size) if np.isscalar(output_size) else tuple(output_size)
    boxes = gr.roi_align_rotated_boxes(roi, out, spatial_scale, sampling_ratio, aligned)
    color = color or COLORS["box"]
    corners = gr.rotated_corners(roi[0], spatial_scale, aligned)
    ax.add_patch(Polygon(corners, closed=True, fill=False, edgecolor=color, lw=2))
    ax.plot(corners[:2, 0], corners[:2, 1], color=color, lw=4)
    hh, hw = boxes.height[0] / 2, boxes.width[0] / 2
    for p in range(1, out[0]):
        yy = -hh + p * boxes.bin_h[0]
        y, x = gr.box_to_map(boxes, 0, np.array([yy, yy]), np.array([-hw, hw]))
        ax.plot(x, y, color=COLORS["bins"], lw=1)
    for q in range(1, out[1]):
        xx = -hw + q * boxes.bin_w[0]
        y, x = gr.box_to_map(boxes, 0, np.array([-hh, hh]), np.array([xx, xx]))
        ax.plot(x, y, color=COLORS["bins"], lw=1)
    samples = gr.rotated_samples(boxes, 0, out, height, width)
    inside = samples.valid
    ax.scatter(samples.x[inside], samples.y[inside], s=marker_size, color=COLORS["samples"], zorder=5)
    if (~inside).any():
        ax.scatter(samples.x[~inside], samples.y[~inside], s=marker_size, facecolors="none",
                   edgecolors=COLORS["samples"], zorder=5)  # fmt: skip
    return samples


def prroi_profile(ax, values: Sequence[float], lo: float, hi: float, n_samples: Sequence[int] = (), num: int = 801, fontsize: float = 8):
    """PrRoIPool's 1-D interpolant of a row, the integral over ``[lo, hi]`` and midpoint sums.

    The interpolant (pixel ``i`` at ``i``, 0 beyond one cell outside) is drawn from
    :func:`roilib.geometry_prroi.hat`; the area under it between ``lo`` and ``hi`` is
    shaded (its mean is PrRoIPool's output for a one-row map); for each ``n`` in
    ``n_samples`` the ``n`` midpoint samples RoIAlign would take are drawn with their
    rectangles, whose total area is RoIAlign's approximation of the same integral.
    Returns ``(exact mean, {n: sampled mean})``.
    """
    from . import geometry_prroi as gp

    values = np.asarray(values, dtype=np.float64)
    j = np.arange(values.size)

    def f(t):
        return (values[None, :] * gp.hat(np.asarray(t, dtype=np.float64)[:, None] - j[None, :])).sum(axis=1)

    t = np.linspace(-1.5, values.size + 0.5, num)
    ax.plot(t, f(t), color="#333333", lw=1.5)
    ax.scatter(j, values, color="#333333", s=14, zorder=5)
    span = np.linspace(lo, hi, 200)
    ax.fill_between(span, 0, f(span), color=COLORS["bins"], alpha=0.25, lw=0)
    exact = float((values * gp.hat_integral(np.full(values.size, lo), np.full(values.size, hi), j)).sum() / (hi - lo))
    sampled = {}
    palette = [COLORS["samples"], COLORS["gained"], COLORS["box"]]
    for m, n in enumerate(n_samples):
        centres = lo + (np.arange(n) + 0.5) * (hi - lo) / n
        heights = f(centres)
        sampled[n] = float(heights.mean())
        color = palette[m % len(palette)]
        edges = lo + np.arange(n + 1) * (hi - lo) / n
        ax.step(np.r_[edges[:-1], edges[-1]], np.r_[heights, heights[-1]], where="post", color=color, lw=1)
        ax.scatter(centres, heights, color=color, s=12, zorder=6, label=f"{n} samples: mean {sampled[n]:.3f}")
    ax.axvline(lo, color=COLORS["box"], ls="--", lw=1)
    ax.axvline(hi, color=COLORS["box"], ls="--", lw=1)
    ax.set_xlabel("x (pixel i at x = i)", fontsize=fontsize)
    ax.tick_params(labelsize=fontsize)
    if n_samples:
        ax.legend(fontsize=fontsize - 1, loc="upper right", title=f"exact mean {exact:.3f}", title_fontsize=fontsize - 1)
    return exact, sampled


def error_vs_sampling_ratio(ax, ratios: Sequence[int], errors: dict, slope: float = -2.0, fontsize: float = 8):
    """Log-log plot of error curves against the sampling ratio, with a reference slope.

    ``errors`` maps a label to one error per ratio; the dashed line has the given slope
    through the first point of the first curve.
    """
    ratios = np.asarray(ratios, dtype=np.float64)
    for label, err in errors.items():
        ax.loglog(ratios, err, marker="o", ms=4, lw=1.2, label=label)
    first = np.asarray(next(iter(errors.values())), dtype=np.float64)[0]
    ax.loglog(ratios, first * (ratios / ratios[0]) ** slope, ls="--", color=COLORS["grid"], lw=1,
              label=f"slope {slope:g}")  # fmt: skip
    ax.set_xlabel("sampling_ratio n (n x n samples per bin)", fontsize=fontsize)
    ax.set_ylabel("max |roi_align - prroi_pool|", fontsize=fontsize)
    ax.set_xticks(ratios)
    ax.set_xticklabels([f"{r:g}" for r in ratios])
    ax.tick_params(labelsize=fontsize)
    ax.legend(fontsize=fontsize - 1)


def box_path(ax, boxes: Sequence[Sequence[float]], color: Optional[str] = None, every: int = 1, lw: float = 1.4):
    """A sequence of ``[x1, y1, x2, y2]`` boxes (index coordinates), fading from first to last.

    The first box is dashed, the last solid and opaque; every ``every``-th box between
    them is drawn faintly.
    """
    boxes = np.asarray(boxes, dtype=np.float64)
    color = color or COLORS["box"]
    n = len(boxes)
    for i in range(0, n, max(every, 1)):
        if 0 < i < n - 1:
            rectangle(ax, *boxes[i], edgecolor=color, lw=0.7, alpha=0.15 + 0.5 * i / n)
    rectangle(ax, *boxes[0], edgecolor=color, lw=lw, ls="--")
    rectangle(ax, *boxes[-1], edgecolor=color, lw=lw + 0.6)

# -- FPN levels and position-sensitive bins (issue 11; geometry from roilib.family) ----


def fpn_level_bands(
    ax,
    k_min: int,
    k_max: int,
    sides: Optional[Sequence[float]] = None,
    canonical_scale: float = 224,
    canonical_level: int = 4,
    size_range=(8.0, 1024.0),
    fontsize: float = 8,
):
    """Box size ``sqrt(w h)`` on a log axis, shaded by the FPN level it maps to.

    Band edges are :func:`roilib.family.level_boundaries`; ``sides`` (optional box
    sizes) are drawn as points at the level :func:`roilib.family.fpn_levels` gives them.
    Returns the boundaries drawn.
    """
    from . import family

    edges = family.level_boundaries(k_min, k_max, canonical_scale, canonical_level)
    lo, hi = size_range
    cuts = [lo] + [float(e) for e in edges] + [hi]
    palette = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
    for i, k in enumerate(range(k_min, k_max + 1)):
        color = palette[i % len(palette)]
        ax.axvspan(cuts[i], cuts[i + 1], color=color, alpha=0.18, lw=0)
        ax.text(np.sqrt(cuts[i] * cuts[i + 1]), k + 0.35, f"P{k}", ha="center", fontsize=fontsize, color=color)
    for e in edges:
        ax.axvline(e, color="#555555", lw=0.8, ls="--")
        ax.text(e, k_min - 0.45, f"{e:.0f}", ha="center", va="top", fontsize=fontsize - 1)
    if sides is not None:
        sides = np.asarray(sides, dtype=np.float64)
        rois = np.stack([np.zeros_like(sides), np.zeros_like(sides), np.zeros_like(sides), sides, sides], axis=1)
        levels = family.fpn_levels(rois, k_min, k_max, canonical_scale, canonical_level) + k_min
        ax.scatter(sides, levels, s=14, color=COLORS["box"], zorder=5)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(k_min - 0.8, k_max + 0.8)
    ax.set_yticks(range(k_min, k_max + 1))
    ax.set_xlabel("box size sqrt(w h), image pixels", fontsize=fontsize)
    ax.set_ylabel("pyramid level k", fontsize=fontsize)
    ax.tick_params(labelsize=fontsize)
    return edges


def fpn_boxes(ax, image_hw, rois: np.ndarray, k_min: int, k_max: int, canonical_scale: float = 224,
              canonical_level: int = 4, fontsize: float = 8):
    """Boxes on the image, each outlined in the colour of its FPN level (legend ``P<k>``).

    Levels come from :func:`roilib.family.fpn_levels`. Returns the level of each box
    (``k``, or ``None`` where it has none).
    """
    from . import family

    palette = ["#1f77b4", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2"]
    h, w = image_hw
    rectangle(ax, 0, 0, w, h, edgecolor="#999999", lw=1)
    levels = family.fpn_levels(rois, k_min, k_max, canonical_scale, canonical_level)
    seen = set()
    for box, level in zip(np.asarray(rois, dtype=np.float64), levels):
        if level == family.NO_LEVEL:
            continue
        k = int(level) + k_min
        label = None if k in seen else f"P{k}"
        seen.add(k)
        rectangle(ax, *box[1:5], edgecolor=palette[int(level) % len(palette)], lw=1.5, label=label)
    ax.set_xlim(-0.02 * w, 1.02 * w)
    ax.set_ylim(1.02 * h, -0.02 * h)
    ax.set_aspect("equal")
    ax.tick_params(labelsize=fontsize)
    handles, labels = ax.get_legend_handles_labels()
    order = sorted(range(len(labels)), key=lambda i: labels[i])
    ax.legend([handles[i] for i in order], [labels[i] for i in order], fontsize=fontsize - 1, loc="upper right")
    return [None if lv == family.NO_LEVEL else int(lv) + k_min for lv in levels]


def ps_channel_groups(ax, roi: Sequence[float], output_size, spatial_scale: float, height: int, width: int,
                      out_channel: int = 0, fontsize: float = 8):
    """PS-RoIPool's bins on the map, each labelled with the input channel it reads.

    Bins are :func:`roilib.family.ps_roi_pool_bins` (clipped to the last pixel but one),
    channels :func:`roilib.family.ps_channel` for output channel ``out_channel``.
    Returns the ``(PH, PW)`` array of input channels drawn.
    """
    from . import family

    roi = np.asarray(roi, dtype=np.float64).reshape(1, 5)
    out = (output_size, output_size) if np.isscalar(output_size) else tuple(output_size)
    bins = family.ps_roi_pool_bins(roi, out, spatial_scale, height, width)
    channels = family.ps_channel(out_channel + 1, out)[out_channel]
    cmap = _plt().get_cmap("tab10")
    for p in range(out[0]):
        for q in range(out[1]):
            hs, he, ws, we = bins.hstart[0, p], bins.hend[0, p], bins.wstart[0, q], bins.wend[0, q]
            color = cmap((p * out[1] + q) % 10)
            if he > hs and we > ws:
                rectangle(ax, ws - 0.5, hs - 0.5, we - 0.5, he - 0.5, fill=True, color=color, alpha=0.25, lw=0)
                rectangle(ax, ws - 0.5, hs - 0.5, we - 0.5, he - 0.5, edgecolor=color, lw=1.2)
                ax.text((ws + we - 1) / 2, (hs + he - 1) / 2, f"c{channels[p, q]}", ha="center", va="center",
                        fontsize=fontsize, color="black")
    exact = geometry.scale_boxes(roi, spatial_scale)[0]
    rectangle(ax, *exact, edgecolor=COLORS["box"], ls="--", lw=1.8)
    return channels


#: one colour per benchmarked op in :func:`scaling_curves` (the RoI ops keep theirs)
_BENCH_COLORS = {"roi_align": "RoIAlign", "roi_pool": "RoIPool", "roi_warp": "RoIWarp"}
#: the scaling plot's colours of the ops outside METHOD_COLORS (SPP: COLORS["grid"])
_BENCH_EXTRA_COLORS = {"ps_roi_align": "#2ca02c", "ps_roi_pool": "#17becf"}


def scaling_curves(axes, rows: Sequence[dict], value: str = "ratio", fontsize: float = FONT_SIZE):
    """How each op's cost grows: one panel per swept axis of ``python -m roilib.bench --scaling``.

    Parameters
    ----------
    axes : sequence of matplotlib Axes
        One per axis of the sweep, in the order the rows first name them
        (``boxes``, ``channels``, ``map_hw``).
    rows : sequence of dict
        The rows of ``roilib.bench.run_scaling`` (``--json``): ``axis``, ``op``,
        ``case``, ``pass_``, the swept values, and ``roilib`` / ``torchvision`` timings.
    value : {"ratio", "ms"}
        Plot roilib's time over torchvision's, or roilib's time in milliseconds.
    fontsize : float
    """
    names = list(dict.fromkeys(row["axis"] for row in rows))
    titles = dict(boxes="number of boxes", channels="channels", map_hw="map cells (H x W)")
    for ax, name in zip(axes, names):
        curves = {}
        for row in rows:
            if row["axis"] != name or not row.get("roilib"):
                continue
            x = float(np.prod(row["map_hw"])) if name == "map_hw" else float(row[name])
            if value == "ratio":
                if not row.get("torchvision"):
                    continue
                y = row["roilib"]["best"] / row["torchvision"]["best"]
            else:
                y = row["roilib"]["best"] * 1e3
            curves.setdefault((row["case"], row["op"], row["pass_"]), []).append((x, y))
        for (case, op, pass_), points in curves.items():
            points.sort()
            if op in _BENCH_COLORS:
                color = method_color(_BENCH_COLORS[op])
            else:
                color = _BENCH_EXTRA_COLORS.get(op, COLORS["grid"])
            ax.plot(*zip(*points), marker="o", color=color, ls="-" if pass_ == "forward" else "--",
                    label=f"{case}, {pass_}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        from matplotlib.ticker import FormatStrFormatter, NullFormatter

        ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
        ax.yaxis.set_minor_formatter(NullFormatter())
        if value == "ratio":
            ax.axhline(1.0, color="black", lw=1)
            ax.axhline(0.5, color="black", lw=1, ls=":")
            lo, hi = ax.get_ylim()
            ax.set_yticks([t for t in 2.0 ** np.arange(-4, 7) if lo <= t <= hi])
        ax.set_xlabel(titles.get(name, name), fontsize=fontsize)
        ax.tick_params(labelsize=fontsize)
    axes[0].set_ylabel("roilib / torchvision time" if value == "ratio" else "roilib time (ms)", fontsize=fontsize)
    return axes
