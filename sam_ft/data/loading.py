"""Load cases (image + label files) into checked arrays and the paper's 2D slices.

Volumes (NIfTI, DICOM series folders, MetaImage ``.mha``, NRRD) are read with MONAI (``LoadImage``,
``EnsureChannelFirst``, ``Orientation`` to RAS); 2D images (PNG, JPEG, TIFF, ...) with Pillow as
(row, col) arrays. Every problem with an input raises :class:`~sam_ft.errors.DataError` naming the
file; :func:`load_cases` either re-raises it (``data.on_error=raise``) or records it in a
:class:`~sam_ft.data.skips.SkipLog` and goes on (``skip``).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from sam_ft.data.folder import is_2d_file
from sam_ft.data.intensity import case_bounds, prepare_slice
from sam_ft.data.readers import check_file, read_2d, read_volume, spacing_from_affine
from sam_ft.data.skips import SkipLog, raise_or_skip
from sam_ft.data.slicing import choose_slice_axis, from_slicing_frame, slice_records
from sam_ft.data.tasks import (
    dataset_label_groups,
    object_groups,
    read_dataset_json,
    task_modality,
)
from sam_ft.data.types import CaseFiles, SliceRecord
from sam_ft.errors import DataError

log = logging.getLogger(__name__)


@dataclass
class CaseData:
    """One loaded case: its kept slices plus what 3D evaluation and NIfTI export need.

    Attributes:
        case: case (patient) id used by the splits.
        image_id: image file stem (equals ``case`` unless several images share a case).
        image_path: the image file (or DICOM folder) read.
        label_path: the label file read (the first part when merged from several masks).
        slices: the kept :class:`SliceRecord` (slices with >= 1 object above the size threshold).
        label_volume: (S, R, C) integer label map in the slicing frame, every label value and
            every slice (nothing filtered), 0 = background.
        objects: {object name: label values} of the objects found in the case.
        spacing: (slice, row, col) voxel spacing in mm.
        affine: (4, 4) voxel (x, y, z) -> world mm of the RAS-oriented volume (identity for 2D).
        slice_axis: axis of the RAS volume that was sliced (-1 for a 2D image).
        modality: e.g. ``"CT"``.
    """

    case: str
    image_id: str
    image_path: str
    label_path: str
    slices: list[SliceRecord]
    label_volume: np.ndarray
    objects: dict[str, list[int]]
    spacing: tuple[float, float, float]
    affine: np.ndarray
    slice_axis: int
    modality: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def is_3d(self) -> bool:
        """False for a single 2D image."""
        return self.slice_axis >= 0

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        """(S, R, C) shape of the case in the slicing frame ((1, H, W) for a 2D image)."""
        return tuple(int(s) for s in self.label_volume.shape)  # type: ignore[return-value]

    def gt_volume(self, label: str | int) -> np.ndarray:
        """(S, R, C) bool ground truth of one object over the whole case, unfiltered.

        Args:
            label: an object name (``task.labels`` key) or a label value (its own group, or the
                group it is the first value of).
        """
        if isinstance(label, str):
            if label not in self.objects:
                raise KeyError(
                    f"case {self.case} has no object {label!r}; has {list(self.objects)}"
                )
            values = self.objects[label]
        else:
            values = next((v for v in self.objects.values() if v[0] == int(label)), [int(label)])
        return np.isin(self.label_volume, values)

    def to_volume(self, stack: np.ndarray) -> np.ndarray:
        """(S, R, C) array in the slicing frame -> (x, y, z) RAS volume matching ``affine``."""
        if not self.is_3d:
            return stack
        return from_slicing_frame(stack, self.slice_axis)


@dataclass
class VolumeImages:
    """Every slice of a case's image (``eval.mode=propagate`` reaches slices without objects),
    mapped to uint8 RGB only when read: ``images[s]`` -> (R, C, 3) uint8, the loader's
    :func:`~sam_ft.data.intensity.prepare_slice` of slice ``s``.

    Attributes:
        raw: (S, R, C) or (S, R, C, 3) raw intensities in the slicing frame.
        intensity: ``task.intensity``; bounds: the case's (low, high), or None (per slice).
    """

    raw: np.ndarray
    intensity: Mapping[str, Any] | None
    bounds: tuple[float, float] | None

    def __len__(self) -> int:
        return len(self.raw)

    def __getitem__(self, s: int) -> np.ndarray:
        return prepare_slice(np.asarray(self.raw[s], dtype=np.float32), self.intensity, self.bounds)


# ---------------------------------------------------------------------------------------------
# Reading files


@functools.lru_cache(maxsize=32)
def _meta_cached(root: str, mtime: float) -> dict:
    return read_dataset_json(root)


def dataset_meta(case: CaseFiles, task: Mapping[str, Any]) -> dict:
    """dataset.json of the task folder holding ``case`` ({} when absent)."""
    depth = len(Path(task["images_dir"]).parts)
    parents = Path(case.image).absolute().parents
    if depth >= len(parents):
        return {}
    root = parents[depth]
    path = root / "dataset.json"
    return _meta_cached(str(root), path.stat().st_mtime if path.is_file() else 0.0)


def _read_label(case: CaseFiles, opts: Mapping[str, Any], is_2d: bool) -> tuple[np.ndarray, Any]:
    """Label map (H, W) for 2D or (x, y, z) for volumes, plus the affine (None for 2D files)."""
    parts = case.label_parts or [case.label]
    merged, affine = None, None
    for k, path in enumerate(parts, start=1):
        check_file(path)
        if is_2d_file(path):
            lab = read_2d(path, is_label=True)
        else:
            lab, affine = read_volume(path, is_label=True)
            if lab.shape[0] != 1:
                raise DataError(path, f"label has {lab.shape[0]} channels, expected 1")
            lab = lab[0]
            if is_2d:
                lab = np.squeeze(lab)
        lab = _binarize(lab, opts["label_binarize"], path) if opts["label_binarize"] else lab
        if len(parts) > 1:  # binary part masks become values 1..n
            part = _binarize(lab, opts["label_binarize"] or True, path).astype(bool)
            if merged is None:
                merged = np.zeros(part.shape, dtype=np.uint8)
            elif merged.shape != part.shape:
                raise DataError(path, f"mask shape {part.shape} differs from {merged.shape}")
            merged[part] = k
        else:
            merged = lab
    if merged.ndim == 3 and is_2d:
        raise DataError(str(case.label), "RGB label map; set task.label_binarize for 0/255 masks")
    return merged, affine


def _binarize(label: np.ndarray, setting: Any, path: str) -> np.ndarray:
    """0/255 (or JPEG-noisy) masks -> 0/1: ``> 0`` for ``true``, ``> setting`` for a number."""
    threshold = 0 if setting is True else float(setting)
    if label.ndim == 3 and label.shape[-1] in (3, 4) and label.dtype != bool:
        label = label[..., :3].max(axis=-1)  # coloured masks: any channel on
    return (np.asarray(label) > threshold).astype(np.uint8)


def _check_label_values(label: np.ndarray, path: str) -> np.ndarray:
    if np.issubdtype(label.dtype, np.floating):
        if not np.isfinite(label).all():
            raise DataError(path, "label contains NaN or Inf")
        rounded = np.rint(label)
        if np.abs(label - rounded).max() > 1e-3:
            raise DataError(path, "label values are not integers")
        label = rounded
    if label.min() < 0:
        raise DataError(path, f"negative label value {int(label.min())}")
    top = int(label.max())
    dtype = np.uint8 if top < 256 else np.uint16 if top < 65536 else np.int64
    return label.astype(dtype)


# ---------------------------------------------------------------------------------------------
# Cases


def _read_pair(
    case: CaseFiles, opts: Mapping[str, Any], dopts: Mapping[str, Any], meta: Mapping[str, Any]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float, float], int]:
    """The image and label of ``case``, checked against each other, in the slicing frame.

    Returns:
        image (S, R, C) or (S, R, C, 3) float32, label (S, R, C), the image's (4, 4) affine, the
        (slice, row, col) spacing and the slicing axis of the RAS volume (-1 for a 2D image,
        whose S is 1).
    """
    label_path = case.label
    channel = int(opts.get("channel") or 0)
    if is_2d_file(case.image):
        img = read_2d(case.image).astype(np.float32)
        lab, _ = _read_label(case, opts, is_2d=True)
        if img.shape[:2] != lab.shape:
            raise DataError(label_path, f"label shape {lab.shape} != image shape {img.shape[:2]}")
        image, affine, spacing, axis = img[None], np.eye(4), (1.0, 1.0, 1.0), -1
        label = lab[None]
    else:
        vol, affine = read_volume(case.image)
        # A single-channel file is used as is: its channel was already chosen by file name
        # (nnU-Net ``_000<channel>``); ``task.channel`` picks within 4D images.
        if vol.shape[0] == 1:
            channel = 0
        if not 0 <= channel < vol.shape[0]:
            raise DataError(
                case.image, f"task.channel={channel} but image has {vol.shape[0]} channels"
            )
        vol = vol[channel]
        lab, lab_affine = _read_label(case, opts, is_2d=False)
        if vol.shape != lab.shape:
            raise DataError(label_path, f"label shape {lab.shape} != image shape {vol.shape}")
        if lab_affine is not None and not np.allclose(
            affine, lab_affine, atol=float(dopts["affine_atol"]), rtol=0
        ):
            raise DataError(label_path, "label affine (orientation/spacing/origin) != image affine")
        sp = spacing_from_affine(affine)
        modality = task_modality(opts, meta)
        axis = choose_slice_axis(sp, vol.shape, modality, opts["slice_axis"])
        image = np.moveaxis(vol, axis, 0)
        label = np.moveaxis(lab, axis, 0)
        others = [a for a in range(3) if a != axis]
        spacing = (float(sp[axis]), float(sp[others[0]]), float(sp[others[1]]))
    return image, label, affine, spacing, axis


def _check_label_groups(
    label: np.ndarray,
    label_path: str,
    opts: Mapping[str, Any],
    groups: dict | None,
    named: Mapping[str, Any],
) -> np.ndarray:
    """``label`` with the task's ``ignore_labels`` set to 0; a value that is neither an object
    of the task (``groups``, or dataset.json's ``named`` labels) nor ignored raises
    :class:`DataError`."""
    if groups is not None or named:
        allowed = {0, *(int(v) for v in opts["ignore_labels"])}
        for values in (groups or named).values():
            allowed.update(values)
        present = {int(v) for v in np.unique(label)}
        extra = sorted(present - allowed)
        if extra:
            raise DataError(
                label_path, f"label values {extra} outside the task's labels {sorted(allowed)}"
            )
    if groups is not None and opts["ignore_labels"]:
        label = np.where(np.isin(label, opts["ignore_labels"]), 0, label).astype(label.dtype)
    return label


def load_case(
    case: CaseFiles,
    task: Mapping[str, Any],
    data: Mapping[str, Any],
    meta: Mapping[str, Any] | None = None,
    keep_images: bool = False,
) -> CaseData:
    """Read, check and slice one case.

    Args:
        case: the files (from :func:`sam_ft.data.folder.find_cases`).
        task: ``task`` config (see :mod:`sam_ft.data.tasks`).
        data: ``data`` config (``min_object_pixels``, ``affine_atol``).
        meta: the folder's dataset.json; read from ``<root>/dataset.json`` when None.
        keep_images: keep every slice's image (``extra["images"]``, a :class:`VolumeImages`),
            for ``eval.mode=propagate``.

    Raises:
        DataError: missing, empty, unreadable or truncated file; image/label shape or affine
            mismatch; 4D channel out of range; NaN/Inf; label values outside the task's labels;
            no object left after filtering. The message names the file.
    """
    opts, dopts = task, data
    if meta is None:
        meta = dataset_meta(case, opts)
    if case.label is None:
        raise DataError(case.image, "label file missing (no matching file in the labels folder)")
    check_file(case.image)
    label_path = case.label
    image, label, affine, spacing, axis = _read_pair(case, opts, dopts, meta)

    if not np.isfinite(image).all():
        raise DataError(case.image, "image contains NaN or Inf intensities")
    label = _check_label_values(label, label_path)

    groups = object_groups(opts, meta)
    named = dataset_label_groups(meta) or {}
    names = {v[0]: n for n, v in named.items() if len(v) == 1}
    label = _check_label_groups(label, label_path, opts, groups, named)

    modality = task_modality(opts, meta)
    # scope=slice (the official code's per-image percentiles): bounds are computed per slice.
    bounds = case_bounds(image, opts["intensity"])
    records = slice_records(
        image,
        label,
        case=case.case,
        image_id=case.image_id,
        bounds=bounds,
        intensity=opts["intensity"],
        spacing=spacing,
        groups=groups,
        min_object_pixels=int(dopts["min_object_pixels"]),
        modality=modality,
        names=names,
        is_3d=axis >= 0,
    )
    if not records:
        raise DataError(
            label_path,
            f"no object larger than data.min_object_pixels={dopts['min_object_pixels']} pixels "
            "in any slice",
        )
    if groups is None:
        present = sorted({int(v) for r in records for v in r.labels})
        groups = {names.get(v, f"label_{v}"): [v] for v in present}
    return CaseData(
        case=case.case,
        image_id=case.image_id,
        image_path=case.image,
        label_path=label_path,
        slices=records,
        label_volume=label,
        objects=groups,
        spacing=spacing,
        affine=affine,
        slice_axis=axis,
        modality=modality,
        extra={"images": VolumeImages(image, opts["intensity"], bounds)} if keep_images else {},
    )


def slice_settings(task: Mapping[str, Any], data: Mapping[str, Any]) -> dict:
    """Every option the output of :func:`load_case` depends on (JSON-able), for cache keys."""
    opts, dopts = task, data
    keys = (
        "modality", "intensity", "labels", "ignore_labels", "slice_axis", "channel",
        "label_binarize", "case_pattern",
    )  # fmt: skip
    return {
        **{k: opts[k] for k in keys},
        "min_object_pixels": int(dopts["min_object_pixels"]),
        "affine_atol": float(dopts["affine_atol"]),
        "orientation": "RAS",
    }


def iter_cases(
    cases: Iterable[CaseFiles],
    task: Mapping[str, Any],
    data: Mapping[str, Any],
    skip_log: SkipLog | None = None,
    progress: bool = True,
) -> Iterator[CaseData]:
    """Yield the loaded cases one at a time (memory stays at one case), honouring ``on_error``.

    ``data.on_error=raise`` re-raises the first :class:`DataError`; ``skip`` records it in
    ``skip_log`` (a fresh in-memory log when None) and continues with the next case.
    """
    dopts = data
    skip_log = skip_log if skip_log is not None else SkipLog()
    cases = list(cases)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(cases), desc=f"loading {task['name']}", unit="case")
    try:
        for case in cases:
            try:
                loaded = load_case(case, task, dopts)
            except DataError as e:
                raise_or_skip(dopts["on_error"], case.case, e, skip_log)
                loaded = None
            if bar is not None:
                bar.update(1)
            if loaded is not None:
                yield loaded
    finally:
        if bar is not None:
            bar.close()


def load_cases(
    cases: Iterable[CaseFiles],
    task: Mapping[str, Any],
    data: Mapping[str, Any],
    skip_log: SkipLog | None = None,
    progress: bool = True,
) -> list[CaseData]:
    """Load a whole split (see :func:`iter_cases`); a list of the good cases, in order."""
    return list(iter_cases(cases, task, data, skip_log, progress))
