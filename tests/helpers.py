"""Small builders shared by the reference tests (no expected values live here)."""
import numpy as np


def random_boxes(rng, n_boxes, n_images, height, width, spatial_scale, margin=0.0, min_size=0.5, max_size=None):
    """Boxes ``[b, x1, y1, x2, y2]`` in image pixels whose feature-map corners lie in
    ``[-margin, size - 1 + margin]``, at least ``min_size`` feature pixels wide."""
    max_size = max_size or max(height, width)
    out = np.zeros((n_boxes, 5))
    out[:, 0] = rng.integers(0, n_images, n_boxes)
    for axis, size in ((1, width), (2, height)):
        lo = rng.uniform(-margin, size - 1 + margin - min_size, n_boxes)
        length = rng.uniform(min_size, max(min_size, max_size), n_boxes)
        out[:, axis] = lo / spatial_scale
        out[:, axis + 2] = np.minimum(lo + length, size - 1 + margin) / spatial_scale
    return out


def directional_derivative(f, x, direction, eps):
    """Central difference of scalar ``f`` at ``x`` along ``direction``."""
    return (f(x + eps * direction) - f(x - eps * direction)) / (2 * eps)
