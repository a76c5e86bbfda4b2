"""Predicted masks of one case: a compact store for 3D re-stacking, and PNG / NIfTI export.

Masks are (H, W) bool arrays indexed (row, col); a case's stack is (S, H, W) in the slicing frame
(slice, row, col), the frame of :class:`sam_ft.data.loading.CaseData.label_volume`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable
from pathlib import Path

import numpy as np

from sam_ft import bitmask
from sam_ft.atomic import atomic_path, atomic_write
from sam_ft.data.loading import CaseData


class CasePredictions:
    """Predicted masks of one case, bit-packed, keyed by (label, prompt, jitter) and slice.

    A case holds objects x strategies x jitter levels x slices masks; packing them 8 to a byte keeps
    a 100-slice 512 x 512 case with 3 objects and 21 prompt variants near 200 MB instead of 1.6 GB.

    Args:
        shape: (H, W) of every slice of the case.
    """

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = (int(shape[0]), int(shape[1]))
        self._masks: dict[Hashable, dict[int, np.ndarray]] = defaultdict(dict)

    def add(self, key: Hashable, slice_index: int, mask: np.ndarray) -> None:
        """Store the (H, W) bool prediction of object/variant ``key`` on ``slice_index``."""
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != self.shape:
            raise ValueError(f"mask {mask.shape} does not fit the case's slices {self.shape}")
        self._masks[key][int(slice_index)] = bitmask.pack(mask)

    def add_packed(self, key: Hashable, slice_index: int, packed: np.ndarray) -> None:
        """Store a prediction already packed as :meth:`add` packs it
        (:func:`sam_ft.bitmask.pack`, ``ceil(H * W / 8)`` bytes)."""
        packed = np.asarray(packed, dtype=np.uint8)
        if packed.shape != (bitmask.packed_bytes(self.shape),):
            raise ValueError(f"packed mask {packed.shape} does not fit the case's {self.shape}")
        self._masks[key][int(slice_index)] = packed

    def nbytes(self) -> int:
        """Bytes of the stored (packed) masks."""
        return sum(p.nbytes for masks in self._masks.values() for p in masks.values())

    def variants(self) -> list[Hashable]:
        """Stored keys, in insertion order."""
        return list(self._masks)

    def slices(self, key: Hashable) -> list[int]:
        """Slice indices with a stored prediction for ``key``, ascending."""
        return sorted(self._masks[key])

    def get(self, key: Hashable, slice_index: int) -> np.ndarray:
        """(H, W) bool prediction (all False where none was stored)."""
        packed = self._masks.get(key, {}).get(int(slice_index))
        if packed is None:
            return np.zeros(self.shape, dtype=bool)
        return bitmask.unpack(packed, self.shape)

    def stack(self, key: Hashable, num_slices: int, offset: int = 0) -> np.ndarray:
        """(num_slices, H, W) bool volume: stored slices at ``index - offset``, others empty."""
        out = np.zeros((int(num_slices), *self.shape), dtype=bool)
        for s in self._masks.get(key, {}):
            out[s - offset] = self.get(key, s)
        return out


def label_map(masks: Iterable[tuple[int, np.ndarray]], shape: tuple[int, ...]) -> np.ndarray:
    """Paint (label value, bool mask) pairs into one integer map, background 0.

    Predictions of different objects may overlap; they are painted in ascending label value, so
    the larger value wins a pixel. The dtype is uint8, or uint16 for values above 255.
    """
    pairs = sorted(masks, key=lambda p: p[0])
    top = max((v for v, _ in pairs), default=0)
    out = np.zeros(shape, dtype=np.uint8 if top < 256 else np.uint16)
    for value, mask in pairs:
        out[np.asarray(mask, dtype=bool)] = value
    return out


def write_png(path: str | Path, labels: np.ndarray) -> Path:
    """Write an (H, W) label map as a grey PNG (8- or 16-bit), pixel value = label value."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(labels))
    return atomic_write(path, lambda f: image.save(f, format="PNG"))


def write_nifti(path: str | Path, labels: np.ndarray, affine: np.ndarray) -> Path:
    """Write an (x, y, z) label volume with its (4, 4) voxel -> world (mm) affine as NIfTI."""
    import nibabel as nib

    path = Path(path)
    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(np.asarray(labels), np.asarray(affine, dtype=np.float64)), tmp)
    return path


def write_case_predictions(
    out_dir: str | Path,
    case_key: str,
    store: CasePredictions,
    prompts: Iterable[str],
    *,
    num_slices: int,
    is_3d: bool,
    case_data: CaseData | None = None,
    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0),
) -> list[Path]:
    """Write the unjittered predictions of one case, one label map per prompt strategy.

    Files: ``out_dir/<prompt>/<case>.png`` for a 2D image, ``out_dir/<prompt>/<case>.nii.gz`` for
    a volume. A volume is written in the loader's frame: when ``case_data`` (a ``CaseData``) is
    given, the (S, H, W) slicing-frame stack is moved back to its RAS (x, y, z) array with
    ``case_data.to_volume`` and saved with ``case_data.affine``, so it overlays the image in any
    viewer (the loader reorients to RAS and does not keep the file's own orientation, so the
    array may be stored in a different axis order than the source file). Without ``case_data``
    the stack is saved as (slice, row, col) with a diagonal affine from ``spacing``.

    Args:
        out_dir: ``<eval out_dir>/predictions/<model>``.
        case_key: the case (image) id, used as the file stem.
        store: predictions keyed by (label value, prompt, jitter name).
        prompts: strategies to write.
        num_slices: number of slices of the volume (1 for 2D).
        is_3d: volume (NIfTI) or 2D image (PNG).
        case_data: the case's ``CaseData`` when available.
        spacing: (slice, row, col) mm, used only without ``case_data``.
    """
    out_dir = Path(out_dir)
    written = []
    for prompt in prompts:
        keys = [k for k in store.variants() if k[1] == prompt and k[2] == "none"]
        if not keys:
            continue
        safe = str(case_key).replace("/", "_")
        if not is_3d:
            pairs = [(int(k[0]), store.get(k, store.slices(k)[0])) for k in keys]
            written.append(
                write_png(out_dir / prompt / f"{safe}.png", label_map(pairs, store.shape))
            )
            continue
        shape = (int(num_slices), *store.shape)
        stack = label_map([(int(k[0]), store.stack(k, num_slices)) for k in keys], shape)
        if case_data is not None:
            volume, affine = case_data.to_volume(stack), case_data.affine
        else:
            volume, affine = stack, np.diag([*map(float, spacing), 1.0])
        written.append(write_nifti(out_dir / prompt / f"{safe}.nii.gz", volume, affine))
    return written
