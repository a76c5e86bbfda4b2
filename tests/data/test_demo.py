"""The demo generator: deterministic, fast, reused, redone when killed, readable as a folder."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
from omegaconf import OmegaConf
from partial_api import find_cases, load_cases, make_splits, prepare_task

from sam_ft.data.demo import MARKER, ensure_demo, make_demo_case

CONF = Path(__file__).resolve().parents[2] / "conf"


def task_preset(cfg):
    """A task preset's task keys (presets like demo are global packages with a `task:` block)."""
    return cfg.task if "task" in cfg else cfg


def _task(name: str, data_dir: Path):
    cfg = OmegaConf.create({"paths": {"data_dir": str(data_dir)}})
    cfg.task = task_preset(OmegaConf.load(CONF / "task" / f"{name}.yaml"))
    return cfg.task


def test_generator_is_deterministic():
    a_img, a_lab = make_demo_case(3, seed=0)
    b_img, b_lab = make_demo_case(3, seed=0)
    np.testing.assert_array_equal(a_img, b_img)
    np.testing.assert_array_equal(a_lab, b_lab)
    assert a_img.shape == (96, 96, 16) and a_img.dtype == np.int16
    assert set(np.unique(a_lab)) == {0, 1, 2, 3}
    assert not np.array_equal(make_demo_case(4, seed=0)[1], a_lab)


def test_demo_task_generates_once_and_loads(tmp_path):
    task = _task("demo", tmp_path)
    root = prepare_task(task)
    assert root == tmp_path / "demo" and (root / MARKER).is_file()
    stamp = (root / "imagesTr" / "demo_000.nii.gz").stat().st_mtime_ns
    assert prepare_task(task) == root  # reused, not rewritten
    assert (root / "imagesTr" / "demo_000.nii.gz").stat().st_mtime_ns == stamp
    ondisk = nib.load(root / "imagesTr" / "demo_005.nii.gz")
    np.testing.assert_array_equal(np.asarray(ondisk.dataobj), make_demo_case(5)[0])
    assert np.allclose(ondisk.header.get_zooms(), (1.5, 1.5, 5.0))

    cases = find_cases(root, task)
    assert [c.case for c in cases] == [f"demo_{i:03d}" for i in range(8)]
    data = load_cases(cases, task, progress=False)
    assert len(data) == 8
    for d in data:
        assert d.modality == "CT" and d.slice_axis == 2 and d.spacing == (5.0, 1.5, 1.5)
        assert set(d.objects) == {"liver", "kidney", "lesion"}
        assert {n for s in d.slices for n in s.names} == {"liver", "kidney", "lesion"}
    splits = make_splits(cases, {"seed": 0})
    assert [len(splits[k]) for k in ("train", "val", "test")] == [5, 1, 2]


def test_objects_differ_from_their_surroundings(tmp_path):
    # Learnable: each object's mean grey level differs clearly from a ring just outside it.
    from scipy.ndimage import binary_dilation

    task = _task("demo", tmp_path)
    data = load_cases(find_cases(prepare_task(task), task)[:2], task, progress=False)
    for s in (s for d in data for s in d.slices):
        grey = s.image[..., 0].astype(float)
        for mask in s.masks:
            ring = binary_dilation(mask, iterations=3) & ~mask & ~s.masks.any(0)
            if ring.sum() > 20:
                assert abs(grey[mask].mean() - grey[ring].mean()) > 15


def test_killed_generation_is_redone(tmp_path):
    root = ensure_demo(tmp_path / "demo")
    (root / MARKER).unlink()
    (root / "labelsTr" / "demo_007.nii.gz").write_bytes(b"half-written")
    ensure_demo(root)
    assert (root / MARKER).is_file()
    lab = np.asarray(nib.load(root / "labelsTr" / "demo_007.nii.gz").dataobj)
    np.testing.assert_array_equal(lab, make_demo_case(7)[1])


def test_demo_2d_png_task(tmp_path):
    task = _task("demo_2d", tmp_path)
    root = prepare_task(task)
    assert sorted(p.suffix for p in (root / "imagesTr").iterdir()) == [".png"] * 8
    data = load_cases(find_cases(root, task), task, progress=False)
    assert len(data) == 8 and all(d.slices[0].slice_index == -1 for d in data)
    assert data[0].slices[0].names == ["ventricle", "tumour"]
    assert data[0].slices[0].image.shape == (128, 128, 3)
