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
    """The official ``limit_rect`` (``utils/get_prompts.py``) as an inclusive box -> (4,) int.

    The official code scales the box's extent measured between its first and last pixel index
    (``x_max - x_min``, one less than the pixel count) ``factor`` times about its centre, clips
    the float corners to [0, W] x [0, H], truncates the corner and the extent with ``int`` and
    reads ``mask[y:y + h, x:x + w]``: a half-open range, so the box reaches ``x_max + extent / 2``
    exclusive on the right and bottom. A one-pixel-wide box has extent 0 and stays empty
    (``x_max < x_min`` in the result); callers fall back to the whole image's background.

    Args:
        box: (4,) ``[x_min, y_min, x_max, y_max]`` inclusive pixel indices.
        factor: scale of the width and height (2.0 in the study's negative-point sampling).
        original_size: (H, W) of the image, for clipping.
    """
    x0, y0, x1, y1 = np.asarray(box, dtype=np.float64)
    h, w = original_size
    out = []
    for lo, hi, size in ((x0, x1, w), (y0, y1, h)):
        extent = hi - lo
        start = lo - extent * factor / 2 + extent / 2
        stop = start + extent * factor  # from the unclipped start, as in the official code
        start, stop = max(start, 0.0), min(stop, float(size))
        first = int(start)
        out.append((first, first + int(stop - start) - 1))
    (ex0, ex1), (ey0, ey1) = out
    return np.array([ex0, ey0, ex1, ey1], dtype=np.int64)


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
