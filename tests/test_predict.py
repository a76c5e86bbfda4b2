"""predict.py: every input form on real NIfTI / PNG files, geometry round trips, the model card,
bad input, and equality with the masks evaluate.py scores (tiny model, random weights)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image

from sam_ft.data.readers import read_volume
from sam_ft.defaults import build_from_yaml, config_dir
from sam_ft.errors import CheckpointError, ConfigError, DataError
from sam_ft.inference.card import card_path, read_card, write_model_card
from sam_ft.inference.frames import file_geometry
from sam_ft.model.checkpoint import export_official

# File shape (i, j, k) and spacing: anisotropic; slices along the 4 mm axis.
SHAPE = (40, 32, 5)
SPACING = (0.8, 1.2, 4.0)
# The permuted orientation's file axes run along (P, S, L): its axial slices are the j axis.
PSHAPE = (40, 5, 32)
PSPACING = (0.8, 4.0, 1.2)
TASK = {
    "name": "predict_test",
    "modality": "CT",
    # The CT presets' rule: per-slice percentiles (the official code's), which a whole-volume
    # mapping in predict would not reproduce.
    "intensity": {"mode": "percentile", "scope": "slice", "keep_zero": False},
    "slice_axis": "auto",
    "channel": 0,
    "label_binarize": False,
    "labels": None,
}


def lps_affine(permuted: bool = False) -> np.ndarray:
    """LPS (x and y flipped vs RAS), or a permuted orientation whose file axes (i, j, k) run
    along (P, S, L): then the axial (S) slices are the file's j axis, and rows/cols swap."""
    spacing = PSPACING if permuted else SPACING
    a = np.zeros((4, 4))
    a[3, 3] = 1.0
    if permuted:
        a[1, 0], a[2, 1], a[0, 2] = -spacing[0], spacing[1], -spacing[2]
    else:
        a[0, 0], a[1, 1], a[2, 2] = -spacing[0], -spacing[1], spacing[2]
    a[:3, 3] = (12.5, -7.0, 30.0)
    return a


