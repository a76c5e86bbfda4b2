"""Read one image or label file into an array: 2D images with Pillow as (row, col) arrays,
volumes (NIfTI, DICOM series folders, MetaImage ``.mha``, NRRD) with MONAI's readers, reoriented
to RAS. A file at fault raises :class:`~sam_ft.errors.DataError` naming it; out of memory and bugs
propagate as they are (``NOT_THE_FILES_FAULT``).
"""

from __future__ import annotations

import functools
import logging
import warnings
from pathlib import Path

import numpy as np

from sam_ft.errors import DataError

log = logging.getLogger(__name__)

_RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))


def check_file(path: str) -> None:
    p = Path(path)
    if not p.exists():
        raise DataError(path, "file not found")
    if p.is_file() and p.stat().st_size == 0:
        raise DataError(path, "empty file (0 bytes)")
    if p.is_dir() and not any(q for q in p.iterdir() if not q.name.startswith(".")):
        raise DataError(path, "empty DICOM folder")


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


# Failures that say nothing about the file: out of memory, or a bug (ours or a library's). They
# are raised as they are, with the file added as a note, never reported as a bad file (and never
# skipped by data.on_error=skip).
NOT_THE_FILES_FAULT: tuple[type[BaseException], ...] = (
    MemoryError,
    RecursionError,
    TypeError,
    AttributeError,
    NameError,
    AssertionError,
    NotImplementedError,
)

_shown_warnings: set[tuple[str, str]] = set()


def _raise_if_not_the_files_fault(e: BaseException, path: str) -> None:
    if isinstance(e, NOT_THE_FILES_FAULT):
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(f"while reading {path}")
        raise e


def _show_once(caught: list[warnings.WarningMessage], path: str) -> None:
    """Log each distinct warning from reading a file once per process (MONAI, nibabel and ITK
    warn about e.g. non-orthogonal affines or odd headers: a cause worth seeing, not hiding)."""
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, ImportWarning)):
            continue  # about library code (lazy imports while reading), not about the file
        key = (w.category.__name__, str(w.message))
        if key not in _shown_warnings:
            _shown_warnings.add(key)
            log.warning("%s while reading %s: %s", w.category.__name__, path, w.message)


def read_2d(path: str, is_label: bool = False) -> np.ndarray:
    """A 2D image file as (H, W) or (H, W, 3) array (row, col order; alpha dropped).

    Palette images are returned as indices when ``is_label`` (label maps), as RGB otherwise.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("RGBA", "CMYK", "YCbCr", "LAB", "HSV") or (
                im.mode == "P" and not is_label
            ):
                im = im.convert("RGB")
            elif im.mode in ("LA", "PA") or (im.mode == "1"):
                im = im.convert("L")
            arr = np.asarray(im)
    except Exception as e:
        _raise_if_not_the_files_fault(e, path)
        raise DataError(path, f"unreadable image ({_first_line(e)})") from e
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return arr


@functools.lru_cache(maxsize=8)
def _loader(reader: str | None, is_label: bool):
    """One MONAI ``LoadImage`` per reader (building one registers readers: slow and chatty).

    Only building it is silenced (optional-import noise from MONAI's dependencies); warnings
    while reading a file are shown, once each (:func:`read_volume`)."""
    from monai.transforms import LoadImage

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return LoadImage(image_only=True, reader=reader, dtype=None if is_label else np.float32)


@functools.lru_cache(maxsize=8)
def _reader(name: str):
    """One instance of the MONAI reader class ``name`` (e.g. ``"NibabelReader"``)."""
    import monai.data

    return getattr(monai.data, name)()


def read_volume(path: str, is_label: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI / DICOM / MetaImage / NRRD volume as (C, x, y, z) array oriented to RAS, and its
    (4, 4) affine.

    Images are float32; labels keep their stored dtype. A 2D NIfTI gets a z axis of length 1.
    """
    from monai.transforms import EnsureChannelFirst, Orientation

    name = Path(path).name.lower()
    if Path(path).is_dir():
        reader = "PydicomReader"
    elif name.endswith((".nii", ".nii.gz")):
        reader = "NibabelReader"
    elif name.endswith((".mha", ".nrrd")):
        reader = "ITKReader"  # MONAI's reader for MetaImage / NRRD (LPS -> RAS affine)
    else:
        reader = None
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            # Only the chosen reader: given by name alone, MONAI falls back to every other
            # installed reader when it fails, and ITK reads a truncated .nii.gz without error,
            # as zeros.
            load = _loader(reader, is_label)
            x = EnsureChannelFirst()(load(path, reader=_reader(reader)) if reader else load(path))
            if x.ndim == 3:  # (C, x, y): a 2D NIfTI
                x = x[..., None]
            x = Orientation(axcodes="RAS", labels=_RAS_LABELS)(x)
        _show_once(caught, path)
    except ImportError as e:
        extra = "itk-io" if reader == "ITKReader" else "'sam_ft[dicom]'"
        raise DataError(path, f"cannot read ({e}); pip install {extra}") from e
    except Exception as e:
        _raise_if_not_the_files_fault(e, path)
        raise DataError(path, f"unreadable or truncated file ({_first_line(e)})") from e
    try:
        arr = np.asarray(x.detach().cpu().numpy())
        affine = np.asarray(x.affine.detach().cpu().numpy(), dtype=np.float64)
    except Exception as e:
        _raise_if_not_the_files_fault(e, path)
        raise DataError(path, f"unreadable or truncated file ({_first_line(e)})") from e
    return arr, affine


def spacing_from_affine(affine: np.ndarray) -> np.ndarray:
    # NIfTI stores float32: round so 0.8 mm reads back as 0.8, not 0.800000011920929.
    return np.round(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)), 6)
