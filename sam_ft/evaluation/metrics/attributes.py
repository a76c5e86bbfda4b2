"""Per-object attributes for the factor analysis (size, shape, boundary, contrast vs Dice).

The COSMOS study found Dice correlates with object size, intensity difference to the
surroundings and boundary complexity. Each attribute is computed on the ground-truth mask at the
ORIGINAL resolution; arrays are (row, col) and ``spacing`` is (row, col) in mm.

- ``area_px``: number of foreground pixels. ``area_mm2``: ``area_px`` x pixel area.
- ``aspect_ratio``: long / short side of the tight bounding box, sides measured in mm (so
  anisotropic pixels do not distort shape), always >= 1.
- ``boundary_complexity``: perimeter^2 / (4 pi area), in mm; 1 for a disc, 4/pi for a square,
  larger for ragged or elongated shapes. The perimeter is the length of the 0.5 iso-contour
  (marching squares, ``contourpy``) of the mask smoothed by a Gaussian of sigma 1 px: counting
  pixel edges instead would measure the staircase and overestimate a disc's perimeter by 4/pi.
  Hole boundaries count towards the perimeter. Objects of a few pixels can fall slightly below 1.
- ``contrast``: |mean intensity inside - mean intensity of a ring of ``ring_px`` pixels
  (Euclidean) around the object| / (std of the whole image + eps), on the raw intensities
  (e.g. HU). Normalising by the image std makes it comparable across modalities and scanners.
  NaN without an image, or when the object leaves no ring (it fills the image).
"""

from __future__ import annotations

from collections.abc import Sequence

import contourpy
import numpy as np
import pandas as pd
from scipy.ndimage import distance_transform_edt, gaussian_filter
from scipy.stats import spearmanr

ATTRIBUTES = ("area_px", "area_mm2", "aspect_ratio", "boundary_complexity", "contrast")
_SMOOTH_SIGMA_PX = 1.0


def _perimeter_mm(mask: np.ndarray, spacing: Sequence[float]) -> float:
    """Length in mm of the smoothed 0.5 iso-contour of a 2D bool mask (see module docstring)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    # Crop (for speed) with a zero margin wide enough that smoothing and contours never reach
    # the edge of the crop: every contour closes.
    pad = int(np.ceil(4 * _SMOOTH_SIGMA_PX)) + 1
    crop = np.pad(mask[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], pad).astype(np.float64)
    smooth = gaussian_filter(crop, _SMOOTH_SIGMA_PX)
    lines = contourpy.contour_generator(z=smooth, line_type="Separate").lines(0.5)
    # contourpy gives (x, y) = (col, row) vertices.
    scale = np.array([spacing[1], spacing[0]], dtype=np.float64)
    return float(sum(np.linalg.norm(np.diff(line * scale, axis=0), axis=1).sum() for line in lines))


def object_attributes(
    mask: np.ndarray,
    image: np.ndarray | None = None,
    spacing: Sequence[float] = (1.0, 1.0),
    ring_px: int = 5,
    eps: float = 1e-6,
) -> dict[str, float]:
    """Size, shape, boundary and contrast attributes of one object (definitions in the module).

    Args:
        mask: (H, W) bool ground-truth mask of the object, non-empty.
        image: (H, W) float raw intensities of the slice, or None (contrast is then NaN).
        spacing: (row, col) pixel spacing in mm.
        ring_px: width in pixels of the surrounding ring used for the contrast.
        eps: added to the image std so a flat image gives a finite contrast.

    Returns:
        dict with ``area_px, area_mm2, aspect_ratio, boundary_complexity, contrast``.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be (H, W), got shape {mask.shape}")
    if not mask.any():
        raise ValueError("object_attributes needs a non-empty mask")
    sr, sc = float(spacing[0]), float(spacing[1])

    area_px = int(np.count_nonzero(mask))
    area_mm2 = area_px * sr * sc
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    height = (rows[-1] - rows[0] + 1) * sr
    width = (cols[-1] - cols[0] + 1) * sc
    aspect_ratio = max(height, width) / min(height, width)
    complexity = _perimeter_mm(mask, (sr, sc)) ** 2 / (4.0 * np.pi * area_mm2)

    contrast = float("nan")
    if image is not None:
        image = np.asarray(image, dtype=np.float64)
        if image.shape != mask.shape:
            raise ValueError(f"image {image.shape} and mask {mask.shape} differ in shape")
        ring = (distance_transform_edt(~mask) <= ring_px) & ~mask
        if ring.any():
            diff = abs(image[mask].mean() - image[ring].mean())
            contrast = float(diff / (image.std() + eps))

    return {
        "area_px": area_px,
        "area_mm2": float(area_mm2),
        "aspect_ratio": float(aspect_ratio),
        "boundary_complexity": float(complexity),
        "contrast": contrast,
    }


def spearman_table(
    df: pd.DataFrame,
    metric: str = "dice",
    attributes: Sequence[str] = ("area_px", "aspect_ratio", "boundary_complexity", "contrast"),
    by: Sequence[str] | None = None,
) -> pd.DataFrame:
    """Spearman rank correlation between a metric and each object attribute.

    Rows with NaN in the metric or the attribute are dropped pair by pair. ``rho`` and
    ``p_value`` are NaN when fewer than 3 rows remain or either column is constant.

    Args:
        df: one row per scored object (e.g. ``per_object.csv``).
        metric: the metric column, e.g. ``"dice"``.
        attributes: attribute columns; those absent from ``df`` are skipped.
        by: optional grouping columns (e.g. ``["model", "prompt"]``), placed first in the output.

    Returns:
        DataFrame with columns ``[*by], attribute, rho, p_value, n``.
    """
    by = list(by or [])
    present = [a for a in attributes if a in df.columns]
    groups = df.groupby(by, sort=False, dropna=False) if by else [((), df)]
    rows = []
    for key, group in groups:
        key = key if isinstance(key, tuple) else (key,)
        for attribute in present:
            pair = group[[metric, attribute]].apply(pd.to_numeric, errors="coerce").dropna()
            rho = p = float("nan")
            if len(pair) >= 3 and pair[metric].nunique() > 1 and pair[attribute].nunique() > 1:
                result = spearmanr(pair[metric], pair[attribute])
                rho, p = float(result.statistic), float(result.pvalue)
            rows.append((*key, attribute, rho, p, len(pair)))
    return pd.DataFrame(rows, columns=[*by, "attribute", "rho", "p_value", "n"])