def make_volume(shape=SHAPE, slice_axis: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """int16 HU-like image and uint8 label: a block (1) and a disc (2) on several slices."""
    rng = np.random.default_rng(3)
    image = rng.normal(-50, 20, shape).astype(np.int16)
    label = np.zeros(shape, dtype=np.uint8)
    idx = np.indices(shape)
    plane = [a for a in range(3) if a != slice_axis]
    u, v = idx[plane[0]], idx[plane[1]]
    n_u, n_v = shape[plane[0]], shape[plane[1]]
    s = idx[slice_axis]
    block = (u >= 3) & (u < n_u // 2) & (v >= 2) & (v < n_v // 2) & (s >= 1) & (s < 4)
    disc = ((u - 3 * n_u // 4) ** 2 + (v - 3 * n_v // 4) ** 2 < 25) & (s >= 2)
    label[block], label[disc] = 1, 2
    image[block] += 150
    image[disc] += 250
    return image, label


def save(path: Path, array: np.ndarray, affine: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    """A tiny model with random weights, exported with its card as training does."""
    torch.manual_seed(0)
    model = build_from_yaml("model", "tiny")
    path = export_official(model, tmp_path_factory.mktemp("run") / "sam_finetuned.pth")
    cfg = OmegaConf.create(
        {
            "model": {"name": "tiny", "image_size": 256, "preprocess": "sam"},
            "finetune": {"_target_": "x", "name": "decoder"},
            "task": TASK,
            "data": {"min_object_pixels": 20},
        }
    )
    cfg = OmegaConf.to_container(cfg)
    write_model_card(path, cfg, multimask_output=True, evaluation={"finetuned": {"box_dice": 0.5}})
    return path


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=overrides)


def run_predict(weights: Path, out: Path, *args: str) -> list[Path]:
    from sam_ft.predict import predict, predict_overrides

    overrides = [f"checkpoint={weights}", f"output={out}", *args]
    cfg = _compose("predict", predict_overrides(overrides))
    return predict(cfg)


# ---------------------------------------------------------------------------------------------
# Geometry


@pytest.mark.parametrize("permuted", [False, True])
def test_ras_array_round_trips_to_the_file_array(tmp_path, permuted):
    image, _ = make_volume(PSHAPE if permuted else SHAPE, 1 if permuted else 2)
    path = save(tmp_path / "img.nii.gz", image, lps_affine(permuted=permuted))
    ras, _ = read_volume(str(path))
    geom = file_geometry(path)
    np.testing.assert_array_equal(geom.to_file(ras[0]), image)
    # A file voxel index lands on the same value in the RAS array.
    idx = np.array([[3, 1, 4], [39, 0, 4], [10, 4, 2]])
    ras_idx = geom.file_to_ras(idx).astype(int)
    np.testing.assert_array_equal(ras[0][tuple(ras_idx.T)], image[tuple(idx.T)])


@pytest.mark.parametrize("permuted", [False, True])
def test_labels_form_writes_the_input_geometry(tmp_path, weights, permuted):
    affine = lps_affine(permuted=permuted)
    # Axial (S) slices: the file's k axis for LPS, j for the permuted orientation.
    image, label = make_volume(PSHAPE if permuted else SHAPE, 1 if permuted else 2)
    img = save(tmp_path / "case.nii.gz", image, affine)
    lab = save(tmp_path / "case_label.nii.gz", label, affine)
    written = run_predict(weights, tmp_path / "out", f"input={img}", f"labels={lab}")
    out = nib.load(tmp_path / "out" / "case.nii.gz")
    assert out.shape == image.shape
    np.testing.assert_allclose(out.affine, affine)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(affine)
    pred = np.asarray(out.dataobj)
    assert set(np.unique(pred)) <= {0, 1, 2}
    # Prompts only where the reference has objects: nothing on slices without a label.
    axis = 1 if permuted else 2
    empty = np.flatnonzero(~label.any(axis=tuple(a for a in range(3) if a != axis)))
    assert not np.take(pred, empty, axis=axis).any()
    assert (tmp_path / "out" / "case_overlay.png") in written


def test_json_prompts_in_file_coordinates_equal_the_derived_prompts(tmp_path, weights):
    """A box given in the permuted file's own (slice, x, y) indices is moved into the model's
    frame exactly: its masks equal those of the same box derived from the label map."""
    affine = lps_affine(permuted=True)
    image, label = make_volume(PSHAPE, slice_axis=1)
    img = save(tmp_path / "case.nii.gz", image, affine)
    lab = save(tmp_path / "lab.nii.gz", (label == 1).astype(np.uint8), affine)
    objects = []
    for s in range(PSHAPE[1]):
        plane = label[:, s, :] == 1  # file rows i, cols k
        if plane.sum() > 20:
            rows, cols = np.nonzero(plane)
            box = [int(cols.min()), int(rows.min()), int(cols.max()), int(rows.max())]
            objects.append({"slice": s, "box": box, "label": 1})
    assert len(objects) == 3
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"objects": objects}))
    run_predict(weights, tmp_path / "a", f"input={img}", f"labels={lab}", "overlay=false")
    run_predict(weights, tmp_path / "b", f"input={img}", f"prompts={prompts}", "overlay=false")
    a = np.asarray(nib.load(tmp_path / "a" / "case.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "b" / "case.nii.gz").dataobj)
    np.testing.assert_array_equal(a, b)


# ---------------------------------------------------------------------------------------------
# 2D, points, everything, folders


def _png_pair(root: Path, name: str, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    grey = rng.normal(60, 10, (48, 64)).clip(0, 255)
    label = np.zeros((48, 64), dtype=np.uint8)
    label[8:24, 10:30] = 3
    grey[label > 0] += 90
    root.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grey.astype(np.uint8)).save(root / f"{name}.png")
    Image.fromarray(label).save(root / f"{name}_label.png")
    return root / f"{name}.png", root / f"{name}_label.png"


def test_png_with_points_and_box_prompts(tmp_path, weights):
    png, _ = _png_pair(tmp_path, "img")
    prompts = tmp_path / "p.json"
    prompts.write_text(
        json.dumps(
            [
                {"box": [10, 8, 29, 23], "label": 7},
                {"points": [[40, 40], [5, 5]], "point_labels": [1, 0], "label": 300},
            ]
        )
    )
    run_predict(weights, tmp_path / "out", f"input={png}", f"prompts={prompts}")
    pred = np.asarray(Image.open(tmp_path / "out" / "img.png"))
    assert pred.shape == (48, 64)
    assert pred.dtype == np.uint16  # label 300 needs 16 bits
    assert set(np.unique(pred)) <= {0, 7, 300}
    assert (tmp_path / "out" / "img_overlay.png").is_file()


def test_everything_mode_on_a_folder_skips_a_bad_file(tmp_path, weights):
    folder = tmp_path / "in"
    png, lab = _png_pair(folder, "good")
    lab.unlink()
    (folder / "broken.png").write_bytes(b"not a png")
    run_predict(
        weights,
        tmp_path / "out",
        f"input={folder}",
        "prompt=everything",
        "everything.grid=4",
        "everything.pred_iou_thresh=0",
        "everything.stability_score_thresh=0",
    )
    pred = np.asarray(Image.open(tmp_path / "out" / "good.png"))
    assert pred.shape == (48, 64)
    assert pred.max() >= 1  # with no filter every grid point gives a mask
    skipped = (tmp_path / "out" / "skipped.csv").read_text()
    assert "broken.png" in skipped and "unreadable image" in skipped


def test_folder_of_volumes_with_folder_of_labels(tmp_path, weights):
    image, label = make_volume()
    for name in ("a", "b"):  # nnU-Net names: image a_0000, label a
        save(tmp_path / "img" / f"{name}_0000.nii.gz", image, lps_affine())
        save(tmp_path / "lab" / f"{name}.nii.gz", label, lps_affine())
    written = run_predict(
        weights,
        tmp_path / "out",
        f"input={tmp_path / 'img'}",
        f"labels={tmp_path / 'lab'}",
        "prompt=point1",
        "overlay=false",
    )
    assert sorted(p.name for p in written) == ["a_0000.nii.gz", "b_0000.nii.gz"]


# ---------------------------------------------------------------------------------------------
# Masks equal to evaluation


@pytest.mark.parametrize(
    ("prompt", "selection"),
    [("box_point1", "predicted_iou"), ("box", "single")],
)
def test_predict_writes_the_masks_evaluate_scored(tmp_path, weights, prompt, selection):
    from sam_ft.evaluate import evaluate

    affine = lps_affine()
    image, label = make_volume()
    root = tmp_path / "task"
    save(root / "imagesTr" / "case1.nii.gz", image, affine)
    save(root / "labelsTr" / "case1.nii.gz", label, affine)
    common = ["seed=5"]
    cfg = _compose(
        "eval",
        [
            *common,
            "task=folder",
            f"task.root={root}",
            "task.modality=CT",
            "task.intensity={mode: percentile, scope: slice, keep_zero: false}",
            "data.min_object_pixels=20",
            f"ckpt_path={weights}",
            "model=vit_b",  # the card overrides it: tiny, as trained
            "eval.split=all",
            f"eval.prompts=[{prompt}]",
            "eval.jitter_px=[]",
            f"eval.mask_selection={selection}",
            "eval.save_predictions=true",
            "eval.overlays=0",
            f"paths.output_dir={tmp_path / 'eval'}",
        ],
    )
    evaluate(cfg)
    scored = nib.load(tmp_path / f"eval/predictions/finetuned/{prompt}/case1.nii.gz")
    run_predict(
        weights,
        tmp_path / "pred",
        *common,
        f"input={root / 'imagesTr' / 'case1.nii.gz'}",
        f"labels={root / 'labelsTr' / 'case1.nii.gz'}",
        f"prompt={prompt}",
        f"mask_selection={selection}",
    )
    mine = nib.load(tmp_path / "pred" / "case1.nii.gz")
    # Evaluation writes the loader's RAS frame, predict the file's own (LPS): same voxels.
    a = np.asarray(nib.as_closest_canonical(scored).dataobj)
    b = np.asarray(nib.as_closest_canonical(mine).dataobj)
    assert b.any()
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(nib.as_closest_canonical(mine).affine, scored.affine, atol=1e-5)
    # The images themselves: predict's are the loader's, slice for slice (per-slice percentiles;
    # a random tiny model's masks alone may not show a different intensity mapping).
    from partial_api import find_cases, load_case, load_image

    case = load_case(find_cases(root, cfg.task)[0], cfg.task, {"min_object_pixels": 20})
    loaded = load_image(root / "imagesTr" / "case1.nii.gz", read_card(card_path(weights))["task"])
    assert len(case.slices) > 1
    for rec in case.slices:
        np.testing.assert_array_equal(loaded.slice_image(rec.slice_index), rec.image)


# ---------------------------------------------------------------------------------------------
# Model card


def test_card_fields(weights):
    card = read_card(card_path(weights))
    assert card["architecture"] == "tiny" and card["image_size"] == 256
    assert card["preprocess"] == "sam" and card["multimask_output"] is True
    assert card["task"]["intensity"] == TASK["intensity"]
    assert card["evaluation"] == {"finetuned": {"box_dice": 0.5}}
    assert card["finetune"] == {"name": "decoder"}
    assert len(card["sha256"]) == 64 and card["sam_ft_version"]
    # What a reader deciding to use the weights needs: the weights were never pretrained.
    assert card["base_weights"]["checkpoint"] is None
    assert "random" in card["base_weights"]["description"] and "random" in card["licence"]
    assert (
        "predict_test" in card["intended_use"]
        and "not validated for clinical" in (card["intended_use"])
    )


def test_card_names_a_base_weights_file_by_its_hash(tmp_path, weights):
    import hashlib

    from sam_ft.inference.card import base_weights

    base = tmp_path / "base.pth"
    base.write_bytes(b"weights")
    facts = base_weights({"name": "vit_b", "checkpoint": str(base)})
    assert facts["sha256"] == hashlib.sha256(b"weights").hexdigest()
    auto = base_weights({"name": "vit_b", "checkpoint": "auto"})
    assert auto["file"] == "sam_vit_b_01ec64.pth" and len(auto["sha256"]) == 64


def test_card_that_does_not_match_the_weights_is_an_error(tmp_path, weights):
    import shutil

    copy = tmp_path / "sam_finetuned.pth"
    shutil.copy(weights, copy)
    card = json.loads(card_path(weights).read_text())
    card["sha256"] = "0" * 64
    card_path(copy).write_text(json.dumps(card))
    png, lab = _png_pair(tmp_path, "img")
    with pytest.raises(CheckpointError, match="does not match its model card"):
        run_predict(copy, tmp_path / "out", f"input={png}", f"labels={lab}")


def test_card_preprocessing_is_used(tmp_path, weights):
    """A card saying medsam makes predict build a MedSAM-mode model: here the weights (tiny)
    then do not fit the named architecture, which is a one-line checkpoint error."""
    import shutil

    copy = tmp_path / "sam_finetuned.pth"
    shutil.copy(weights, copy)
    card = json.loads(card_path(weights).read_text())
    card.update(architecture="medsam", image_size=1024, preprocess="medsam")
    card_path(copy).write_text(json.dumps(card))
    png, lab = _png_pair(tmp_path, "img")
    with pytest.raises(CheckpointError, match="does not fit model 'medsam'"):
        run_predict(copy, tmp_path / "out", f"input={png}", f"labels={lab}")


def test_official_weights_form(tmp_path, weights, monkeypatch):
    """``model=<arch> checkpoint=auto``: the architecture's published weights, downloaded into
    $SAM_FT_CACHE and SHA-256 checked (here tiny "published" at a file:// URL)."""
    import dataclasses

    from sam_ft.inference.card import sha256_file
    from sam_ft.model.builders import SPECS
    from sam_ft.model.download import cache_dir

    spec = dataclasses.replace(
        SPECS["tiny"], url=weights.resolve().as_uri(), sha256=sha256_file(weights)
    )
    monkeypatch.setitem(SPECS, "tiny", spec)
    png, lab = _png_pair(tmp_path, "img")
    run_predict("auto", tmp_path / "out", f"input={png}", f"labels={lab}", "model=tiny")
    assert (cache_dir() / "sam_finetuned.pth").is_file()  # fetched under the URL's file name
    assert (tmp_path / "out" / "img.png").is_file()
    # A file without a card is fed as model= says.
    import shutil

    shutil.copy(weights, tmp_path / "plain.pth")
    run_predict(tmp_path / "plain.pth", tmp_path / "out2", f"input={png}", f"labels={lab}")
    assert (tmp_path / "out2" / "img.png").is_file()


# ---------------------------------------------------------------------------------------------
# Bad input


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "empty prompts file"),
        ("{not json", "malformed JSON"),
        ("[]", "no objects"),
        ('[{"box": [10, 8, 90, 23]}]', "outside the image"),
        ('[{"points": [[-1, 3]], "point_labels": [1]}]', "outside the image"),
        ('[{"points": [[1, 3]], "point_labels": [1, 0]}]', "point_labels must be 1 values"),
        ('[{"box": [1, 2, 3]}]', "box must be"),
        ('[{"label": 2}]', "needs a 'box' and/or 'points'"),
        ('[{"box": [1, 2, 3, 4], "slice": 3}]', "given for a 2D image"),
    ],
)
def test_bad_prompt_files_name_the_file_and_object(tmp_path, weights, content, message):
    png, _ = _png_pair(tmp_path, "img")
    prompts = tmp_path / "p.json"
    prompts.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        run_predict(weights, tmp_path / "out", f"input={png}", f"prompts={prompts}")
    assert str(prompts) in str(err.value)


