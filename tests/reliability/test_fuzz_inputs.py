"""Fuzzing the loaders and the folder task (hypothesis, bounded and derandomized for CI).

Random bytes, shapes, dtypes, NaNs, 1-pixel images, huge or negative label values and mismatched
image/label pairs, written as real NIfTI / PNG files: every outcome is a valid case or our own
``SamFtError`` naming the file. Issue #8, item 3.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from partial_api import find_cases, load_case, prepare_task
from PIL import Image

from sam_ft.data.loading import CaseData
from sam_ft.errors import DataError, SamFtError

FUZZ = settings(
    max_examples=25,
    deadline=None,
    derandomize=True,  # the same examples on every CI run
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
DATA = {"min_object_pixels": 2}
DTYPES = ["uint8", "int16", "uint16", "int32", "float32", "float64"]


def _check_outcome(root: Path, task: dict) -> None:
    """Load every case of ``root``: a consistent CaseData, or a SamFtError naming a file."""
    try:
        cases = find_cases(root, task)
    except SamFtError as e:
        assert str(root) in str(e), e
        return
    for case in cases:
        try:
            loaded = load_case(case, task, DATA)
        except DataError as e:
            names = {Path(case.image).name, Path(case.label or case.image).name}
            assert any(n in str(e) for n in names), f"{e!r} names neither of {names}"
            assert Path(e.path).name in names
            continue
        _check_valid(loaded)


def _check_valid(case: CaseData) -> None:
    s, r, c = case.volume_shape
    assert case.slices and len(case.objects) >= 1
    for rec in case.slices:
        k = len(rec.labels)
        assert rec.image.shape == (r, c, 3) and rec.image.dtype == np.uint8
        assert rec.masks.shape == (k, r, c) and rec.masks.dtype == bool
        assert len(rec.names) == k and k >= 1
        assert (rec.masks.reshape(k, -1).sum(axis=1) > DATA["min_object_pixels"]).all()
        assert rec.raw is None or np.isfinite(rec.raw).all()
        assert 0 <= rec.slice_index < s or (rec.slice_index == -1 and not case.is_3d)


def _folder(tmp: Path, suffix: str) -> tuple[Path, Path]:
    (tmp / "imagesTr").mkdir(parents=True)
    (tmp / "labelsTr").mkdir(parents=True)
    return tmp / "imagesTr" / f"case{suffix}", tmp / "labelsTr" / f"case{suffix}"


class _Tmp:
    """A fresh folder per example (hypothesis reruns the body; pytest's tmp_path is shared)."""

    def __enter__(self) -> Path:
        self.path = Path(tempfile.mkdtemp(prefix="fuzz_"))
        return self.path

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def _label_like(draw, shape) -> np.ndarray:
    """Mostly small label values, sometimes huge or negative, sometimes NaN (float labels)."""
    dtype = draw(st.sampled_from(["uint8", "uint16", "int16", "int32", "float32"]))
    values = st.sampled_from([0, 0, 0, 1, 1, 2, 3, 255, 70_000, 2**31 - 1, -1, 1.5])
    label = draw(hnp.arrays(np.float64, shape, elements=values))
    if dtype.startswith("float") and draw(st.booleans()):
        label.flat[0] = np.nan
    return label.astype(dtype) if not dtype.startswith("float") else label.astype(np.float32)


@st.composite
def volume_pairs(draw):
    """(image, label) arrays for NIfTI files: random shapes (1 voxel up), dtypes, NaN/Inf,
    and sometimes a label of another shape."""
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=12))
    dtype = draw(st.sampled_from(DTYPES))
    image = draw(hnp.arrays(np.float64, shape, elements=st.floats(-2000, 3000, width=32)))
    if dtype.startswith("float") and draw(st.booleans()):
        image.flat[draw(st.integers(0, image.size - 1))] = draw(
            st.sampled_from([np.nan, np.inf, -np.inf])
        )
    image = (
        image.astype(dtype)
        if dtype.startswith("float")
        else image.astype(np.int64).clip(np.iinfo(dtype).min, np.iinfo(dtype).max).astype(dtype)
    )
    label_shape = shape
    if draw(st.integers(0, 4)) == 0:  # mismatched pair
        label_shape = draw(hnp.array_shapes(min_dims=2, max_dims=3, min_side=1, max_side=12))
    label = _label_like(draw, label_shape)
    if draw(st.booleans()) and min(label_shape) >= 1 and label.size >= 4:
        # Often a real object, so valid cases are exercised too.
        label[..., :] = 0
        label.reshape(-1)[: max(3, label.size // 2)] = 1
    return image, label


@given(pair=volume_pairs(), zoom=st.sampled_from([0.5, 1.0, 3.0]))
@FUZZ
def test_nifti_pairs_load_or_fail_naming_the_file(pair, zoom):
    image, label = pair
    with _Tmp() as tmp:
        img_path, lab_path = _folder(tmp, ".nii.gz")
        affine = np.diag([zoom, 1.0, 1.0, 1.0])
        nib.save(nib.Nifti1Image(image, affine), img_path)
        nib.save(nib.Nifti1Image(label, affine), lab_path)
        _check_outcome(tmp, {"intensity": {"mode": "percentile"}})


@st.composite
def png_pairs(draw):
    h, w = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    channels = draw(st.sampled_from([None, 3, 4]))
    shape = (h, w) if channels is None else (h, w, channels)
    image = draw(hnp.arrays(np.uint8, shape))
    lh, lw = (h, w) if draw(st.integers(0, 4)) else (draw(st.integers(1, 24)), w)
    label = draw(hnp.arrays(np.uint8, (lh, lw), elements=st.sampled_from([0, 0, 1, 2, 255])))
    mode = draw(st.sampled_from(["L", "I;16", "P"]))
    return image, label, mode


@given(pair=png_pairs(), binarize=st.sampled_from([False, True, 127]))
@FUZZ
def test_png_pairs_load_or_fail_naming_the_file(pair, binarize):
    image, label, mode = pair
    with _Tmp() as tmp:
        img_path, lab_path = _folder(tmp, ".png")
        Image.fromarray(image).save(img_path)
        lab = Image.fromarray(label)
        lab = lab.convert(mode) if mode != "P" else lab.convert("P")
        lab.save(lab_path)
        _check_outcome(tmp, {"label_binarize": binarize})


@given(
    image_bytes=st.binary(min_size=0, max_size=600),
    label_bytes=st.binary(min_size=0, max_size=600),
    suffix=st.sampled_from([".nii.gz", ".nii", ".png", ".jpg", ".tif"]),
    keep_prefix=st.booleans(),
)
@FUZZ
def test_random_bytes_in_a_task_folder(image_bytes, label_bytes, suffix, keep_prefix):
    """Garbage files, or a valid file's first bytes followed by garbage, through the folder
    task (prepare_task -> find_cases -> load_case)."""
    with _Tmp() as tmp:
        img_path, lab_path = _folder(tmp, suffix)
        if keep_prefix:  # a real header, then random bytes: a truncated/corrupt file
            good = tmp / f"good{suffix}"
            if suffix.startswith(".nii"):
                nib.save(nib.Nifti1Image(np.ones((4, 4, 2), np.float32), np.eye(4)), good)
            else:
                Image.fromarray(np.ones((4, 4), np.uint8)).save(good)
            head = good.read_bytes()[:60]
            good.unlink()
            image_bytes = head + image_bytes
        img_path.write_bytes(image_bytes)
        lab_path.write_bytes(label_bytes)
        task = {"source": "folder", "root": str(tmp)}
        assert prepare_task(task) == tmp
        _check_outcome(tmp, task)
