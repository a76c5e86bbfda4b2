"""The inputs of ``predict.py``: which files to predict, the label map or prompts file that goes
with each, and an image read as the loader reads it (RAS, slicing axis, intensity), without a
label."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sam_ft.data.folder import IMAGE_2D_SUFFIXES, VOLUME_SUFFIXES, is_2d_file, split_name
from sam_ft.data.intensity import case_bounds, prepare_slice
from sam_ft.data.readers import read_2d, read_volume
from sam_ft.data.slicing import choose_slice_axis
from sam_ft.errors import ConfigError, DataError

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Inputs


def _is_input_file(path: Path) -> bool:
    return path.is_file() and split_name(path.name)[1] in (*VOLUME_SUFFIXES, *IMAGE_2D_SUFFIXES)


def list_inputs(path: str | Path) -> list[Path]:
    """The images of ``input=``: a file, a DICOM series folder, or a folder of them.

    A folder that holds image files or sub-folders is a collection (sub-folders are DICOM
    series); a folder of other files only is one DICOM series.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"input={path}: no such file or folder")
    if path.is_file():
        if not _is_input_file(path):
            raise ConfigError(
                f"input={path}: not a NIfTI/PNG/JPEG/TIFF/BMP image (suffixes "
                f"{', '.join((*VOLUME_SUFFIXES, *IMAGE_2D_SUFFIXES))}) nor a DICOM folder"
            )
        return [path]
    entries = [p for p in sorted(path.iterdir()) if not p.name.startswith(".")]
    items = [p for p in entries if _is_input_file(p) or p.is_dir()]
    if items:
        return items
    if entries:
        return [path]  # one DICOM series
    raise ConfigError(f"input={path}: the folder is empty")


def stem_of(path: Path) -> str:
    return split_name(path.name)[0]


def companion(base: str | Path | None, image: Path, single: bool, suffixes: Sequence[str]) -> Path:
    """The labels/prompts file of ``image``: ``base`` itself for a single input, else the file
    of the same stem in folder ``base``."""
    base = Path(base).expanduser()  # type: ignore[arg-type]
    if single and not base.is_dir():
        return base
    if not base.is_dir():
        raise ConfigError(f"{base}: with a folder input this must be a folder (same file stems)")
    stem = stem_of(image)
    # nnU-Net names images <case>_0000 and their labels <case>.
    stems = (stem, re.sub(r"_\d{4}$", "", stem))
    for wanted in stems:
        for p in sorted(base.iterdir()):
            if split_name(p.name)[0] == wanted and (
                p.is_dir() or p.name.lower().endswith(suffixes)
            ):
                return p
    raise DataError(str(base / stem), f"no file for input {image.name} in {base}")


# ---------------------------------------------------------------------------------------------
# Loading an image without labels (the loader's steps, as load_case does them)


@dataclass
class LoadedImage:
    """An input in the slicing frame.

    Attributes:
        raw: (S, R, C) or (S, R, C, 3) float32 intensities (S = 1 for a 2D image).
        intensity: ``task.intensity``.
        bounds: (low, high) of the whole image's intensity mapping, or None when computed per
            slice (:func:`sam_ft.data.intensity.case_bounds`).
        slice_axis: RAS axis that was sliced (-1 for 2D).
        ras_affine: (4, 4) voxel -> world of the RAS array (identity for 2D).
    """

    raw: np.ndarray
    intensity: dict
    bounds: tuple[float, float] | None
    slice_axis: int
    ras_affine: np.ndarray

    @property
    def num_slices(self) -> int:
        return int(self.raw.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.raw.shape[1]), int(self.raw.shape[2])

    def slice_image(self, s: int) -> np.ndarray:
        """(H, W, 3) uint8 image of slice ``s``, by the loader's own function."""
        return prepare_slice(self.raw[s], self.intensity, self.bounds)


def load_image(path: Path, task: Mapping[str, Any]) -> LoadedImage:
    """Read an image as :func:`sam_ft.data.loading.load_case` does, without a label."""
    from sam_ft.data.readers import spacing_from_affine

    opts = task
    if is_2d_file(path):
        img = read_2d(str(path)).astype(np.float32)
        raw, axis, affine = img[None], -1, np.eye(4)
    else:
        vol, affine = read_volume(str(path))
        channel = 0 if vol.shape[0] == 1 else int(opts.get("channel") or 0)
        if not 0 <= channel < vol.shape[0]:
            raise DataError(str(path), f"channel={channel} but the image has {vol.shape[0]}")
        vol = vol[channel]
        axis = choose_slice_axis(
            spacing_from_affine(affine), vol.shape, str(opts.get("modality") or ""),
            opts["slice_axis"],
        )  # fmt: skip
        raw = np.moveaxis(vol, axis, 0)
    if not np.isfinite(raw).all():
        raise DataError(str(path), "image contains NaN or Inf intensities")
    intensity = dict(opts["intensity"] or {})
    return LoadedImage(raw, intensity, case_bounds(raw, intensity), axis, affine)
