"""The misalignment experiment: RoIPool, RoIWarp and RoIAlign in front of one small head.

A small, deterministic version of the comparison in Mask R-CNN's Table 2c/2d, used by the
book's chapter "The misalignment experiment". It needs PyTorch (for the head).

The task
--------
Each synthetic image holds one bright axis-aligned ellipse on a darker background, at a
random sub-pixel position. Its ground-truth box is the ellipse's bounding box. A
*proposal* is that box with every corner moved by up to ``jitter`` of the box's width or
height. From the RoI features of the proposal a small head must predict

* the box: the offsets of the true corners from the proposal's, in units of the
  proposal's width and height (as Fast R-CNN's box regressor does), and
* the mask: which of the ``14 x 14`` cell centres of the proposal lie inside the ellipse
  (as Mask R-CNN's mask branch does, there at ``28 x 28``).

Both targets are defined in the proposal's frame, as in a real detector, so a head that
sees features from a shifted box must guess the shift.

The backbone
------------
A fixed (not learned) strided convolution with three ``stride x stride`` kernels, applied
to the image: a box filter (the cell's mean brightness) and two ramps (the brightness
weighted by the horizontal or vertical position inside the cell, ``-1`` at one edge and
``+1`` at the other). The ramps tell the head *where* inside a cell the bright part lies,
as position-sensitive channels of a real network do. Cell ``q`` of the map covers image
pixels ``[q * stride, (q + 1) * stride)``.

:func:`feature_maps` computes the backbone's output in closed form from each image row's
span inside the ellipse. That is exact and more than ten times faster than rendering the
images (:func:`render`) and convolving them (:func:`backbone`); the chapter checks that
both give the same maps. Pixel noise is added after the backbone, with the
covariance that white pixel noise of standard deviation ``noise`` has once it has gone
through the kernels (:func:`map_noise`), which is the same distribution.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

__all__ = [
    "IMAGE_SIZE",
    "Scenes",
    "sample_scenes",
    "render",
    "backbone_kernels",
    "backbone",
    "feature_maps",
    "map_noise",
    "jitter_boxes",
    "box_deltas",
    "apply_deltas",
    "mask_targets",
    "box_iou",
    "mask_iou",
    "Head",
    "train_head",
    "evaluate",
]

#: width and height of the synthetic images, in pixels
IMAGE_SIZE = 256


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Scenes:
    """``n`` synthetic images, each one axis-aligned ellipse on a uniform background.

    Attributes
    ----------
    cx, cy : ndarray, shape (n,)
        Centre of the ellipse in image pixels (pixel ``j`` spans ``[j, j + 1)``).
    a, b : ndarray, shape (n,)
        Horizontal and vertical semi-axes in pixels.
    foreground, background : ndarray, shape (n,)
        Brightness inside and outside the ellipse.
    size : int
        Image width and height in pixels.
    """

    cx: np.ndarray
    cy: np.ndarray
    a: np.ndarray
    b: np.ndarray
    foreground: np.ndarray
    background: np.ndarray
    size: int = IMAGE_SIZE

    def __len__(self) -> int:
        return len(self.cx)

    def __getitem__(self, index) -> "Scenes":
        """The scenes selected by ``index`` (a slice, integer array or boolean mask)."""
        pick = [np.atleast_1d(getattr(self, f)[index]) for f in ("cx", "cy", "a", "b", "foreground", "background")]
        return Scenes(*pick, size=self.size)

    @property
    def boxes(self) -> np.ndarray:
        """Ground-truth boxes ``[x1, y1, x2, y2]`` (the ellipses' bounding boxes), shape (n, 4)."""
        return np.stack([self.cx - self.a, self.cy - self.b, self.cx + self.a, self.cy + self.b], axis=1)

    def row_spans(self) -> Tuple[np.ndarray, np.ndarray]:
        """Where each pixel row's centre line crosses the ellipse.

        Returns
        -------
        left, right : ndarray, shape (n, size)
            The span ``[left, right]`` of row ``i`` (centre line ``y = i + 0.5``) inside the
            ellipse; ``left == right`` where the row misses it.
        """
        y = np.arange(self.size) + 0.5
        v = (y[None, :] - self.cy[:, None]) / self.b[:, None]
        half = self.a[:, None] * np.sqrt(np.clip(1.0 - v * v, 0.0, None))
        return self.cx[:, None] - half, self.cx[:, None] + half


def sample_scenes(n: int, rng: np.random.Generator, size: int = IMAGE_SIZE, semi_axes: Tuple[float, float] = (24.0, 64.0), margin: float = 8.0) -> Scenes:
    """Draw ``n`` random scenes.

    Parameters
    ----------
    n : int
        Number of images.
    rng : numpy.random.Generator
        Source of randomness (seed it for reproducible scenes).
    size : int
        Image size in pixels.
    semi_axes : (float, float)
        Range of the semi-axes: boxes are ``2 * semi_axes`` pixels wide and high.
    margin : float
        Smallest distance between an ellipse and the image border.

    Returns
    -------
    Scenes
        Semi-axes uniform in ``semi_axes``, centres uniform where the ellipse keeps the
        margin, foreground brightness uniform in ``[0.6, 1]``, background in ``[0, 0.3]``.
    """
    a = rng.uniform(*semi_axes, n)
    b = rng.uniform(*semi_axes, n)
    cx = rng.uniform(a + margin, size - a - margin)
    cy = rng.uniform(b + margin, size - b - margin)
    foreground = rng.uniform(0.6, 1.0, n)
    background = rng.uniform(0.0, 0.3, n)
    return Scenes(cx, cy, a, b, foreground, background, size)


def render(scenes: Scenes) -> np.ndarray:
    """The images, without noise: shape ``(n, size, size)``.

    Pixel ``(i, j)`` is ``background + (foreground - background) * f`` where ``f`` is the
    part of the pixel's width ``[j, j + 1]`` inside row ``i``'s span
    (:meth:`Scenes.row_spans`): exact anti-aliasing along ``x``, the row's centre line
    along ``y``.
    """
    left, right = scenes.row_spans()
    j = np.arange(scenes.size)
    cover = np.clip(np.minimum(right[:, :, None], j + 1) - np.maximum(left[:, :, None], j), 0.0, 1.0)
    contrast = (scenes.foreground - scenes.background)[:, None, None]
    return scenes.background[:, None, None] + contrast * cover


# ------------------------------------------------------------------------- backbone


def _ramp(stride: int) -> np.ndarray:
    """Position of each pixel centre inside a cell, from ``-1`` (first edge) to ``+1``."""
    return (np.arange(stride) + 0.5) / (stride / 2) - 1.0


def backbone_kernels(stride: int) -> np.ndarray:
    """The backbone's three ``stride x stride`` kernels, shape ``(3, stride, stride)``.

    Channel 0 averages the cell; channels 1 and 2 average it weighted by the horizontal
    and the vertical ramp (:func:`_ramp`). Each kernel sums to its weights over
    ``stride * stride`` pixels, so a uniform cell of brightness ``v`` gives ``(v, 0, 0)``.
    """
    u = _ramp(stride)
    ones = np.ones(stride)
    return np.stack([np.outer(ones, ones), np.outer(ones, u), np.outer(u, ones)]) / stride**2


def backbone(images: np.ndarray, stride: int) -> np.ndarray:
    """Apply the backbone to images: a stride-``stride`` convolution with :func:`backbone_kernels`.

    Parameters
    ----------
    images : ndarray, shape (n, H, W)
        ``H`` and ``W`` multiples of ``stride``.
    stride : int

    Returns
    -------
    ndarray, shape (n, 3, H // stride, W // stride)
    """
    n, h, w = images.shape
    cells = images.reshape(n, h // stride, stride, w // stride, stride)
    return np.einsum("npyqx,cyx->ncpq", cells, backbone_kernels(stride))


def _pixel_moment(x: np.ndarray) -> np.ndarray:
    """``Phi(x)``: integral of ``floor(t) + 1/2`` from 0 to ``x`` (for ``x >= 0``).

    The pixels ``[j, j + 1)`` that a span ``[l, r]`` covers, weighted by their centres
    ``j + 1/2``, add up to ``Phi(r) - Phi(l)``. At an integer ``x``, ``Phi(x) = x**2 / 2``.
    """
    k = np.floor(x)
    return k * (k - 1.0) / 2.0 + k * (x - k) + x / 2.0


def map_noise(stride: int, noise: float, shape: Tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Backbone output of white pixel noise, drawn directly on the map.

    A pixel noise of standard deviation ``noise`` becomes, after the kernels ``K`` (three
    rows of ``stride * stride`` weights), Gaussian noise with covariance
    ``noise**2 * K K^T`` per cell, independent from cell to cell. Here it is drawn as
    ``z @ L^T`` with ``L`` the Cholesky factor of that covariance.

    Parameters
    ----------
    stride : int
    noise : float
        Standard deviation of the pixel noise.
    shape : (n, H, W)
        Number of maps and map size.
    rng : numpy.random.Generator

    Returns
    -------
    ndarray, shape (n, 3, H, W)
    """
    k = backbone_kernels(stride).reshape(3, -1)
    chol = np.linalg.cholesky(noise**2 * (k @ k.T))
    z = rng.standard_normal(tuple(shape) + (3,))
    return np.moveaxis(z @ chol.T, -1, 1)


#: scenes per block in :func:`feature_maps`
_CHUNK = 64


def _cell_sums(left: np.ndarray, right: np.ndarray, stride: int, m: int) -> np.ndarray:
    """The backbone's three kernels applied to the coverage of spans, without the contrast.

    Parameters
    ----------
    left, right : ndarray, shape (n, rows)
        Row spans (:meth:`Scenes.row_spans`).
    stride, m : int
        Cell size and number of cells per side.

    Returns
    -------
    ndarray, shape (n, 3, m, m)
    """
    n = left.shape[0]
    edges = np.arange(m + 1) * stride  # cell boundaries, integers
    lo, hi = left[:, :, None], right[:, :, None]
    # At every cell boundary e: how much of each row's span lies left of e ...
    covered = np.clip(edges, lo, hi) - lo  # (n, rows, m + 1)
    # ... and the same weighted by the pixel centres j + 1/2 (Phi of the clipped boundary).
    phi = np.where(edges <= lo, _pixel_moment(left)[:, :, None], np.where(edges >= hi, _pixel_moment(right)[:, :, None], edges**2 / 2.0))
    length = np.diff(covered, axis=2)  # (n, rows, m): coverage summed over the row's pixels in a cell
    moment = np.diff(phi, axis=2)  # the same, weighted by j + 1/2
    centre = edges[:-1] + stride / 2
    x_weighted = (moment - centre * length) / (stride / 2)  # weighted by the horizontal ramp
    rows = length.reshape(n, m, stride, m)
    sums = [rows.sum(axis=2), x_weighted.reshape(n, m, stride, m).sum(axis=2), np.einsum("npyq,y->npq", rows, _ramp(stride))]
    return np.stack(sums, axis=1) / stride**2


def feature_maps(scenes: Scenes, stride: int, noise: float = 0.0, rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """The backbone's output for every scene, computed from the row spans (no rendering).

    For row ``i`` and the cell columns ``[c0, c0 + stride)``, the pixels' coverages add
    up to the length ``L`` of the span inside the columns, and their sum weighted by the
    pixel centres ``j + 0.5`` to a difference of :func:`_pixel_moment` values, so the
    three channels of :func:`backbone` follow from ``O(n * size * size / stride)`` numbers
    instead of ``n * size * size`` pixels, exactly.

    Parameters
    ----------
    scenes : Scenes
    stride : int
        Divides ``scenes.size``.
    noise : float
        Standard deviation of the pixel noise (see :func:`map_noise`); 0 for none.
    rng : numpy.random.Generator, optional
        Needed when ``noise > 0``.

    Returns
    -------
    ndarray of float64, shape (n, 3, size // stride, size // stride)
    """
    n, size = len(scenes), scenes.size
    m = size // stride
    left, right = scenes.row_spans()  # (n, rows)
    cover = np.empty((n, 3, m, m))
    for k in range(0, n, _CHUNK):  # small blocks stay in cache
        cover[k : k + _CHUNK] = _cell_sums(left[k : k + _CHUNK], right[k : k + _CHUNK], stride, m)
    contrast = (scenes.foreground - scenes.background)[:, None, None, None]
    maps = contrast * cover
    maps[:, 0] += scenes.background[:, None, None]
    if noise > 0:
        maps += map_noise(stride, noise, (n, m, m), rng)
    return maps


# -------------------------------------------------------------------- proposals, targets


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, jitter: float = 0.15) -> np.ndarray:
    """Proposals: each corner moved by a uniform fraction in ``[-jitter, jitter]`` of the box size.

    Parameters
    ----------
    boxes : ndarray, shape (K, 4)
    rng : numpy.random.Generator
    jitter : float

    Returns
    -------
    ndarray, shape (K, 4)
    """
    wh = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
    return boxes + rng.uniform(-jitter, jitter, boxes.shape) * wh


def box_deltas(proposals: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Regression targets: ``(box - proposal) / [w, h, w, h]`` of the proposal, shape (K, 4)."""
    wh = np.tile(proposals[:, 2:] - proposals[:, :2], 2)
    return (boxes - proposals) / wh


def apply_deltas(proposals: np.ndarray, deltas: np.ndarray) -> np.ndarray:
    """Inverse of :func:`box_deltas`: the refined boxes, shape (K, 4)."""
    wh = np.tile(proposals[:, 2:] - proposals[:, :2], 2)
    return proposals + deltas * wh


def mask_targets(scenes: Scenes, image_index: np.ndarray, proposals: np.ndarray, size: int = 14) -> np.ndarray:
    """Which centres of a ``size x size`` grid over each proposal lie inside the ellipse.

    Parameters
    ----------
    scenes : Scenes
    image_index : ndarray of int, shape (K,)
        The scene each proposal belongs to.
    proposals : ndarray, shape (K, 4)
    size : int

    Returns
    -------
    ndarray of bool, shape (K, size, size)
        Row-major: ``[k, i, j]`` is the cell in row ``i`` and column ``j``.
    """
    f = (np.arange(size) + 0.5) / size
    x = proposals[:, 0:1] + f * (proposals[:, 2:3] - proposals[:, 0:1])
    y = proposals[:, 1:2] + f * (proposals[:, 3:4] - proposals[:, 1:2])
    k = np.asarray(image_index)
    u = (x - scenes.cx[k, None]) / scenes.a[k, None]
    v = (y - scenes.cy[k, None]) / scenes.b[k, None]
    return v[:, :, None] ** 2 + u[:, None, :] ** 2 <= 1.0


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boxes ``a[k]`` and ``b[k]``, shape (K,)."""
    lt = np.maximum(a[:, :2], b[:, :2])
    rb = np.minimum(a[:, 2:], b[:, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=1)

    def area(r):
        return (r[:, 2] - r[:, 0]) * (r[:, 3] - r[:, 1])

    return inter / (area(a) + area(b) - inter)


def mask_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Intersection over union of boolean masks ``a[k]`` and ``b[k]`` (any trailing shape), shape (K,)."""
    a = a.reshape(len(a), -1)
    b = b.reshape(len(b), -1)
    return (a & b).sum(axis=1) / np.maximum((a | b).sum(axis=1), 1)


# ----------------------------------------------------------------------------- head

#: the box branch predicts ``BOX_SCALE * deltas``, so its targets are of order 1
BOX_SCALE = 10.0


class Head(nn.Module):
    """A small RoI head: two hidden layers shared by a box branch and a mask branch.

    The input is an RoI operation's ``(K, C, P, P)`` output, flattened; it is standardised
    with the training set's per-feature mean and standard deviation (stored as buffers).

    Parameters
    ----------
    in_features : int
        ``C * P * P``.
    hidden : int
        Width of the hidden layers.
    mask_size : int
        The mask branch predicts ``mask_size x mask_size`` logits.
    """

    def __init__(self, in_features: int, hidden: int = 128, mask_size: int = 14):
        super().__init__()
        self.mask_size = mask_size
        self.register_buffer("mean", torch.zeros(in_features, dtype=torch.float64))
        self.register_buffer("std", torch.ones(in_features, dtype=torch.float64))
        self.body = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.box = nn.Linear(hidden, 4)
        self.mask = nn.Linear(hidden, mask_size * mask_size)

    def forward(self, features: Tensor) -> Tuple[Tensor, Tensor]:
        """``(K, C, P, P)`` features -> box deltas ``(K, 4)`` and mask logits ``(K, m, m)``."""
        h = self.body((features.flatten(1) - self.mean) / self.std)
        return self.box(h) / BOX_SCALE, self.mask(h).view(-1, self.mask_size, self.mask_size)


class MNCWarp(nn.Module):
    """MNC's box features: RoIWarp to ``2P x 2P``, then a 2x2, stride-2 max pooling.

    MNC's network warps every box to 14x14 and pools it to 7x7 for its box head;
    :func:`roilib.torch.roi_warp` is the warping layer. Differentiable in the features
    and, as MNC's layer is, in the boxes.

    Parameters
    ----------
    output_size : int
        ``P``; the warp runs at ``2P``.
    spatial_scale : float
    """

    def __init__(self, output_size: int, spatial_scale: float):
        super().__init__()
        self.output_size, self.spatial_scale = output_size, spatial_scale

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        from .torch import roi_warp

        warped = roi_warp(input, rois, 2 * self.output_size, self.spatial_scale)
        return nn.functional.max_pool2d(warped, 2, stride=2)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size} (warp at {2 * self.output_size}), spatial_scale={self.spatial_scale}"


def train_head(
    features: Tensor,
    deltas: np.ndarray,
    masks: np.ndarray,
    steps: int = 500,
    batch_size: int = 128,
    lr: float = 2e-3,
    hidden: int = 128,
    seed: int = 0,
) -> Head:
    """Train a :class:`Head` with Adam on (features, box deltas, masks).

    The loss is the smooth-L1 loss of ``BOX_SCALE * deltas`` plus the binary cross-entropy
    of the mask logits, averaged over a minibatch of ``batch_size`` RoIs drawn with
    replacement. Everything runs in float64 on the CPU; ``seed`` fixes the initial
    weights and the minibatches, so with one torch thread the result is bitwise
    reproducible.

    Parameters
    ----------
    features : Tensor, shape (K, C, P, P)
        An RoI operation's output (any ``(K, ...)`` shape: it is flattened).
    deltas : ndarray, shape (K, 4)
        :func:`box_deltas` targets.
    masks : ndarray of bool, shape (K, m, m)
        :func:`mask_targets`.
    steps, batch_size : int
    lr : float
        Adam's learning rate.
    hidden : int
    seed : int

    Returns
    -------
    Head
        In evaluation mode.
    """
    x = features.detach().to(torch.float64)
    flat = x.flatten(1)
    torch.manual_seed(seed)
    head = Head(flat.shape[1], hidden, masks.shape[-1]).double()
    head.mean.copy_(flat.mean(0))
    head.std.copy_(flat.std(0) + 1e-6)
    box_target = torch.from_numpy(np.asarray(deltas, np.float64))
    mask_target = torch.from_numpy(np.asarray(masks, np.float64))
    optimizer = torch.optim.Adam(head.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=generator)
        box, mask = head(x[idx])
        loss = nn.functional.smooth_l1_loss(BOX_SCALE * box, BOX_SCALE * box_target[idx])
        loss = loss + nn.functional.binary_cross_entropy_with_logits(mask, mask_target[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval()


def evaluate(head: Head, features: Tensor, proposals: np.ndarray, boxes: np.ndarray, masks: np.ndarray) -> Dict[str, float]:
    """Score a trained head on held-out RoIs.

    Parameters
    ----------
    head : Head
    features : Tensor, shape (K, C, P, P)
    proposals, boxes : ndarray, shape (K, 4)
        The proposals and the ground-truth boxes, in image pixels.
    masks : ndarray of bool, shape (K, m, m)
        True masks in the proposals' frames.

    Returns
    -------
    dict
        ``box_error``: mean absolute error of the refined corners, in image pixels;
        ``box_iou``: mean IoU of refined and true boxes; ``box_iou90``: fraction of
        refined boxes with IoU >= 0.9; ``mask_iou`` and ``mask_iou90``: the same for the
        predicted masks (logit > 0) against the true ones, on the ``m x m`` grid.
    """
    with torch.no_grad():
        box, mask = head(features.detach().to(torch.float64))
    refined = apply_deltas(proposals, box.numpy())
    iou = box_iou(refined, boxes)
    miou = mask_iou(mask.numpy() > 0, masks)
    return dict(
        box_error=float(np.abs(refined - boxes).mean()),
        box_iou=float(iou.mean()),
        box_iou90=float((iou >= 0.9).mean()),
        mask_iou=float(miou.mean()),
        mask_iou90=float((miou >= 0.9).mean()),
    )
