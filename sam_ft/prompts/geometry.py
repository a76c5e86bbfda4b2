"""Mask geometry used to build prompts: tight box, centroid, enlarged box, point grid.

Prompts use (x, y) = (column, row) pixel coordinates of the ORIGINAL image; numpy arrays are
indexed (row, col). Boxes are ``[x_min, y_min, x_max, y_max]`` with inclusive pixel indices, so a
one-pixel mask at (row 3, col 5) has the box ``[5, 3, 5, 3]``.
"""

from __future__ import annotations

import numpy as np


def _check_mask(mask: np.ndarray) -> np.ndarray:
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"expected an (H, W) mask, got shape {mask.shape}")
    if not mask.any():
        raise ValueError("cannot build a prompt from an empty mask")
    return mask


def mask_box(mask: np.ndarray) -> np.ndarray:
    """Tight box of an (H, W) bool mask -> (4,) float ``[x_min, y_min, x_max, y_max]``."""
    mask = _check_mask(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return np.array([cols[0], rows[0], cols[-1], rows[-1]], dtype=np.float64)


def mask_centroid(mask: np.ndarray) -> tuple[int, int]:
    """(x, y) = (floor(mean column), floor(mean row)) of an (H, W) bool mask.

    The centroid may lie outside the mask (a ring, a crescent); callers check ``mask[y, x]``.
    """
    mask = _check_mask(mask)
    rows, cols = np.nonzero(mask)
    return int(np.floor(cols.mean())), int(np.floor(rows.mean()))


def enlarged_box(box: np.ndarray, factor: float, original_size: tuple[int, int]) -> np.ndarray:
    """Box scaled ``factor`` times about its centre, clipped to the image -> (4,) int, inclusive.

    The scaling acts on the pixel extent (``x_max - x_min + 1`` pixels), so a 10-pixel-wide box
    becomes 20 pixels wide at ``factor=2``; a degenerate box still grows.

    Args:
        box: (4,) ``[x_min, y_min, x_max, y_max]`` inclusive pixel indices.
        factor: scale of the width and height (2.0 in the study's negative-point sampling).
        original_size: (H, W) of the image, for clipping.
    """
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64)
    h, w = original_size
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    # Half-extents measured between pixel centres: an extent of n pixels spans n - 1 between the
    # first and last centre, hence the -0.5 on each side.
    hx = factor * (x1 - x0 + 1) / 2 - 0.5
    hy = factor * (y1 - y0 + 1) / 2 - 0.5
    out = np.array(
        [np.ceil(cx - hx), np.ceil(cy - hy), np.floor(cx + hx), np.floor(cy + hy)], dtype=np.int64
    )
    return np.clip(out, 0, [w - 1, h - 1, w - 1, h - 1])


def point_grid(m: int, original_size: tuple[int, int]) -> np.ndarray:
    """m x m grid for SAM's automatic mask generation -> (m*m, 2) float (x, y) original pixels.

    Equals ``segment_anything.utils.amg.build_point_grid(m) * [W, H]``, the scaling
    ``SamAutomaticMaskGenerator`` applies for the full-image crop: cell centres of an m x m
    partition, row-major (x varies fastest).
    """
    if m < 1:
        raise ValueError(f"point grid side must be >= 1, got {m}")
    h, w = original_size
    offset = 1 / (2 * m)
    side = np.linspace(offset, 1 - offset, m)
    xs, ys = np.meshgrid(side, side)  # (m, m) each, xs varying along columns
    grid = np.stack([xs, ys], axis=-1).reshape(-1, 2)
    return grid * np.array([w, h], dtype=np.float64)
