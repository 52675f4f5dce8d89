"""Matplotlib drawings of RoI geometry, computed by :mod:`roilib.geometry`.

Every picture in the book comes from here, and every coordinate drawn is taken from
``roilib.geometry`` rather than recomputed, so a figure cannot disagree with the ops.

Coordinates are *index coordinates* of the feature map: pixel ``(i, j)``'s value sits at
``(x, y) = (j, i)`` and its cell is the unit square around that point. Rows grow
downwards, as in an image. A box for an op with ``aligned=True`` is drawn where that op
sees it, half a pixel up and left of ``[x1, x2] * s``.

matplotlib is imported lazily: ``pip install roilib[plot]``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from . import geometry

#: colours used consistently across the book
COLORS = dict(box="#d62728", bins="#1f77b4", samples="#ff7f0e", lost="#d62728", gained="#2ca02c", grid="#999999")


def _plt():
    import matplotlib.pyplot as plt

    return plt


def feature_grid(ax, height: int, width: int, values: Optional[np.ndarray] = None, fmt: str = "{:g}", cmap: str = "Greys", fontsize: float = 8):
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
    ax.set_xticks(range(width))
    ax.set_yticks(range(height))
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
                    ax.text((ws + we - 1) / 2, (hs + he - 1) / 2, f"{p},{q}", ha="center", va="center", fontsize=7, color=color)
    exact = geometry.scale_boxes(roi, spatial_scale)[0]
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


def bilinear_cell(ax, corners: "geometry.BilinearCorners", fontsize: float = 9):
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
        ax.annotate(f"({cy}, {cx})", (cx, cy), textcoords="offset points", xytext=(4, -10 if cy == yl else 6), fontsize=fontsize - 1)
    ax.set_xlim(xl - 0.25, xh + 0.45)
    ax.set_ylim(yh + 0.25, yl - 0.25)
    ax.set_aspect("equal")


def lost_and_gained(ax, box: Sequence[float], region: Sequence[float], resolution: int = 400):
    """Shade the part of ``box`` an op does not read (lost) and what it reads outside (gained).

    Both rectangles are ``[x_lo, y_lo, x_hi, y_hi]`` (see :func:`roilib.geometry.read_region`).
    Returns the ``(lost, gained)`` areas from :func:`roilib.geometry.area_lost_and_gained`.
    """
    box, region = np.asarray(box, float), np.asarray(region, float)
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


def figure(ncols: int = 1, nrows: int = 1, size: float = 3.6):
    """A figure with ``nrows x ncols`` square-ish panels (returns ``fig, axes``)."""
    plt = _plt()
    fig, axes = plt.subplots(nrows, ncols, figsize=(size * ncols, size * nrows), squeeze=False)
    return fig, axes.ravel()
