"""Slice cache: hits read no NIfTI; edits and setting changes invalidate; damage recomputes."""

from __future__ import annotations

import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from sam_ft.atomic import atomic_write
from sam_ft.data.cache import CachedCase, SliceCache, slice_cache_key
from sam_ft.data.types import CaseFiles, SliceRecord

SETTINGS = {"window": [0.95, 99.5], "min_object_pixels": 5, "axis": 2}


def _write_case(root: Path, name: str = "case0", shift: int = 0) -> CaseFiles:
    """A (16, 12, 3) volume with a 6x5 bright block of label 1 in slices 1 and 2."""
    img = np.zeros((16, 12, 3), dtype=np.float32)
    lab = np.zeros((16, 12, 3), dtype=np.uint8)
    img[4 + shift : 10 + shift, 3:8, 1:] = 100.0
    lab[4 + shift : 10 + shift, 3:8, 1:] = 1
    nib.save(nib.Nifti1Image(img, np.eye(4)), root / f"{name}_img.nii.gz")
    nib.save(nib.Nifti1Image(lab, np.eye(4)), root / f"{name}_lab.nii.gz")
    return CaseFiles(name, str(root / f"{name}_img.nii.gz"), str(root / f"{name}_lab.nii.gz"))


class CountingLoader:
    """Reads a case's NIfTI files into SliceRecords; ``calls`` counts the reads."""

    def __init__(self, case: CaseFiles) -> None:
        self.case = case
        self.calls = 0

    def __call__(self) -> CachedCase:
        self.calls += 1
        img = np.asarray(nib.load(self.case.image).dataobj, dtype=np.float32)
        lab = np.asarray(nib.load(self.case.label).dataobj)
        records = []
        for z in range(img.shape[2]):
            values = [v for v in np.unique(lab[..., z]) if v != 0]
            if not values:
                continue
            raw = img[..., z]
            grey = (255 * raw / max(raw.max(), 1)).astype(np.uint8)
            records.append(
                SliceRecord(
                    case=self.case.case,
                    slice_index=z,
                    image=np.repeat(grey[..., None], 3, axis=2),
                    masks=np.stack([lab[..., z] == v for v in values]),
                    labels=np.array(values, dtype=np.int64),
                    names=[f"label_{v}" for v in values],
                    spacing=(0.5, 0.75),
                    modality="CT",
                    raw=raw,
                    num_slices=img.shape[2],
                )
            )
        return CachedCase(records, {"shape": list(img.shape)}, {"label_volume": lab})


def _same(a: list[SliceRecord], b: list[SliceRecord]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert (x.case, x.slice_index, x.names) == (y.case, y.slice_index, y.names)
        assert (x.modality, x.image_id) == (y.modality, y.image_id)
        assert tuple(x.spacing) == tuple(y.spacing) and x.num_slices == y.num_slices
        np.testing.assert_array_equal(x.image, y.image)
        np.testing.assert_array_equal(x.masks, y.masks)
        np.testing.assert_array_equal(x.labels, y.labels)
        np.testing.assert_array_equal(x.raw, y.raw)
        assert x.masks.dtype == bool


def test_second_load_and_next_run_read_no_nifti(tmp_path):
    case = _write_case(tmp_path)
    loader = CountingLoader(case)
    cache = SliceCache(tmp_path / "cache")
    first = cache.get_or_compute(case, SETTINGS, loader)
    second = cache.get_or_compute(case, SETTINGS, loader)
    assert loader.calls == 1 and (cache.hits, cache.misses) == (1, 1)
    assert len(first.records) == 2 and first.meta == second.meta == {"shape": [16, 12, 3]}
    _same(first.records, second.records)
    lab = second.arrays["label_volume"]
    assert lab.dtype == np.uint8 and lab.shape == (16, 12, 3)
    np.testing.assert_array_equal(lab, first.arrays["label_volume"])
    # A new process (the next run) finds the same entry.
    third = SliceCache(tmp_path / "cache").get_or_compute(case, SETTINGS, loader)
    assert loader.calls == 1
    _same(first.records, third.records)


def test_source_edit_invalidates(tmp_path):
    case = _write_case(tmp_path)
    loader = CountingLoader(case)
    cache = SliceCache(tmp_path / "cache")
    before = cache.get_or_compute(case, SETTINGS, loader)
    _write_case(tmp_path, shift=2)
    # Filesystem timestamps can be coarser than one test step; make the edit visibly later.
    st = os.stat(case.label)
    os.utime(case.label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    after = cache.get_or_compute(case, SETTINGS, loader)
    assert loader.calls == 2
    assert not np.array_equal(before.records[0].masks, after.records[0].masks)


def test_settings_change_invalidates(tmp_path):
    case = _write_case(tmp_path)
    loader = CountingLoader(case)
    cache = SliceCache(tmp_path / "cache")
    cache.get_or_compute(case, SETTINGS, loader)
    cache.get_or_compute(case, {**SETTINGS, "min_object_pixels": 50}, loader)
    assert loader.calls == 2
    assert slice_cache_key(case, SETTINGS) != slice_cache_key(case, {**SETTINGS, "axis": 0})
    reordered = dict(reversed(SETTINGS.items()))
    assert slice_cache_key(case, SETTINGS) == slice_cache_key(case, reordered)


@pytest.mark.parametrize("damage", ["truncate", "flip", "empty"])
def test_damaged_entry_is_recomputed(tmp_path, damage):
    case = _write_case(tmp_path)
    loader = CountingLoader(case)
    cache = SliceCache(tmp_path / "cache")
    good = cache.get_or_compute(case, SETTINGS, loader)
    path = cache.path(case.image_id, slice_cache_key(case, SETTINGS))
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":
        i = data.index(b"image_0.npy") + 200  # inside the first image's stored bytes
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
    else:
        data = b""
    path.write_bytes(data)
    again = cache.get_or_compute(case, SETTINGS, loader)
    assert loader.calls == 2 and cache.corrupt == 1
    _same(good.records, again.records)
    # The recomputed entry replaced the damaged one.
    SliceCache(tmp_path / "cache").get_or_compute(case, SETTINGS, loader)
    assert loader.calls == 2


def test_disabled_cache_always_computes(tmp_path):
    case = _write_case(tmp_path)
    loader = CountingLoader(case)
    cache = SliceCache(None)
    cache.get_or_compute(case, SETTINGS, loader)
    cache.get_or_compute(case, SETTINGS, loader)
    assert loader.calls == 2 and not cache.enabled


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "entry.bin"
    atomic_write(target, lambda f: f.write(b"old"))

    def broken(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["entry.bin"]