def test_slice_out_of_range_and_label_of_another_shape(tmp_path, weights):
    image, label = make_volume()
    img = save(tmp_path / "v.nii.gz", image, lps_affine())
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"slice": 5, "box": [1, 1, 5, 5]}]))
    with pytest.raises(DataError, match="slice 5 out of range"):
        run_predict(weights, tmp_path / "o", f"input={img}", f"prompts={prompts}")
    lab = save(tmp_path / "l.nii.gz", label[:, :, :4], lps_affine())
    with pytest.raises(DataError, match="label shape") as err:
        run_predict(weights, tmp_path / "o", f"input={img}", f"labels={lab}", "on_error=raise")
    assert "l.nii.gz" in str(err.value)


def test_checkpoint_of_another_architecture(tmp_path, weights):
    png, lab = _png_pair(tmp_path, "img")
    import shutil

    shutil.copy(weights, tmp_path / "w.pth")  # no card: model=vit_b is believed
    with pytest.raises(CheckpointError, match="tiny checkpoint"):
        run_predict(tmp_path / "w.pth", tmp_path / "o", f"input={png}", f"labels={lab}",
                    "model=vit_b")  # fmt: skip


def test_options_are_checked_before_reading(tmp_path, weights):
    png, lab = _png_pair(tmp_path, "img")
    with pytest.raises(ConfigError, match="labels=LABEL_MAP, prompts=PROMPTS.json"):
        run_predict(weights, tmp_path / "o", f"input={png}")
    with pytest.raises(ConfigError, match="oracle needs labels"):
        run_predict(weights, tmp_path / "o", f"input={png}", "prompt=everything",
                    "mask_selection=oracle")  # fmt: skip
    with pytest.raises(ConfigError, match="prompt='nope'"):
        run_predict(weights, tmp_path / "o", f"input={png}", f"labels={lab}", "prompt=nope")
    with pytest.raises(ConfigError, match="no such file"):
        run_predict(weights, tmp_path / "o", f"input={tmp_path / 'missing.png'}", f"labels={lab}")


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


