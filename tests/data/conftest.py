"""Helpers that write real NIfTI / PNG task folders for the data tests (no mocks)."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from sam_ft.data.skips import SKIPPED_CSV, SkipEntry


def write_nifti(path: Path, array: np.ndarray, spacing=(1.0, 1.0, 1.0), affine=None) -> Path:
    """Save ``array`` (x, y, z[, c]) with a diagonal affine of ``spacing`` (or ``affine``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if affine is None:
        affine = np.diag([*spacing, 1.0])
    nib.save(nib.Nifti1Image(np.asarray(array), affine), path)
    return path


def write_png(path: Path, array: np.ndarray) -> Path:
    """Save an (H, W) or (H, W, 3) uint8 array as PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.asarray(array, dtype=np.uint8)).save(path)
    return path


def box_label(shape, boxes: dict[int, tuple]) -> np.ndarray:
    """uint8 label map with value v on the slice expression ``boxes[v]``."""
    label = np.zeros(shape, dtype=np.uint8)
    for value, index in boxes.items():
        label[index] = value
    return label


@pytest.fixture
def nifti_folder(tmp_path: Path) -> Callable[..., Path]:
    """Factory: ``nifti_folder({case: (image, label)}, spacing=..., labels=...)`` -> task root.

    Writes ``imagesTr/<case>.nii.gz`` and ``labelsTr/<case>.nii.gz`` (+ dataset.json when
    ``labels`` or ``modality`` is given).
    """

    def make(cases: dict, spacing=(1.0, 1.0, 1.0), labels=None, modality=None, name="task"):
        root = tmp_path / name
        for case, (image, label) in cases.items():
            write_nifti(root / "imagesTr" / f"{case}.nii.gz", image, spacing)
            if label is not None:
                write_nifti(root / "labelsTr" / f"{case}.nii.gz", label, spacing)
        (root / "imagesTr").mkdir(parents=True, exist_ok=True)
        meta = {}
        if labels is not None:
            meta["labels"] = {"0": "background", **{str(k): v for k, v in labels.items()}}
        if modality is not None:
            meta["modality"] = {"0": modality}
        if meta:
            (root / "dataset.json").write_text(json.dumps(meta))
        return root

    return make


def simple_case(shape=(24, 20, 4), value=1, box=(slice(4, 12), slice(5, 15), slice(1, 3))):
    """A float32 volume of 0 with 100 inside ``box`` and the matching uint8 label."""
    image = np.zeros(shape, dtype=np.float32)
    image[box] = 100.0
    return image, box_label(shape, {value: box})


def read_skip_log(path: str | Path) -> list[SkipEntry]:
    """A ``skipped.csv`` (or the one in a folder) read back as ``SkipEntry`` rows."""
    path = Path(path)
    if path.is_dir():
        path = path / SKIPPED_CSV
    with open(path, newline="") as f:
        return [SkipEntry(r["case"], r["path"], r["reason"]) for r in csv.DictReader(f)]


class Helpers:
    """The writers above, reachable from tests through the ``h`` fixture."""

    write_nifti = staticmethod(write_nifti)
    write_png = staticmethod(write_png)
    box_label = staticmethod(box_label)
    simple_case = staticmethod(simple_case)
    read_skip_log = staticmethod(read_skip_log)


@pytest.fixture
def h() -> type[Helpers]:
    return Helpers
