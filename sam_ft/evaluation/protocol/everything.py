"""Everything mode (S1): SAM's automatic mask generation on an already computed embedding.

This is ``segment_anything.SamAutomaticMaskGenerator`` with ``crop_n_layers=0`` (one crop, the
whole image), step for step: an m x m point grid, one positive point per prompt, 3 masks each,
filter by predicted IoU and stability score, binarise, box NMS, optional small-region cleanup.
Two differences, both for reuse rather than behaviour:

- the image embedding comes from the caller, so the encoder is not run again (the generator's
  ``SamPredictor.set_image`` would run it once more per slice);
- prompts and masks go through the model's own :class:`~sam_ft.model.preprocess.SamTransform`
  (``model.decode`` / ``model.postprocess``), so MedSAM's ``medsam`` preprocessing works too.

Prompts are (x, y) = (column, row) original-image pixels; masks are (H, W) indexed (row, col).
Each ground-truth object is then matched to the generated mask with the highest Dice
(as :func:`sam_ft.evaluation.metrics.overlap.match_masks_to_objects`); no generated mask gives an
empty prediction. Memory stays bounded on large images: masks are upsampled a few at a time
(:data:`~sam_ft.evaluation.protocol.decode_select.UPSAMPLE_BUDGET_BYTES`), kept run-length
encoded and decoded one at a time for matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from segment_anything.utils.amg import (
    batch_iterator,
    calculate_stability_score,
    remove_small_regions,
)
from torchvision.ops.boxes import batched_nms

from sam_ft.evaluation.metrics.overlap import dice_matrix
from sam_ft.evaluation.protocol.decode_select import prompts_per_upsample
from sam_ft.model.backend import SegmentBackend
from sam_ft.prompts.geometry import point_grid
from sam_ft.prompts.types import Prompt


@dataclass(frozen=True)
class EverythingConfig:
    """``SamAutomaticMaskGenerator`` settings; ``grid`` is ``points_per_side``. Their values
    (the generator's own defaults) are ``eval.grid``, ``eval.max_prompts_per_call`` and
    ``eval.everything`` in ``conf/eval/default.yaml``: ``EvalOptions.generator`` builds this."""

    grid: int
    points_per_batch: int
    pred_iou_thresh: float
    stability_score_thresh: float
    stability_score_offset: float
    box_nms_thresh: float
    min_mask_region_area: int


def encode_masks(masks: torch.Tensor | np.ndarray) -> list[dict]:
    """(B, H, W) bool -> one run-length code per mask: ``{"size", "first", "changes"}``.

    ``changes`` holds the row-major flat indices where the value flips (int64): a mask costs
    its boundary length, and C order needs no transposed copy (the COCO RLE of
    ``segment_anything.utils.amg`` is column-major: a full-size copy per mask).
    """
    masks = np.asarray(masks.cpu() if isinstance(masks, torch.Tensor) else masks, dtype=bool)
    b, h, w = masks.shape
    codes = []
    for flat in masks.reshape(b, -1):
        changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
        codes.append({"size": (h, w), "first": bool(flat[0]), "changes": changes})
    return codes


def decode_mask(code: dict) -> np.ndarray:
    """Inverse of :func:`encode_masks` for one mask -> (H, W) bool."""
    h, w = code["size"]
    toggles = np.zeros(h * w, dtype=bool)
    toggles[code["changes"]] = True
    toggles[0] ^= code["first"]
    return np.logical_xor.accumulate(toggles).reshape(h, w)


def mask_boxes(masks: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(B, H, W) bool -> (B, 4) int64 XYXY inclusive boxes, 0s for an empty mask: the values of
    ``batched_mask_to_box``, from numpy ``any`` reductions (~50x faster than its int products)."""
    masks = np.asarray(masks.cpu() if isinstance(masks, torch.Tensor) else masks, dtype=bool)
    boxes = np.zeros((len(masks), 4), dtype=np.int64)
    for axis, (lo, hi) in ((2, (1, 3)), (1, (0, 2))):  # rows -> y, columns -> x
        hit = masks.any(axis=axis)
        boxes[:, lo] = hit.argmax(axis=1)
        boxes[:, hi] = hit.shape[1] - 1 - hit[:, ::-1].argmax(axis=1)
    boxes[~masks.reshape(len(masks), -1).any(axis=1)] = 0
    return torch.from_numpy(boxes)


@torch.no_grad()
def generate_codes(
    model: SegmentBackend,
    embedding: torch.Tensor,
    original_size: tuple[int, int],
    config: EverythingConfig,
) -> list[dict]:
    """The kept masks of one image as run-length codes, in ``SamAutomaticMaskGenerator`` order.

    Masks are upsampled :func:`prompts_per_upsample` at a time and encoded at once, so memory is
    bounded by :data:`UPSAMPLE_BUDGET_BYTES` plus O(masks x boundary length), never by
    (masks x H x W).

    Args:
        model: the model that produced ``embedding`` (eval mode).
        embedding: (C, h, w) image embedding from ``model.encode``.
        original_size: (H, W) of the original image.
        config: generator settings.

    Returns:
        :func:`encode_masks` codes (:func:`decode_mask` gives each (H, W) bool mask).
    """
    threshold = float(model.mask_threshold)
    points = point_grid(config.grid, original_size)
    # Counted in masks: filtering splits prompts.
    step = prompts_per_upsample(original_size, 1, model.image_size)
    codes: list[dict] = []
    boxes, scores = [], []
    for (batch,) in batch_iterator(max(1, config.points_per_batch), points):
        prompts = [Prompt(points=p[None], point_labels=np.ones(1)) for p in batch]
        # SAM's generator asks for 3 masks per point; a single-output model (MedSAM) gives 1.
        multimask = bool(model.multimask_output)
        low, iou = model.decode(embedding, prompts, original_size, multimask_output=multimask)
        low, iou = low.flatten(0, 1), iou.flatten(0, 1)
        if config.pred_iou_thresh > 0.0:
            # The generator filters after upsampling; the IoU filter does not look at the
            # masks, so filtering first gives the same masks for a fraction of the upsampling.
            keep = iou > config.pred_iou_thresh
            low, iou = low[keep], iou[keep]
        for s in range(0, len(iou), step):
            logits = model.postprocess(low[s : s + step, None], original_size)[:, 0]  # (B', H, W)
            part_iou = iou[s : s + step]
            if config.stability_score_thresh > 0.0:
                stability = calculate_stability_score(
                    logits, threshold, config.stability_score_offset
                )
                keep = stability >= config.stability_score_thresh
                logits, part_iou = logits[keep], part_iou[keep]
            masks = (logits > threshold).cpu().numpy()
            del logits
            # The generator drops boxes near a crop edge that is not the image edge; with one
            # crop covering the whole image no box is dropped, so that step is omitted.
            boxes.append(mask_boxes(masks))
            scores.append(part_iou.float().cpu())
            codes += encode_masks(masks)
    if not codes:
        return []
    keep = batched_nms(
        torch.cat(boxes).float(),
        torch.cat(scores),
        torch.zeros(len(codes)),
        iou_threshold=config.box_nms_thresh,
    )
    codes = [codes[i] for i in keep.tolist()]
    if config.min_mask_region_area > 0:
        codes = _remove_small_regions(codes, config)
    return codes


def generate_masks(
    model: SegmentBackend,
    embedding: torch.Tensor,
    original_size: tuple[int, int],
    config: EverythingConfig,
) -> np.ndarray:
    """All masks of one image from an m x m point grid, as ``SamAutomaticMaskGenerator``.

    Returns:
        (M, H, W) bool masks kept after filtering and NMS, in the generator's order (M may be 0).
        Decodes every mask at once: on large images prefer :func:`generate_codes`.
    """
    codes = generate_codes(model, embedding, original_size, config)
    if not codes:
        return np.zeros((0, *original_size), dtype=bool)
    return np.stack([decode_mask(c) for c in codes])


def _remove_small_regions(codes: list[dict], config: EverythingConfig) -> list[dict]:
    """``SamAutomaticMaskGenerator.postprocess_small_regions``, one decoded mask at a time."""
    cleaned, boxes, scores = [], [], []
    for code in codes:
        mask = decode_mask(code)
        mask, changed_holes = remove_small_regions(mask, config.min_mask_region_area, "holes")
        mask, changed_islands = remove_small_regions(mask, config.min_mask_region_area, "islands")
        cleaned += encode_masks(mask[None])
        boxes.append(mask_boxes(mask[None])[0])
        # NMS prefers masks that needed no cleanup, as in the generator.
        scores.append(float(not (changed_holes or changed_islands)))
    keep = batched_nms(
        torch.stack(boxes).float(),
        torch.as_tensor(scores),
        torch.zeros(len(cleaned)),
        iou_threshold=config.box_nms_thresh,
    )
    return [cleaned[i] for i in keep.tolist()]


def everything_predictions(
    model: SegmentBackend,
    embedding: torch.Tensor,
    gt: np.ndarray,
    config: EverythingConfig,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The study's S1: generate masks, then give each object its best-Dice generated mask.

    Args:
        model: the model that produced ``embedding``.
        embedding: (C, h, w) image embedding.
        gt: (K, H, W) bool ground-truth object masks at the original resolution.
        config: generator settings.

    Returns:
        matched: (K, H, W) bool, the chosen generated mask per object (all False when nothing
            was generated); index: (K,) int64 into the generated masks (-1 when none);
            n_generated: (K,) int64, the number of generated masks (same for every object).
    """
    gt = np.asarray(gt, dtype=bool)
    k = len(gt)
    codes = generate_codes(model, embedding, tuple(gt.shape[1:]), config)
    matched = np.zeros_like(gt)
    index = np.full(k, -1, dtype=np.int64)
    best = np.full(k, -np.inf)
    # One decoded mask at a time: the same choice as match_masks_to_objects on the stacked
    # masks (strict ">" keeps the first of equal Dice, as argmax does) without M x H x W bytes.
    for m, code in enumerate(codes):
        mask = decode_mask(code)
        dice = dice_matrix(mask[None], gt)[0]
        better = dice > best
        if better.any():
            best[better], index[better] = dice[better], m
            matched[better] = mask
    return matched, index, np.full(k, len(codes), dtype=np.int64)
