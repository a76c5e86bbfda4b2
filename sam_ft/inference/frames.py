"""Between an input file's own array and the loader's frames, for predictions written back.

The loader (:func:`sam_ft.data.loading.read_volume`) reorients volumes to RAS with MONAI's
``Orientation`` (a flip/permutation chosen by ``nibabel.io_orientation`` of the file's affine)
and :func:`sam_ft.data.slicing.to_slicing_frame` moves the slicing axis first. A prediction made
in that frame is written back in the file's own array order, shape and affine, and prompts given
in the file's own voxel indices are moved into it, with the same orientation.

Frames: the file's array (i, j, k); the RAS array (x, y, z); the slicing frame (slice, row, col).
Prompt points are (x, y) = (column, row).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sam_ft.atomic import atomic_path
from sam_ft.data.folder import is_2d_file


@dataclass
class FileGeometry:
    """The geometry of one input file.

    Attributes:
        kind: ``"2d"`` (PNG/JPEG/...: the loader's frame is the file's), ``"nifti"`` (written back
            in the file's own orientation) or ``"ras"`` (DICOM series and other volumes: written
            as NIfTI in the loader's RAS frame).
        shape: the file's spatial array shape ((H, W) for 2D, (i, j, k) or (i, j) for NIfTI).
        affine: (4, 4) voxel -> world (mm) of the file's array (NIfTI), else None.
        ornt: (3, 2) ``nibabel.io_orientation``: file axis -> (RAS axis, +1 / -1 flip).
        header: the NIfTI header (qform/sform codes, units are copied to the output).
    """

    kind: str
    shape: tuple[int, ...]
    affine: np.ndarray | None = None
    ornt: np.ndarray | None = None
    header: Any = None

    @property
    def spatial3(self) -> tuple[int, int, int]:
        """(i, j, k) of a volume file; a 2D NIfTI gets k = 1 as in the loader."""
        return (*self.shape, 1)[:3] if len(self.shape) < 3 else self.shape[:3]  # type: ignore

    def to_file(self, ras: np.ndarray) -> np.ndarray:
        """(x, y, z) RAS array -> the file's (i, j, k) array (or (i, j) for a 2D NIfTI)."""
        if self.kind != "nifti":
            return ras
        import nibabel as nib

        back = nib.orientations.ornt_transform(nib.orientations.axcodes2ornt("RAS"), self.ornt)
        out = nib.orientations.apply_orientation(ras, back)
        if out.shape != tuple(self.spatial3):
            raise ValueError(f"reoriented shape {out.shape} != file shape {self.spatial3}")
        return out.reshape(self.shape[:3]) if len(self.shape) < 3 else out

    def file_to_ras(self, index: np.ndarray) -> np.ndarray:
        """(N, 3) float voxel indices (i, j, k) of the file's array -> (N, 3) RAS array indices."""
        index = np.asarray(index, dtype=np.float64).reshape(-1, 3)
        if self.kind != "nifti":
            return index
        out = np.empty_like(index)
        shape = self.spatial3
        for f in range(3):
            axis, flip = int(self.ornt[f, 0]), self.ornt[f, 1]
            out[:, axis] = index[:, f] if flip > 0 else shape[f] - 1 - index[:, f]
        return out

    def file_axis(self, ras_axis: int) -> int:
        """The file's axis that becomes RAS axis ``ras_axis``."""
        if self.kind != "nifti":
            return ras_axis
        return int(np.flatnonzero(self.ornt[:, 0] == ras_axis)[0])


def file_geometry(path: str | Path) -> FileGeometry:
    """Read the geometry of an input (header only for NIfTI)."""
    path = Path(path)
    if is_2d_file(path):
        from PIL import Image

        with Image.open(path) as im:
            return FileGeometry("2d", (im.height, im.width))
    name = path.name.lower()
    if path.is_file() and name.endswith((".nii", ".nii.gz")):
        import nibabel as nib

        img = nib.load(str(path))
        affine = np.asarray(img.affine, dtype=np.float64)
        spatial = tuple(int(s) for s in img.shape[:3])
        return FileGeometry("nifti", spatial, affine, nib.io_orientation(affine), img.header)
    return FileGeometry("ras", ())


def write_label_volume(
    path: str | Path, labels: np.ndarray, geometry: FileGeometry, ras_affine: np.ndarray
) -> Path:
    """Write an (x, y, z) RAS label volume as NIfTI in the input's own geometry.

    For a NIfTI input the array is moved back to the file's axis order and flips, and saved with
    the file's affine, qform/sform codes and units: it overlays the input voxel for voxel. Other
    volumes (DICOM series) are written in the loader's RAS frame with ``ras_affine``.
    """
    import nibabel as nib

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if geometry.kind == "nifti":
        data = np.ascontiguousarray(geometry.to_file(labels))
        img = nib.Nifti1Image(data, geometry.affine)
        src = geometry.header
        if src is not None and hasattr(src, "get_qform"):
            img.header.set_qform(src.get_qform(), code=int(src["qform_code"]))
            img.header.set_sform(src.get_sform(), code=int(src["sform_code"]))
            img.header.set_xyzt_units(*src.get_xyzt_units())
    else:
        img = nib.Nifti1Image(np.ascontiguousarray(labels), np.asarray(ras_affine, np.float64))
    img.set_data_dtype(labels.dtype)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
    return path