def test_dicom_series_folder_with_json_prompts(tmp_path, weights):
    """A DICOM series folder: the label map is written as NIfTI in the loader's RAS frame, and
    prompts index that array as they would a NIfTI file's (axial slice k; y, x = i, j)."""
    vol = np.full((16, 20, 3), -1000, np.int16)
    vol[4:12, 5:15, :] = 100
    series = tmp_path / "ct1"
    _write_dicom_series(series, vol)
    ras, affine = read_volume(str(series))
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps([{"slice": 1, "box": [3, 4, 12, 14], "label": 4}]))
    run_predict(weights, tmp_path / "out", f"input={series}", f"prompts={prompts}")
    out = nib.load(tmp_path / "out" / "ct1.nii.gz")
    assert out.shape == ras.shape[1:] == (20, 16, 3)
    np.testing.assert_allclose(out.affine, affine, atol=1e-5)
    pred = np.asarray(out.dataobj)
    assert set(np.unique(pred)) <= {0, 4} and not pred[:, :, [0, 2]].any()


def test_evaluate_refuses_weights_that_do_not_match_their_card(tmp_path, weights):
    import shutil

    from sam_ft.evaluate import evaluate

    copy = tmp_path / "sam_finetuned.pth"
    shutil.copy(weights, copy)
    card = json.loads(card_path(weights).read_text())
    card_path(copy).write_text(json.dumps({**card, "sha256": "f" * 64}))
    cfg = _compose("eval", [f"ckpt_path={copy}", f"paths.output_dir={tmp_path / 'eval'}"])
    with pytest.raises(CheckpointError, match="does not match its model card"):
        evaluate(cfg)


