"""Prompts for ``predict.py`` (a ``prompts=`` JSON, or ``box=``/``points=`` on the command line)
read, checked and moved from the input file's own pixel indices into the slicing frame:
``{slice: [(label value, Prompt)]}``, prompts (x, y)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from sam_ft.errors import DataError
from sam_ft.inference.frames import FileGeometry
from sam_ft.inference.inputs import LoadedImage
from sam_ft.prompts.types import Prompt

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Prompts from JSON


def read_prompt_file(
    path: Path, geometry: FileGeometry, image: LoadedImage
) -> dict[int, list[tuple[int, Prompt]]]:
    """Parse and check a prompts JSON -> {slice (slicing frame): [(label value, Prompt)]}.

    Coordinates are moved from the file's own pixel indices into the slicing frame (see the
    module docstring). Every problem raises a :class:`DataError` naming the file and object.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(str(path), f"unreadable prompts file ({e})") from None
    if not text.strip():
        raise DataError(str(path), "empty prompts file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"malformed JSON ({e})") from None
    objects = data.get("objects") if isinstance(data, dict) else data
    if isinstance(data, dict) and "objects" not in data:
        objects = [data]
    return parse_prompt_objects(objects, str(path), geometry, image)


def parse_prompt_objects(
    objects: Any, path: str, geometry: FileGeometry, image: LoadedImage
) -> dict[int, list[tuple[int, Prompt]]]:
    """Check prompt objects (a prompts JSON's list, or the one ``predict.py box=... slice=...``
    gives) -> {slice (slicing frame): [(label value, Prompt)]}.

    Every problem raises a :class:`DataError` naming ``path`` (the file, or the command-line
    options) and the object.
    """
    if not isinstance(objects, list) or not objects:
        raise DataError(str(path), "no objects: expected a non-empty list of prompt objects")
    is_3d = image.slice_axis >= 0
    out: dict[int, list[tuple[int, Prompt]]] = {}
    for n, obj in enumerate(objects, start=1):
        where = f"object {n}"
        if not isinstance(obj, dict):
            raise DataError(str(path), f"{where}: expected a JSON object, got {obj!r}")
        unknown = sorted(set(obj) - {"box", "points", "point_labels", "label", "slice"})
        if unknown:
            raise DataError(str(path), f"{where}: unknown key(s) {unknown}")
        label = obj.get("label", n)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 < label < 65536:
            raise DataError(str(path), f"{where}: label must be an integer 1..65535, got {label!r}")
        s_file = obj.get("slice")
        if is_3d:
            n_file = image.num_slices
            if not isinstance(s_file, int) or isinstance(s_file, bool):
                raise DataError(str(path), f"{where}: a volume needs an integer 'slice'")
            if not 0 <= s_file < n_file:
                raise DataError(
                    str(path), f"{where}: slice {s_file} out of range (the volume has {n_file})"
                )
        elif s_file not in (None, 0, -1):
            raise DataError(str(path), f"{where}: slice {s_file} given for a 2D image")
        box, points, plabels = obj.get("box"), obj.get("points"), obj.get("point_labels")
        if box is None and points is None:
            raise DataError(str(path), f"{where}: needs a 'box' and/or 'points'")
        plane = _plane_size(geometry, image)  # (rows, cols) of the file's slice
        pts = _check_points(path, where, points, plane) if points is not None else None
        if pts is not None:
            plabels = [1] * len(pts) if plabels is None else plabels
            if (
                not isinstance(plabels, list)
                or len(plabels) != len(pts)
                or any(v not in (0, 1) or isinstance(v, bool) for v in plabels)
            ):
                raise DataError(
                    str(path), f"{where}: point_labels must be {len(pts)} values 0 or 1"
                )
        elif plabels is not None:
            raise DataError(str(path), f"{where}: point_labels without points")
        bx = _check_box(path, where, box, plane) if box is not None else None
        s, bx, pts = _to_slicing_frame(geometry, image, s_file, bx, pts)
        prompt = Prompt(box=bx, points=pts, point_labels=plabels if pts is not None else None)
        out.setdefault(s, []).append((int(label), prompt))
    return out


def _plane_size(geometry: FileGeometry, image: LoadedImage) -> tuple[int, int]:
    if image.slice_axis < 0 or geometry.kind != "nifti":
        return image.size
    f = geometry.file_axis(image.slice_axis)
    rows, cols = (geometry.spatial3[a] for a in range(3) if a != f)
    return rows, cols


def _number_list(value: Any, n: int | None) -> bool:
    return (
        isinstance(value, list)
        and (n is None or len(value) == n)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and all(np.isfinite(value))
    )


def _check_box(path: str, where: str, box: Any, plane: tuple[int, int]) -> np.ndarray:
    if not _number_list(box, 4):
        raise DataError(str(path), f"{where}: box must be [x_min, y_min, x_max, y_max], got {box}")
    x0, y0, x1, y1 = box
    rows, cols = plane
    if x0 > x1 or y0 > y1:
        raise DataError(str(path), f"{where}: box {box} has x_min > x_max or y_min > y_max")
    if min(x0, y0) < 0 or x1 > cols - 1 or y1 > rows - 1:
        raise DataError(
            str(path),
            f"{where}: box {box} outside the image ({cols} x {rows} pixels: "
            f"0 <= x <= {cols - 1}, 0 <= y <= {rows - 1})",
        )
    return np.asarray(box, dtype=np.float64)


def _check_points(path: str, where: str, points: Any, plane: tuple[int, int]) -> np.ndarray:
    if not isinstance(points, list) or not points or not all(_number_list(p, 2) for p in points):
        raise DataError(str(path), f"{where}: points must be [[x, y], ...], got {points}")
    pts = np.asarray(points, dtype=np.float64)
    rows, cols = plane
    bad = (pts[:, 0] < 0) | (pts[:, 0] > cols - 1) | (pts[:, 1] < 0) | (pts[:, 1] > rows - 1)
    if bad.any():
        raise DataError(
            str(path),
            f"{where}: point {points[int(np.flatnonzero(bad)[0])]} outside the image "
            f"({cols} x {rows} pixels)",
        )
    return pts


def _to_slicing_frame(
    geometry: FileGeometry,
    image: LoadedImage,
    s_file: int | None,
    box: np.ndarray | None,
    points: np.ndarray | None,
) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """File-frame (slice, box, points) -> slicing-frame (slice, box, points)."""
    if image.slice_axis < 0:
        return -1, box, points
    if geometry.kind != "nifti":
        return int(s_file), box, points  # type: ignore[arg-type]
    f = geometry.file_axis(image.slice_axis)
    plane_axes = [a for a in range(3) if a != f]
    others = [a for a in range(3) if a != image.slice_axis]

    def move(xy: np.ndarray) -> tuple[int, np.ndarray]:
        idx = np.zeros((len(xy), 3))
        idx[:, f] = s_file
        idx[:, plane_axes[0]], idx[:, plane_axes[1]] = xy[:, 1], xy[:, 0]  # (row, col) = (y, x)
        ras = geometry.file_to_ras(idx)
        return int(round(ras[0, image.slice_axis])), np.stack(
            [ras[:, others[1]], ras[:, others[0]]], axis=1
        )

    s = -1
    if points is not None:
        s, points = move(points)
    if box is not None:
        s, corners = move(box.reshape(2, 2))
        box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
    return s, box, points
