"""Find the cases of a task folder (MSD / nnU-Net layout or a preset's own directories).

Layout (defaults; presets change ``images_dir``, ``labels_dir`` and ``label_name``)::

    root/
      dataset.json             optional: label names ("labels") and modality
      imagesTr/<case>.nii.gz   or <case>_0000.nii.gz (nnU-Net channel files), .nii, .png, .jpg,
                               or a folder of DICOM files (one series)
      labelsTr/<case>.nii.gz   or .png etc.; the same spatial grid as the image

Files and folders starting with ``.`` (e.g. the ``._*`` macOS files in MSD archives) are ignored.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sam_ft.data.types import CaseFiles
from sam_ft.errors import ConfigError, DataError

VOLUME_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif")
SUFFIXES = VOLUME_SUFFIXES + IMAGE_2D_SUFFIXES
_CHANNEL = re.compile(r"^(?P<base>.+)_(?P<channel>\d{4})$")


def split_name(name: str) -> tuple[str, str]:
    """``"liver_0.nii.gz"`` -> (``"liver_0"``, ``".nii.gz"``); suffix ``""`` when unsupported."""
    lower = name.lower()
    for suffix in SUFFIXES:
        if lower.endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, ""


def is_2d_file(path: str | Path) -> bool:
    """True for PNG / JPEG / BMP / TIFF / GIF files (read as single 2D images)."""
    return split_name(Path(path).name)[1] in IMAGE_2D_SUFFIXES


def _index(directory: Path) -> dict[str, Path]:
    """stem -> path of the supported files (and DICOM folders) in ``directory``."""
    out: dict[str, Path] = {}
    for p in sorted(directory.iterdir()):
        if p.name.startswith("."):
            continue
        stem, suffix = split_name(p.name)
        if suffix and p.is_file():
            out.setdefault(stem, p)
        elif p.is_dir() and not suffix:
            out.setdefault(p.name, p)  # a DICOM series folder
    return out


def case_id(stem: str, case_pattern: str | None) -> str:
    """Patient / study id of an image stem: group ``case`` (or 1) of ``case_pattern``, else stem."""
    if not case_pattern:
        return stem
    m = re.search(case_pattern, stem)
    if m is None:
        return stem
    if "case" in m.groupdict():
        return m.group("case")
    return m.group(1) if m.groups() else m.group(0)


def find_cases(root: str | Path, task: Mapping[str, Any]) -> list[CaseFiles]:
    """All cases of a task folder, sorted by image id.

    The image stem loses an nnU-Net channel suffix (``_0000``) when the label is named without it;
    of several channel files only ``_<task.channel:04d>`` is used. A case without a label file gets
    ``label=None`` (reported as a bad case when loaded, so ``on_error=skip`` can skip it).

    Raises:
        DataError: the images folder is missing or holds no supported file.
    """
    opts = task
    root = Path(root)
    images_dir = root / opts["images_dir"]
    if not images_dir.is_dir():
        raise DataError(
            str(images_dir), f"images folder not found; expected layout: {opts['layout']}"
        )
    label_dirs = opts["labels_dir"]
    label_dirs = [label_dirs] if isinstance(label_dirs, str) else list(label_dirs or [])
    label_index = [_index(root / d) if (root / d).is_dir() else {} for d in label_dirs]
    try:
        label_name = str(opts["label_name"])
        label_name.format(stem="x", case="x")
    except (KeyError, IndexError) as e:
        raise ConfigError(f"task.label_name may use {{stem}} and {{case}} only: {e}") from e

    def lookup(stem: str) -> list[Path | None]:
        name = label_name.format(stem=stem, case=case_id(stem, opts["case_pattern"]))
        return [idx.get(name) for idx in label_index]

    channel = int(opts.get("channel") or 0)
    cases: dict[str, CaseFiles] = {}
    for stem, path in _index(images_dir).items():
        labels = lookup(stem)
        m = _CHANNEL.match(stem)
        if m is not None and not any(labels):
            # nnU-Net channel file: keep only the configured channel.
            if int(m.group("channel")) != channel:
                continue
            stem = m.group("base")
            labels = lookup(stem)
        if stem in cases:
            continue
        cid = case_id(stem, opts["case_pattern"])
        if len(label_dirs) > 1:
            present = [str(p) for p in labels if p is not None]
            complete = len(present) == len(label_dirs)
            cases[stem] = CaseFiles(
                case=cid,
                image=str(path),
                label=present[0] if complete else None,
                image_id=stem,
                label_parts=present if complete else [],
            )
        else:
            label = labels[0] if labels else None
            cases[stem] = CaseFiles(
                case=cid,
                image=str(path),
                label=None if label is None else str(label),
                image_id=stem,
            )
    if not cases:
        raise DataError(str(images_dir), f"no image files found; expected layout: {opts['layout']}")
    return sorted(cases.values(), key=lambda c: c.image_id)
