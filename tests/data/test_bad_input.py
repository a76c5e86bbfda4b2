"""Bad input: ``raise`` stops with one line naming the file; ``skip`` logs it and keeps the rest."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from partial_api import find_cases, load_cases

from sam_ft.data.skips import SkipLog
from sam_ft.errors import ConfigError, DataError

SHAPE = (20, 20, 3)


def _good(h):
    return h.simple_case(shape=SHAPE, box=(slice(2, 12), slice(2, 12), slice(0, 3)))


def _break(kind: str, root: Path, h) -> tuple[Path, str]:
    """Write the bad case ``bad`` of ``kind``; returns (file that must be named, reason regex)."""
    img_p, lab_p = root / "imagesTr" / "bad.nii.gz", root / "labelsTr" / "bad.nii.gz"
    image, label = _good(h)
    h.write_nifti(img_p, image)
    h.write_nifti(lab_p, label)
    if kind == "unreadable":
        img_p.write_bytes(b"this is not a nifti file at all" * 10)
        return img_p, "unreadable"
    if kind == "truncated":
        raw = img_p.read_bytes()
        img_p.write_bytes(raw[: len(raw) // 2])
        return img_p, "truncated"
    if kind == "truncated_png":
        img_p.unlink()
        lab_p.unlink()
        png = h.write_png(root / "imagesTr" / "bad.png", np.full((20, 20), 9))
        h.write_png(root / "labelsTr" / "bad.png", np.ones((20, 20)))
        png.write_bytes(png.read_bytes()[:40])
        return png, "unreadable"
    if kind == "empty":
        img_p.write_bytes(b"")
        return img_p, "empty file"
    if kind == "empty_gzip":
        img_p.write_bytes(gzip.compress(b""))
        return img_p, "unreadable"
    if kind == "shape":
        h.write_nifti(lab_p, label[:, :10])
        return lab_p, "shape"
    if kind == "affine":
        h.write_nifti(lab_p, label, spacing=(1.0, 1.0, 2.5))
        return lab_p, "affine"
    if kind == "label_missing":
        lab_p.unlink()
        return img_p, "label file missing"
    if kind == "label_values":
        label[0:2, 0:2, 0] = 7
        h.write_nifti(lab_p, label)
        return lab_p, r"label values \[7\] outside"
    if kind == "nan":
        image[0, 0, 0] = np.nan
        h.write_nifti(img_p, image)
        return img_p, "NaN or Inf"
    if kind == "inf":
        image[0, 0, 0] = np.inf
        h.write_nifti(img_p, image)
        return img_p, "NaN or Inf"
    if kind == "no_object":
        small = np.zeros(SHAPE, np.uint8)
        small[0:5, 0:10, 1] = 1  # 50 px: dropped
        h.write_nifti(lab_p, small)
        return lab_p, "no object larger than"
    raise AssertionError(kind)


KINDS = [
    "unreadable",
    "truncated",
    "truncated_png",
    "empty",
    "empty_gzip",
    "shape",
    "affine",
    "label_missing",
    "label_values",
    "nan",
    "inf",
    "no_object",
]


@pytest.fixture
def broken(tmp_path, h):
    def make(kind: str):
        root = tmp_path / kind
        for name in ("good0", "good1"):
            image, label = _good(h)
            h.write_nifti(root / "imagesTr" / f"{name}.nii.gz", image)
            h.write_nifti(root / "labelsTr" / f"{name}.nii.gz", label)
        (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "organ"}}))
        path, reason = _break(kind, root, h)
        task = {"root": str(root), "slice_axis": 2, "intensity": {"mode": "percentile"}}
        return root, task, path, reason

    return make


@pytest.mark.parametrize("kind", KINDS)
def test_raise_names_the_file_in_one_line(broken, kind):
    root, task, path, reason = broken(kind)
    cases = find_cases(root, task)
    with pytest.raises(DataError, match=reason) as err:
        load_cases(cases, task, {"on_error": "raise"}, progress=False)
    assert err.value.path == str(path)
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", KINDS)
def test_skip_logs_the_file_and_keeps_good_cases(broken, kind, tmp_path, h):
    root, task, path, reason = broken(kind)
    log = SkipLog(tmp_path / "run")
    (tmp_path / "run").mkdir()
    loaded = load_cases(find_cases(root, task), task, {"on_error": "skip"}, log, progress=False)
    assert [d.case for d in loaded] == ["good0", "good1"]
    rows = h.read_skip_log(tmp_path / "run" / "skipped.csv")
    assert [(r.case, r.path) for r in rows] == [("bad", str(path))]
    assert __import__("re").search(reason, rows[0].reason)


def test_bad_on_error_value():
    with pytest.raises(ConfigError, match="on_error"):
        load_cases([], {"root": "."}, {"on_error": "ignore"}, progress=False)
