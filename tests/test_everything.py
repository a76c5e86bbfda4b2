"""Everything mode (S1) on a precomputed embedding: generator parity, matching, empty output."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from segment_anything import SamAutomaticMaskGenerator
from wrapped_sam import wrap_sam

from sam_ft.data.types import SliceRecord
from sam_ft.evaluation.metrics.overlap import dice_matrix
from sam_ft.evaluation.protocol.engine import evaluate_models
from sam_ft.evaluation.protocol.everything import (
    everything_predictions,
    generate_masks,
)
from sam_ft.evaluation.protocol.options import eval_options
from sam_ft.model.builders import build_sam_architecture
from sam_ft.model.trainable import TrainableSam

H, W = 64, 80
# tiny at a 128 input: 8 x 8 embedding tokens keep the decoder cheap on a CPU.
TINY_INPUT = 128
# The generator's settings of conf/eval/default.yaml, on a 3 x 3 grid.
DEFAULT = dataclasses.replace(eval_options(None).generator, grid=3)
# No filtering, so a random-weight model still yields masks.
KEEP_ALL = dataclasses.replace(
    DEFAULT, points_per_batch=4, pred_iou_thresh=0.0, stability_score_thresh=0.0
)
# An IoU threshold no prediction can pass: nothing is generated.
KEEP_NONE = dataclasses.replace(DEFAULT, pred_iou_thresh=1e9)


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(1)
    return build_sam_architecture("tiny", image_size=TINY_INPUT)


@pytest.fixture(scope="module")
def scene(sam):
    """(model, image, gt, embedding, generated masks) computed once for the module."""
    image, gt = _scene()
    model = wrap_sam(sam).eval()
    embedding = _embed(model, image)
    return model, image, gt, embedding, generate_masks(model, embedding, (H, W), KEEP_ALL)


def _scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:H, :W]
    gt = np.stack(
        [(yy - 30) ** 2 + (xx - 25) ** 2 < 12**2, (yy > 8) & (yy < 24) & (xx > 50) & (xx < 72)]
    )
    grey = rng.normal(50, 8, (H, W)) + 90 * gt[0] + 140 * gt[1]
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2), gt


def _embed(model: TrainableSam, image: np.ndarray) -> torch.Tensor:
    with torch.inference_mode():
        return model.encode(model.preprocess(image)[None])[0]


def test_generate_masks_equals_sam_automatic_mask_generator(sam, scene):
    """Same masks in the same order (batches of 4 points: the batching path is exercised)."""
    _, image, _, _, ours = scene
    generator = SamAutomaticMaskGenerator(
        sam,
        points_per_side=3,
        points_per_batch=4,
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        crop_n_layers=0,
    )
    theirs = np.stack([a["segmentation"] for a in generator.generate(image)])
    assert ours.shape == theirs.shape and ours.dtype == bool
    assert len(ours) > 0
    np.testing.assert_array_equal(ours, theirs)


def _between(values, q: float) -> float:
    """A threshold halfway between two neighbouring distinct values near the ``q`` quantile, so
    float noise between two implementations cannot flip a mask across it."""
    v = np.unique(np.asarray(values, dtype=np.float64))
    k = min(max(int(q * len(v)), 1), len(v) - 1)
    return float((v[k - 1] + v[k]) / 2)


@pytest.mark.parametrize(
    "on", [("iou",), ("stability",), ("nms",), ("iou", "stability", "nms", "small_regions")],
    ids="+".join,
)  # fmt: skip
def test_generate_masks_equals_the_generator_with_its_filters_on(sam, scene, on):
    """With the generator's filters on (each alone, then all), the kept masks and their order
    equal SamAutomaticMaskGenerator's with the same settings. Thresholds sit between observed
    predicted IoUs / stability scores so that each filter drops part of the masks. The random
    model's logits stay within +-0.3, hence a stability offset of 0.01 (at the default 1.0 every
    stability score is 0); its masks nearly all span the image (boxes within a pixel or two), so
    box NMS at 0.99 is what leaves a handful."""
    model, image, _, embedding, _ = scene
    grid = dict(points_per_side=6, points_per_batch=16, crop_n_layers=0)
    off = dict(
        pred_iou_thresh=0.0,
        stability_score_thresh=0.0,
        stability_score_offset=0.01,
        box_nms_thresh=1.0,
    )
    unfiltered = SamAutomaticMaskGenerator(sam, **off, **grid).generate(image)
    chosen = {
        "iou": {"pred_iou_thresh": _between([a["predicted_iou"] for a in unfiltered], 0.4)},
        "stability": {
            "stability_score_thresh": _between([a["stability_score"] for a in unfiltered], 0.3)
        },
        "nms": {"box_nms_thresh": 0.99},
        "small_regions": {"min_mask_region_area": 30},
    }
    filters = {**off}
    for name in on:
        filters.update(chosen[name])
    theirs = SamAutomaticMaskGenerator(sam, **grid, **filters).generate(image)
    ours = generate_masks(
        model,
        embedding,
        (H, W),
        dataclasses.replace(DEFAULT, grid=6, points_per_batch=16, **filters),
    )
    assert 1 < len(theirs) < len(unfiltered), len(theirs)  # the filters bite, masks are left
    theirs = np.stack([a["segmentation"] for a in theirs])
    assert ours.shape == theirs.shape
    # Same masks in the same order; a logit within float noise of 0 may flip a pixel (our decoder
    # is not the official one), while any other mask differs in hundreds of pixels.
    assert (ours != theirs).sum(axis=(1, 2)).max() <= 3


def test_each_object_gets_its_best_generated_mask(scene):
    model, _, gt, embedding, generated = scene
    matched, index, n_generated = everything_predictions(model, embedding, gt, KEEP_ALL)
    assert matched.shape == gt.shape and index.shape == (2,)
    assert (n_generated == len(generated)).all()
    dice = dice_matrix(generated, gt)  # (M, K)
    for k in range(len(gt)):
        np.testing.assert_array_equal(matched[k], generated[index[k]])
        assert dice[index[k], k] == dice[:, k].max()


def test_nothing_generated_gives_empty_prediction(scene):
    model, _, gt, embedding, _ = scene
    assert generate_masks(model, embedding, (H, W), KEEP_NONE).shape == (0, H, W)
    matched, index, _ = everything_predictions(model, embedding, gt, KEEP_NONE)
    assert not matched.any() and (index == -1).all()


def test_engine_scores_zero_when_nothing_generated(sam, tmp_path):
    image, gt = _scene()
    rec = SliceRecord(
        case="c", slice_index=-1, image=image, masks=gt, labels=np.array([1, 2]), names=["a", "b"]
    )
    res = evaluate_models(
        {"zero_shot": wrap_sam(sam)},
        [[rec]],
        report=False,
        task_name="t",
        options=eval_options(
            {"prompts": ["everything"], "grid": 3, "everything": {"pred_iou_thresh": 1e9}}
        ),
        out_dir=tmp_path,
        seed=0,
        progress=False,
    )
    rows = res.per_object
    assert list(rows["prompt"]) == ["everything"] * 2
    assert (rows["dice"] == 0).all() and rows["hd95_missing"].all()
    assert (rows["mask_index"] == -1).all() and rows["empty_pred"].all()
    assert (res.per_case["dice"] == 0).all()


def test_medsam_preprocessing_path(sam):
    """MedSAM's transform (square resize, no padding) goes through model.transform too."""
    image, gt = _scene()
    model = wrap_sam(sam, preprocess="medsam").eval()
    embedding = _embed(model, image)
    masks = generate_masks(model, embedding, (H, W), KEEP_ALL)  # masks at the original size
    assert masks.ndim == 3 and masks.shape[1:] == (H, W) and len(masks) > 0
    matched, _, _ = everything_predictions(model, embedding, gt, KEEP_ALL)
    assert matched.shape == gt.shape
