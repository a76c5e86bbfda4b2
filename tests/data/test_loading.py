"""Folder layouts, 2D PNG, 4D channels, orientation, presets and the MSD download path."""

from __future__ import annotations

import hashlib
import tarfile
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from partial_api import find_cases, load_case, load_cases, prepare_task

from sam_ft.data import tasks as tasks_module
from sam_ft.data.tasks import DECATHLON_TASKS, task_options
from sam_ft.errors import DataError

CONF = Path(__file__).resolve().parents[2] / "conf"


def task_preset(cfg):
    """A task preset's task keys (presets like demo are global packages with a `task:` block)."""
    return cfg.task if "task" in cfg else cfg


def plain(node) -> dict:
    """A composed group as the plain mapping a task module hands the library (resolved)."""
    return OmegaConf.to_container(node, resolve=True)


def test_png_folder_with_0_255_masks(tmp_path, h):
    root = tmp_path / "polyps"
    for i in range(2):
        img = np.zeros((20, 30, 3), dtype=np.uint8)
        img[..., 0], img[..., 1] = 200, 10 * i  # RGB kept as RGB
        mask = np.zeros((20, 30), dtype=np.uint8)
        mask[5:15, 5:20] = 255
        h.write_png(root / "imagesTr" / f"img{i}.png", img)
        h.write_png(root / "labelsTr" / f"img{i}.png", mask)
    h.write_png(root / "imagesTr" / "._img0.png", np.zeros((2, 2)))  # macOS junk, ignored
    task = {"root": str(root), "intensity": {"mode": "none"}, "label_binarize": True}
    cases = find_cases(root, task)
    assert [c.case for c in cases] == ["img0", "img1"]
    data = load_cases(cases, task, progress=False)
    s = data[1].slices[0]
    assert s.slice_index == -1 and s.num_slices == 1 and s.spacing == (1.0, 1.0)
    assert s.image.shape == (20, 30, 3) and s.image[0, 0].tolist() == [200, 10, 0]
    assert s.names == ["label_1"] and s.masks[0].sum() == 150
    assert data[1].volume_shape == (1, 20, 30) and not data[1].is_3d


def test_4d_channel_selection(nifti_folder, h):
    image = np.zeros((16, 16, 2, 3), dtype=np.float32)
    for c in range(3):
        image[4:12, 4:12, :, c] = 100.0 * (c + 1)
    label = h.box_label((16, 16, 2), {1: (slice(4, 12), slice(4, 12), slice(0, 2))})
    root = nifti_folder({"mr": (image, label)})
    task = {"root": str(root), "channel": 2, "slice_axis": 2, "intensity": {"mode": "none"}}
    data = load_case(find_cases(root, task)[0], task, {"min_object_pixels": 10})
    assert data.slices[0].raw[5, 5] == 300.0
    with pytest.raises(DataError, match="channel=5"):
        load_case(find_cases(root, {**task, "channel": 5})[0], {**task, "channel": 5})


def test_nnunet_channel_files_and_case_id(tmp_path, h):
    root = tmp_path / "nn"
    image, label = h.simple_case()
    h.write_nifti(root / "imagesTr" / "pat_0000.nii.gz", image)
    h.write_nifti(root / "imagesTr" / "pat_0001.nii.gz", image * 3)
    h.write_nifti(root / "labelsTr" / "pat.nii.gz", label)
    cases = find_cases(root, {"root": str(root)})
    assert [(c.case, Path(c.image).name) for c in cases] == [("pat", "pat_0000.nii.gz")]
    cases = find_cases(root, {"root": str(root), "channel": 1})
    assert Path(cases[0].image).name == "pat_0001.nii.gz"
    data = load_case(cases[0], {"root": str(root), "channel": 1, "intensity": {"mode": "none"}})
    assert data.slices[0].raw.max() == 300.0