def test_cli_bad_input_is_one_line_without_traceback(tmp_path, weights):
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    png, _ = _png_pair(tmp_path, "img")
    prompts = tmp_path / "p.json"
    prompts.write_text('[{"box": [1, 2, 300, 4]}]')
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            str(root / "predict.py"),
            f"checkpoint={weights}",
            f"input={png}",
            f"prompts={prompts}",
            f"output={tmp_path / 'out'}",
            f"hydra.run.dir={tmp_path / 'log'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(prompts) in errors[0] and "outside the image" in errors[0]
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# Prompts typed on the command line


def test_typed_box_and_points_equal_the_same_object_in_a_prompts_file(tmp_path, weights):
    """box=[x0,y0,x1,y1] points=[[x,y]] point_labels=[0] slice=K label=N is one prompts-file
    object: the label map written is the same, voxel for voxel."""
    affine = lps_affine(permuted=True)
    image, _ = make_volume(PSHAPE, slice_axis=1)
    img = save(tmp_path / "case.nii.gz", image, affine)
    obj = {"slice": 2, "box": [3, 4, 20, 30], "points": [[25, 35]], "point_labels": [0]}
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{**obj, "label": 3}]))
    run_predict(weights, tmp_path / "file", f"input={img}", f"prompts={prompts}", "overlay=false")
    typed = ["box=[3,4,20,30]", "points=[[25,35]]", "point_labels=[0]", "slice=2", "label=3"]
    run_predict(weights, tmp_path / "typed", f"input={img}", "overlay=false", *typed)
    a = np.asarray(nib.load(tmp_path / "file" / "case.nii.gz").dataobj)
    b = np.asarray(nib.load(tmp_path / "typed" / "case.nii.gz").dataobj)
    assert (b == 3).any() and set(np.unique(b)) <= {0, 3}
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    ("args", "error", "message"),
    [
        (["box=[3,4,20,99]", "slice=2"], DataError, r"command line: object 1: box .* outside"),
        (["box=[3,4,20,30]"], DataError, r"command line: object 1: a volume needs .*'slice'"),
        (["slice=2"], ConfigError, r"^slice= needs box= or points="),
        (["box=[3,4,20,30]", "slice=2", "prompts=x.json"], ConfigError, r"^give one of labels="),
    ],
)
def test_typed_prompt_errors_name_the_option(tmp_path, weights, args, error, message):
    image, _ = make_volume(PSHAPE, slice_axis=1)
    img = save(tmp_path / "case.nii.gz", image, lps_affine(permuted=True))
    with pytest.raises(error, match=message):
        run_predict(weights, tmp_path / "out", f"input={img}", "on_error=raise", *args)


