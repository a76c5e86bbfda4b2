"""Caches and checkpoints under faults: concurrent writers, truncated files. Issue #8, items 1
and 4. (Single-process damage to cache entries is covered in tests/data/test_cache.py and
tests/data/test_embedding_cache.py; two writers of the embedding cache there too.)"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
from pathlib import Path

import _cache_writer  # tests/reliability/_cache_writer.py: the spawned writer
import nibabel as nib
import numpy as np
import pytest
import torch
from partial_api import find_cases, load_case, slice_settings

from sam_ft.data.cache import CachedCase, SliceCache, slice_cache_key
from sam_ft.errors import CheckpointError
from sam_ft.model.builders import build_sam, build_sam_architecture
from sam_ft.model.download import fetch

TASK = {"intensity": {"mode": "percentile"}}
DATA = {"min_object_pixels": 5}
ROUNDS = 20


def _write_task(root: Path, n: int = 3) -> None:
    rng = np.random.default_rng(0)
    for i in range(n):
        image = rng.normal(0, 20, (32, 28, 5)).astype(np.float32)
        label = np.zeros((32, 28, 5), dtype=np.uint8)
        label[5 + i : 18 + i, 4:20, 1:4] = 1
        label[20:28, 10:26, 2:] = 2
        for folder, array in (("imagesTr", image), ("labelsTr", label)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, np.eye(4)), root / folder / f"c{i}.nii.gz")


def _entry(case) -> CachedCase:
    return CachedCase(load_case(case, TASK, DATA).slices, {"case": case.case})


def test_two_processes_filling_slice_cache_leave_only_valid_entries(tmp_path):
    root, cache_dir = tmp_path / "task", tmp_path / "cache"
    _write_task(root)
    settings = slice_settings(TASK, DATA)
    cases = find_cases(root, TASK)
    items = [(c.image_id, slice_cache_key(c, settings), _entry(c)) for c in cases]
    ctx = mp.get_context("spawn")  # fresh interpreters, as two separate jobs would be
    args = (str(cache_dir), items, ROUNDS)
    procs = [ctx.Process(target=_cache_writer.fill, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]

    cache = SliceCache(cache_dir)
    for case in cases:
        reference = _entry(case)
        got = cache.load(case.image_id, slice_cache_key(case, settings))
        assert got is not None and len(got.records) == len(reference.records)
        for a, b in zip(got.records, reference.records, strict=True):
            assert a.slice_index == b.slice_index and list(a.labels) == list(b.labels)
            np.testing.assert_array_equal(a.image, b.image)
            np.testing.assert_array_equal(a.masks, b.masks)
            np.testing.assert_array_equal(a.raw, b.raw)
    assert cache.corrupt == 0
    leftovers = [p.name for p in (cache_dir / "slices").iterdir() if p.suffix != ".npz"]
    assert leftovers == [] and len(list((cache_dir / "slices").iterdir())) == len(cases)


def test_writer_killed_midway_leaves_no_visible_entry(tmp_path):
    """A writer killed mid-write leaves only its temp file; readers never see a partial entry,
    and the next run computes and stores the entry."""
    root = tmp_path / "task"
    _write_task(root, n=1)
    (case,) = find_cases(root, TASK)
    cache, settings = SliceCache(tmp_path / "cache"), slice_settings(TASK, DATA)
    key = slice_cache_key(case, settings)
    path = cache.path(case.image_id, key)
    path.parent.mkdir(parents=True)
    (path.parent / f".{path.name}.killed.tmp").write_bytes(b"PK\x03\x04 half an entry")
    calls = []
    entry = cache.get_or_compute(case, settings, lambda: calls.append(1) or _entry(case))
    assert calls == [1] and cache.corrupt == 0 and path.is_file()
    assert len(SliceCache(tmp_path / "cache").load(case.image_id, key).records) == len(
        entry.records
    )


# --- checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory) -> Path:
    """A Lightning-style .ckpt of the tiny SAM (``state_dict`` with ``model.sam.`` prefixes)."""
    torch.manual_seed(0)
    sam = build_sam_architecture("tiny")
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    state = {f"model.sam.{k}": v for k, v in sam.state_dict().items()}
    torch.save({"state_dict": state, "epoch": 3, "global_step": 12}, path)
    return path


@pytest.mark.parametrize("keep", [0.5, 0.99])
def test_truncated_lightning_checkpoint_is_a_clear_error(tiny_ckpt, tmp_path, keep):
    cut = tmp_path / "cut.ckpt"
    data = tiny_ckpt.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(CheckpointError, match=r"cut\.ckpt.*truncated or corrupt"):
        build_sam("tiny", checkpoint=str(cut))


def test_truncated_download_in_cache_is_fetched_again(tiny_ckpt, tmp_path):
    """A weights file cut short in the cache (a killed copy, a full disk) fails its SHA-256
    and is fetched again rather than loaded."""
    digest = hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "w.ckpt").write_bytes(tiny_ckpt.read_bytes()[:1000])
    out = fetch(tiny_ckpt.as_uri(), "w.ckpt", digest, cache)
    assert hashlib.sha256(out.read_bytes()).hexdigest() == digest
    assert sorted(p.name for p in cache.iterdir()) == ["w.ckpt"]