def test_case_pattern_groups_images_of_one_patient(tmp_path, h):
    root = tmp_path / "derm"
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[2:12, 2:12] = 1
    for stem in ["p1_a", "p1_b", "p2_a"]:
        h.write_png(root / "images" / f"{stem}.jpg", np.full((16, 16), 90))
        h.write_png(root / "masks" / f"{stem}_seg.png", mask)
    task = {
        "root": str(root),
        "images_dir": "images",
        "labels_dir": "masks",
        "label_name": "{stem}_seg",
        "case_pattern": r"^(?P<case>p\d+)_",
        "intensity": {"mode": "none"},
    }
    cases = find_cases(root, task)
    assert [(c.case, c.image_id) for c in cases] == [("p1", "p1_a"), ("p1", "p1_b"), ("p2", "p2_a")]
    data = load_cases(cases, task, progress=False)
    assert [(d.case, d.slices[0].image_id) for d in data][1] == ("p1", "p1_b")


def test_label_parts_merged(tmp_path, h):
    root = tmp_path / "cxr"
    h.write_png(root / "CXR_png" / "x1.png", np.full((20, 20), 120))
    left, right = np.zeros((20, 20), np.uint8), np.zeros((20, 20), np.uint8)
    left[2:18, 1:9], right[2:18, 11:19] = 255, 255
    h.write_png(root / "ManualMask" / "leftMask" / "x1.png", left)
    h.write_png(root / "ManualMask" / "rightMask" / "x1.png", right)
    preset = task_preset(OmegaConf.load(CONF / "task" / "montgomery_cxr.yaml"))
    task = OmegaConf.to_container(preset)
    task["root"] = str(root)
    data = load_cases(find_cases(root, task), task, progress=False)[0]
    assert data.slices[0].names == ["left_lung", "right_lung"]
    assert data.slices[0].masks.sum(axis=(1, 2)).tolist() == [128, 128]


def test_volumes_oriented_to_ras(tmp_path, h):
    # Stored with a flipped x axis (LAS): after loading, image and label flip together.
    image, label = h.simple_case(box=(slice(0, 8), slice(0, 10), slice(0, 4)))
    affine = np.diag([-2.0, 1.0, 3.0, 1.0])
    h.write_nifti(tmp_path / "t" / "imagesTr" / "c.nii.gz", image, affine=affine)
    h.write_nifti(tmp_path / "t" / "labelsTr" / "c.nii.gz", label, affine=affine)
    task = {"root": str(tmp_path / "t"), "slice_axis": 2}
    data = load_case(find_cases(tmp_path / "t", task)[0], task)
    assert np.all(np.diag(data.affine)[:3] > 0)
    assert data.spacing == (3.0, 2.0, 1.0)
    gt = data.gt_volume(1)[0]
    assert gt[-8:, :10].all() and gt.sum() == 80  # object moved from the first to the last rows
    s = data.slices[0]
    assert (s.raw[s.masks[0]] == 100).all()


def test_all_presets_parse(tmp_path):
    names = sorted(p.stem for p in (CONF / "task").glob("*.yaml"))
    for name in [*DECATHLON_TASKS, "kvasir_seg", "isic2018", "montgomery_cxr", "drive_vessels"]:
        assert name in names
    for name in names:
        cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}})
        cfg.task = task_preset(OmegaConf.load(CONF / "task" / f"{name}.yaml"))
        opts = task_options(plain(cfg.task))
        assert opts["name"] == name
        if opts["source"] == "decathlon":
            assert opts["decathlon_task"] == DECATHLON_TASKS[name.removesuffix("_merged")]
            assert opts["root"] == str(tmp_path / opts["decathlon_task"])


def test_presets_make_one_object_per_label_value(tmp_path):
    """The study's rule: each label value is one object, so no value belongs to two objects,
    except in the documented ``*_merged`` variants (liver = liver + tumour)."""

    def preset(path):
        cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}})
        cfg.task = task_preset(OmegaConf.load(path))
        return task_options(plain(cfg.task))

    for path in sorted((CONF / "task").glob("*.yaml")):
        opts = preset(path)
        if opts["labels"] is None:
            continue
        groups = list(opts["labels"].values())
        if path.stem.endswith("_merged"):
            assert any(len(g) > 1 for g in groups), path.stem
        else:
            assert all(len(g) == 1 for g in groups), (path.stem, groups)
    liver = preset(CONF / "task" / "liver_ct.yaml")
    assert liver["labels"] == {"liver": [1], "liver_tumour": [2]}
    merged = preset(CONF / "task" / "liver_ct_merged.yaml")
    assert merged["labels"] == {"liver": [1, 2], "liver_tumour": [2]}


