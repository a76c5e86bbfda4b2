"""Cut a labelled volume into the paper's 2D slices with one binary mask per object.

Frames: a volume oriented to RAS has axes (x, y, z). The *slicing frame* moves the slicing axis
first: ``(S, R, C)`` = (slice, row, col), the two remaining RAS axes keeping their order. A 2D
image is a slicing frame with S = 1. Spacing in the slicing frame is (slice, row, col) mm.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sam_ft.data.intensity import prepare_slice
from sam_ft.data.types import SliceRecord

# Spacings within this ratio of the largest count as equally coarse for the ``auto`` axis.
_SPACING_TIE = 0.9


def choose_slice_axis(
    spacing: Sequence[float], shape: Sequence[int], modality: str = "", setting: str | int = "auto"
) -> int:
    """Axis of the RAS-oriented (x, y, z) volume to slice along.

    ``auto``: axial (z, axis 2) for CT; otherwise the acquisition axis, i.e. the axis with the
    largest voxel spacing, then (among spacings within 10 %) the fewest voxels, then the axial one.

    Args:
        spacing: (x, y, z) voxel spacing in mm.
        shape: (x, y, z) voxel counts.
        modality: e.g. ``"CT"``.
        setting: ``"auto"`` or an axis 0, 1, 2.
    """
    if setting != "auto":
        return int(setting)
    if modality.upper().startswith("CT"):
        return 2
    sp = np.asarray(spacing, dtype=float)
    coarse = [a for a in range(3) if sp[a] >= _SPACING_TIE * sp.max()]
    return min(coarse, key=lambda a: (shape[a], -a))


def to_slicing_frame(volume: np.ndarray, axis: int) -> np.ndarray:
    """(x, y, z[, ...]) volume -> (S, R, C[, ...]) with ``axis`` first (a view, no copy)."""
    return np.moveaxis(volume, axis, 0)


def from_slicing_frame(stack: np.ndarray, axis: int) -> np.ndarray:
    """Inverse of :func:`to_slicing_frame`: (S, R, C) -> the RAS-oriented (x, y, z) volume."""
    return np.moveaxis(stack, 0, axis)


def object_masks(
    label: np.ndarray,
    groups: dict[str, list[int]] | None,
    min_object_pixels: int,
    names: dict[int, str] | None = None,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One binary mask per object of a 2D label map, objects of <= ``min_object_pixels`` dropped.

    Args:
        label: (H, W) integer label map, 0 = background.
        groups: {object name: label values}; None makes every non-zero value its own object,
            named ``names[v]`` or ``"label_<v>"``.
        min_object_pixels: objects with this many pixels or fewer are dropped (paper: 50).
        names: value -> name, used when ``groups`` is None.

    Returns:
        masks (K, H, W) bool, labels (K,) int64 (first value of each group), names (K,).
    """
    if groups is None:
        values = [int(v) for v in np.unique(label) if v != 0]
        groups = {(names or {}).get(v, f"label_{v}"): [v] for v in values}
    masks, values_out, names_out = [], [], []
    for name, values in groups.items():
        mask = label == values[0] if len(values) == 1 else np.isin(label, values)
        if int(mask.sum()) > min_object_pixels:
            masks.append(mask)
            values_out.append(values[0])
            names_out.append(name)
    if not masks:
        return np.zeros((0, *label.shape), dtype=bool), np.zeros(0, dtype=np.int64), []
    return np.stack(masks), np.asarray(values_out, dtype=np.int64), names_out


def slice_records(
    image: np.ndarray,
    label: np.ndarray,
    *,
    case: str,
    image_id: str,
    bounds: tuple[float, float] | None,
    spacing: tuple[float, float, float],
    groups: dict[str, list[int]] | None,
    min_object_pixels: int,
    intensity: dict,
    modality: str = "",
    names: dict[int, str] | None = None,
    is_3d: bool = True,
) -> list[SliceRecord]:
    """The slices of one case that keep at least one object.

    Args:
        image: (S, R, C) or (S, R, C, 3) raw intensities in the slicing frame.
        label: (S, R, C) integer label map in the same frame.
        bounds: (low, high) of the case's intensity mapping (:mod:`sam_ft.data.intensity`), or
            None to compute them on each slice (``task.intensity.scope: slice``).
        intensity: ``task.intensity`` (mode, percentiles, ``keep_zero``), every key given.
        min_object_pixels: ``data.min_object_pixels``.
        spacing: (slice, row, col) mm.
        is_3d: False for a 2D image (slice_index is then -1).
    """
    records = []
    has_fg = label.reshape(label.shape[0], -1).any(axis=1)
    for i in np.flatnonzero(has_fg):
        masks, values, obj_names = object_masks(label[i], groups, min_object_pixels, names)
        if len(masks) == 0:
            continue
        raw = np.asarray(image[i], dtype=np.float32)
        records.append(
            SliceRecord(
                case=case,
                slice_index=int(i) if is_3d else -1,
                image=prepare_slice(raw, intensity, bounds),
                masks=masks,
                labels=values,
                names=obj_names,
                spacing=(float(spacing[1]), float(spacing[2])),
                modality=modality,
                # Colour images keep their mean as the "intensity" for the contrast attribute.
                raw=raw.mean(axis=-1) if raw.ndim == 3 else raw,
                num_slices=int(label.shape[0]),
                slice_spacing=float(spacing[0]) if is_3d else 1.0,
                image_id=image_id,
            )
        )
    return records