@pytest.mark.parametrize("iou_thresh", [0.0, 1.5])
def test_everything_mode_warns_when_it_keeps_no_mask(tmp_path, weights, caplog, iou_thresh):
    """A predicted IoU is at most ~1, so a threshold of 1.5 keeps nothing: an empty label map
    with a warning that says why, not a silent all-zero file."""
    png, _ = _png_pair(tmp_path, "img")
    with caplog.at_level("WARNING", logger="sam_ft"):
        run_predict(
            weights,
            tmp_path / "out",
            f"input={png}",
            "prompt=everything",
            "everything.grid=4",
            f"everything.pred_iou_thresh={iou_thresh}",
            "everything.stability_score_thresh=0",
        )
    empty = not np.asarray(Image.open(tmp_path / "out" / "img.png")).any()
    warned = [r.getMessage() for r in caplog.records if "kept no mask" in r.getMessage()]
    assert empty == (iou_thresh > 1)
    assert bool(warned) == empty
    if warned:
        assert "pred_iou_thresh=1.5" in warned[0] and "img" in warned[0]


def test_overlay_is_readable_with_distinct_label_colours(tmp_path, weights):
    """A 64 x 48 image gives a 768-pixel-wide overlay (not a thumbnail); the first ten label
    values get clearly different colours (tab20 gave 1 and 2 two shades of one blue)."""
    from sam_ft.inference.output import OVERLAY_SIDE, label_colour

    png, _ = _png_pair(tmp_path, "img")
    run_predict(weights, tmp_path / "out", f"input={png}", "box=[10,8,29,23]", "label=2")
    overlay = Image.open(tmp_path / "out" / "img_overlay.png")
    assert overlay.size[0] == OVERLAY_SIDE and overlay.size[1] > 48 * OVERLAY_SIDE / 64
    from matplotlib.colors import rgb_to_hsv

    hsv = {v: rgb_to_hsv(np.asarray(label_colour(v))) for v in range(1, 11)}
    for a in range(1, 10):  # neighbouring values (most often shown together): other hues
        b = a + 1
        if min(hsv[a][1], hsv[b][1]) > 0.2:  # both chromatic
            gap = abs(hsv[a][0] - hsv[b][0])
            assert min(gap, 1 - gap) > 0.05, (a, b)