def test_msd_ct_presets_use_the_studys_percentile_rule():
    """The MSD CT presets map intensities with the study's per-slice percentile rule, the
    peer-work window one override away (task.intensity.mode=window)."""
    presets = 0
    for path in sorted((CONF / "task").glob("*.yaml")):
        cfg = task_preset(OmegaConf.load(path))
        if str(cfg.get("modality") or "").upper() != "CT":
            continue
        if cfg.get("source") == "decathlon":
            presets += 1
            assert cfg.intensity.mode == "percentile" and cfg.intensity.scope == "slice"
            # The peer-work window is one override away: task.intensity.mode=window.
            assert cfg.intensity.width > 0 and cfg.intensity.level is not None
    assert presets >= 4  # liver, spleen, pancreas, colon, lung, hepatic vessel


def test_liver_preset_loads_liver_and_tumour_as_two_objects(nifti_folder):
    label = np.zeros((20, 20, 1), dtype=np.uint8)
    label[2:18, 2:18] = 1
    label[6:12, 6:12] = 2  # tumour inside the liver
    image = np.random.default_rng(0).normal(size=label.shape).astype(np.float32)
    root = nifti_folder({"liver_0": (image, label)})
    task = {**OmegaConf.to_container(OmegaConf.load(CONF / "task" / "liver_ct.yaml"))}
    task.update(root=str(root), source="folder")
    data = load_case(find_cases(root, task)[0], task, {"min_object_pixels": 10})
    rec = data.slices[0]
    assert rec.names == ["liver", "liver_tumour"]
    assert rec.masks[0].sum() == 16 * 16 - 36 and rec.masks[1].sum() == 36
    assert not (rec.masks[0] & rec.masks[1]).any()


@pytest.mark.parametrize("name", ["kvasir_seg", "isic2018", "montgomery_cxr", "drive_vessels"])
def test_missing_2d_dataset_names_path_and_layout(tmp_path, name):
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}})
    cfg.task = task_preset(OmegaConf.load(CONF / "task" / f"{name}.yaml"))
    with pytest.raises(DataError) as err:
        prepare_task(plain(cfg.task))
    assert str(tmp_path) in str(err.value) and "expected layout" in str(err.value)
    assert cfg.task.layout in str(err.value)


def test_drive_preset_pairs_training_and_manual(tmp_path, h):
    root = tmp_path / "DRIVE"
    vessels = np.zeros((20, 20), np.uint8)
    vessels[:, 8:12] = 255
    for n in (21, 22):
        h.write_png(root / "training" / "images" / f"{n}_training.tif", np.full((20, 20, 3), 80))
        h.write_png(root / "training" / "1st_manual" / f"{n}_manual1.gif", vessels)
    cfg = OmegaConf.create({"paths": {"data_dir": str(tmp_path)}})
    cfg.task = task_preset(OmegaConf.load(CONF / "task" / "drive_vessels.yaml"))
    cases = find_cases(prepare_task(plain(cfg.task)), plain(cfg.task))
    assert [(c.case, c.image_id) for c in cases] == [("21", "21_training"), ("22", "22_training")]
    data = load_cases(cases, plain(cfg.task), progress=False)
    assert data[0].slices[0].names == ["retinal_vessel"] and data[0].slices[0].masks.sum() == 80


def _msd_archive(tmp_path: Path, h) -> tuple[Path, str]:
    src = tmp_path / "src" / "Task09_Spleen"
    image, label = h.simple_case()
    for i in range(2):
        h.write_nifti(src / "imagesTr" / f"spleen_{i}.nii.gz", image)
        h.write_nifti(src / "labelsTr" / f"spleen_{i}.nii.gz", label)
    archive = tmp_path / "Task09_Spleen.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname="Task09_Spleen")
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


