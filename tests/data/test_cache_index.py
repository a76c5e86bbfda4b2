"""The slice-cache index (issue #28, items 1 and 2): an unchanged cache starts from its saved,
memory-mapped index with one ``stat`` per entry and reads no entry; damage is found when a
slice is read (one line), and the next start verifies and recomputes that entry; a changed case
is the only one read again; ``sam-ft-cache verify`` reads everything on demand."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from partial_api import prepare_task

from sam_ft.data.cache import _verified_header
from sam_ft.data.cache_check import main as cache_main
from sam_ft.data.datamodule import SamDataModule
from sam_ft.data.tasks import data_options, task_options
from sam_ft.errors import DataError
from sam_ft.model.preprocess import SamTransform
from sam_ft.prompts.train_sampling import BoxPrompts


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    task = OmegaConf.to_container(OmegaConf.load("conf/task/demo.yaml").task)
    root = tmp_path_factory.mktemp("data") / "demo"
    return prepare_task({**task, "root": str(root)})


def _dm(root: Path, tmp_path: Path, run: str) -> SamDataModule:
    task = OmegaConf.to_container(OmegaConf.load("conf/task/demo.yaml").task)
    data = {"cache_dir": str(tmp_path / "cache"), "seed": 0, "batch_size": 2, "prep_workers": 1}
    dm = SamDataModule(
        task_options({**task, "root": str(root)}), data_options(data), SamTransform(32),
        BoxPrompts(), 1, tmp_path / run,
        progress=False,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def _damage_in_place(path: str) -> None:
    """Flip a byte of the first image's stored bytes, keeping size, mtime and inode (bit rot)."""
    st = os.stat(path)
    with zipfile.ZipFile(path) as zf:
        info = zf.getinfo("image_0.npy")
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 30 + len(info.filename) + 60)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns


def test_unchanged_start_reads_no_entry_damage_is_found_on_read(demo_root, tmp_path):
    root = tmp_path / "demo"
    shutil.copytree(demo_root, root)
    first = _dm(root, tmp_path, "run1")
    assert first.slice_cache.misses == 8
    train = first.records("train")
    damaged, good = train[0], train[0].load()
    _damage_in_place(damaged.path)
    # Another case's source edited: its key changes, it alone is read again.
    edited = next(e for e in first.case_entries("val"))
    image = next((root / "imagesTr").glob(f"{edited.image_id}.*"))
    st = os.stat(image)
    os.utime(image, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    again = _dm(root, tmp_path, "run2")
    # The damaged entry was not read at start (it would have been recomputed): one stat each.
    assert (again.slice_cache.hits, again.slice_cache.misses) == (7, 1)
    with pytest.raises(DataError, match=r"slice cache entry unreadable after indexing.*rerun"):
        again.records("train")[0].load()
    # The failed read marked it: the next start verifies it whole and recomputes it alone.
    third = _dm(root, tmp_path, "run3")
    assert (third.slice_cache.hits, third.slice_cache.misses) == (7, 1)
    fixed = third.records("train")[0].load()
    np.testing.assert_array_equal(fixed.image, good.image)
    np.testing.assert_array_equal(fixed.masks, good.masks)
    assert (_dm(root, tmp_path, "run4").slice_cache.misses) == 0


def test_index_columns_equal_the_entry_headers_and_pickle_as_a_path(demo_root, tmp_path):
    dm = _dm(demo_root, tmp_path, "run")
    for split in ("train", "val", "test"):
        index = dm.records(split)
        n = 0
        for entry in dm.case_entries(split):
            with zipfile.ZipFile(entry.path) as zf, zf.open("header.npy") as f:
                key = json.loads(str(np.lib.format.read_array(f)[()]))["key"]
            for i, s in enumerate(_verified_header(Path(entry.path), key)["slices"]):
                ref = index[n]
                assert (ref.path, ref.index, ref.case, ref.slice_index) == (
                    entry.path, i, s["case"], s["slice_index"],
                )  # fmt: skip
                assert ref.labels.tolist() == s["labels"] and ref.names == s["names"]
                assert list(ref.image_shape) == s["image_shape"] and ref.digest == s["digest"]
                assert list(ref.masks_shape) == s["masks_shape"]
                assert list(ref.spacing) == s["spacing"] and ref.modality == s["modality"]
                assert (ref.num_slices, ref.slice_spacing, ref.image_id, ref.has_raw) == (
                    s["num_slices"], s["slice_spacing"], s["image_id"], s["has_raw"],
                )  # fmt: skip
                n += 1
        assert n == len(index)
        # Columns, memory-mapped from the cache: a worker or rank gets the file's name.
        assert isinstance(index.rows, np.memmap)
        blob = pickle.dumps(index)
        assert len(blob) < 1000
        assert pickle.loads(blob).rows.tobytes() == index.rows.tobytes()


def test_verify_command_reads_every_entry(demo_root, tmp_path, capsys):
    dm = _dm(demo_root, tmp_path, "run")
    cache = tmp_path / "cache"
    assert cache_main(["verify", str(cache)]) == 0
    assert "8 of 8 slice-cache entries verified; 0 damaged" in capsys.readouterr().out
    path = dm.records("test")[0].path
    _damage_in_place(path)
    assert cache_main(["verify", str(cache)]) == 1
    out = capsys.readouterr().out
    assert f"{path}: " in out and "1 damaged" in out
    # Marked: the next start recomputes it (its stamp alone would have passed).
    assert _dm(demo_root, tmp_path, "run2").slice_cache.misses == 1
    assert cache_main(["verify", str(tmp_path / "nowhere")]) == 2
    assert "no slices/ folder" in capsys.readouterr().err