def test_card_headline_is_the_dice_of_the_masks_predict_keeps(tmp_path, weights, monkeypatch):
    """predict keeps the IoU head's choice for weights trained with 3 masks: the headline is the
    mean of the evaluation's dice_top_iou, not its oracle Dice; single-mask decoding that the
    evaluation did not score is said to be unmeasured, not replaced by another number."""
    import shutil

    from sam_ft.inference.card import predicted_headline

    rows = [
        {"model": m, "prompt": p, "jitter": j, "dice": d, "dice_top_iou": t}
        for m, d, t in (("zero_shot", 0.5, 0.2), ("finetuned", 0.9, 0.7))
        for p, j in (("box", "none"), ("box", "0-10"), ("point1", "none"))
    ]
    rows.append({"model": "finetuned", "prompt": "box", "jitter": "none", "dice": 0.7,
                 "dice_top_iou": 0.5})  # fmt: skip
    eval_dir = tmp_path / "eval"
    eval_dir.mkdir()
    import pandas as pd

    pd.DataFrame(rows).to_csv(eval_dir / "per_object.csv", index=False)
    card = card_path(weights)  # tiny, trained with 3 masks
    head = predicted_headline(eval_dir, card, "oracle")
    assert head["mask_selection"] == "predicted_iou"
    assert head["dice"] == pytest.approx({"zero_shot": 0.2, "finetuned": 0.6})
    # Read in chunks (here of 2 rows, cutting a model's rows apart): the same means.
    from sam_ft.evaluation.protocol import tablesort

    monkeypatch.setattr(tablesort, "CHUNK_ROWS", 2)
    assert predicted_headline(eval_dir, card, "oracle") == head
    assert predicted_headline(eval_dir, card, "predicted_iou")["dice"]["finetuned"] == (
        pytest.approx(0.8)  # the evaluation already kept predict's masks: its own Dice
    )
    single = tmp_path / "single.json"
    shutil.copy(card, single)
    single.write_text(
        single.read_text().replace('"multimask_output": true', '"multimask_output": false')
    )
    unmeasured = predicted_headline(eval_dir, single, "oracle")
    assert unmeasured["dice"] is None and "single masks were not scored" in unmeasured["why"]