def test_decathlon_download_from_local_mirror(tmp_path, h):
    # MONAI's real download_url (file:// URL): checksum, extraction, then a folder task.
    archive, md5 = _msd_archive(tmp_path, h)
    task = {"name": "spleen_ct", "source": "decathlon", "url": archive.as_uri(), "md5": md5}
    root = prepare_task(task, data_dir=tmp_path / "data")
    assert root == tmp_path / "data" / "Task09_Spleen"
    assert len(find_cases(root, task)) == 2
    with pytest.raises(DataError, match="md5 mismatch"):
        prepare_task({**task, "md5": "0" * 32}, data_dir=tmp_path / "other")


def test_decathlon_present_folder_not_downloaded(tmp_path, h, monkeypatch):
    calls = []
    monkeypatch.setattr(tasks_module, "download_url", lambda **kw: calls.append(kw))
    image, label = h.simple_case()
    h.write_nifti(tmp_path / "Task03_Liver" / "imagesTr" / "liver_0.nii.gz", image)
    assert prepare_task({"name": "liver_ct", "source": "decathlon"}, tmp_path) == (
        tmp_path / "Task03_Liver"
    )
    assert calls == []


def test_decathlon_absent_folder_calls_monai_with_its_url(tmp_path, monkeypatch):
    from monai.apps import DecathlonDataset

    calls = []
    monkeypatch.setattr(tasks_module, "download_url", lambda **kw: calls.append(kw))
    with pytest.raises(DataError, match="produced no archive"):
        prepare_task({"name": "hippocampus_mri", "source": "decathlon"}, tmp_path)
    (kw,) = calls
    assert kw["url"] == DecathlonDataset.resource["Task04_Hippocampus"]
    assert kw["hash_val"] == DecathlonDataset.md5["Task04_Hippocampus"]
    assert kw["hash_type"] == "md5" and kw["progress"] is True
    assert kw["filepath"] == str(tmp_path / "Task04_Hippocampus.tar")


def test_decathlon_offline_error_is_one_clear_line(tmp_path):
    task = {"name": "heart_mri", "source": "decathlon", "url": (tmp_path / "nope.tar").as_uri()}
    with pytest.raises(DataError) as err:
        prepare_task(task, tmp_path)
    msg = str(err.value)
    assert "\n" not in msg and "Task02_Heart" in msg and str(tmp_path / "Task02_Heart") in msg


def _write_dicom_series(folder: Path, vol: np.ndarray) -> None:
    """(rows, cols, slices) int16 -> one CT DICOM file per slice, 0.7 mm pixels, 2.5 mm apart."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series, study = generate_uid(), generate_uid()
    for k in range(vol.shape[2]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "p", k + 1
        ds.SeriesInstanceUID, ds.StudyInstanceUID = series, study
        ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing, ds.SliceThickness = [0.7, 0.7], 2.5
        ds.Rows, ds.Columns = vol.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.PixelData = np.ascontiguousarray(vol[:, :, k]).astype(np.int16).tobytes()
        ds.save_as(folder / f"{k:03d}.dcm", enforce_file_format=True)


def test_dicom_series_folder(tmp_path, h):
    pytest.importorskip("pydicom")
    from sam_ft.data.readers import read_volume

    vol = np.full((16, 20, 3), -1000, np.int16)
    vol[4:12, 5:15, :] = 100
    root = tmp_path / "dcm"
    _write_dicom_series(root / "imagesTr" / "ct1", vol)
    arr, affine = read_volume(str(root / "imagesTr" / "ct1"))
    assert arr.shape == (1, 20, 16, 3)  # RAS (x = columns, y = rows, z)
    h.write_nifti(root / "labelsTr" / "ct1.nii.gz", (arr[0] > 0).astype(np.uint8), affine=affine)
    task = {
        "root": str(root),
        "modality": "CT",
        "intensity": {"mode": "window", "level": 40, "width": 400},
    }
    cases = find_cases(root, task)
    assert [(c.case, Path(c.image).name) for c in cases] == [("ct1", "ct1")]
    data = load_case(cases[0], task)
    assert data.spacing == pytest.approx((2.5, 0.7, 0.7))
    assert len(data.slices) == 3 and data.slices[0].masks[0].sum() == 80
