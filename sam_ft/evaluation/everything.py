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
(:func:`sam_ft.prompts.match_masks_to_objects`); no generated mask gives an empty prediction.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from segment_anything.utils.amg import (
    MaskData,
    batch_iterator,
    batched_mask_to_box,
    calculate_stability_score,
    mask_to_rle_pytorch,
    remove_small_regions,
    rle_to_mask,
)
from torchvision.ops.boxes import batched_nms

from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.geometry import match_masks_to_objects, point_grid
from sam_ft.prompts.types import Prompt


@dataclass(frozen=True)
class EverythingConfig:
    """``SamAutomaticMaskGenerator`` settings (its defaults); ``grid`` is ``points_per_side``."""

    grid: int = 32
    points_per_batch: int = 64
    pred_iou_thresh: float = 0.88
    stability_score_thresh: float = 0.95
    stability_score_offset: float = 1.0
    box_nms_thresh: float = 0.7
    min_mask_region_area: int = 0

    @classmethod
    def from_eval_cfg(cls, cfg: Mapping[str, Any]) -> EverythingConfig:
        """Build from the ``eval`` config: ``grid``, ``max_prompts_per_call`` and the optional
        ``everything`` sub-mapping (any field of this class)."""
        sub = dict(cfg.get("everything") or {})
        return cls(
            grid=int(cfg.get("grid", cls.grid)),
            points_per_batch=int(cfg.get("max_prompts_per_call", 256)),
            **{k: type(getattr(cls, k))(v) for k, v in sub.items()},
        )


@torch.no_grad()
def generate_masks(
    model: TrainableSam,
    embedding: torch.Tensor,
    original_size: tuple[int, int],
    config: EverythingConfig = EverythingConfig(),
) -> np.ndarray:
    """All masks of one image from an m x m point grid, as ``SamAutomaticMaskGenerator``.

    Args:
        model: the model that produced ``embedding`` (eval mode).
        embedding: (C, h, w) image embedding from ``model.encode``.
        original_size: (H, W) of the original image.
        config: generator settings.

    Returns:
        (M, H, W) bool masks kept after filtering and NMS, in the generator's order (M may be 0).
    """
    h, w = original_size
    threshold = float(model.sam.mask_threshold)
    points = point_grid(config.grid, original_size)
    data = MaskData()
    for (batch,) in batch_iterator(max(1, config.points_per_batch), points):
        prompts = [Prompt(points=p[None], point_labels=np.ones(1)) for p in batch]
        low, iou = model.decode(embedding, prompts, original_size, multimask_output=True)
        low, iou = low.flatten(0, 1), iou.flatten(0, 1)
        repeated = np.repeat(batch, 3, axis=0)
        if config.pred_iou_thresh > 0.0:
            # The generator filters after upsampling; the IoU filter does not look at the
            # masks, so filtering first gives the same masks for a fraction of the upsampling.
            keep = iou > config.pred_iou_thresh
            low, iou, repeated = low[keep], iou[keep], repeated[keep.cpu().numpy()]
        if len(iou) == 0:
            continue
        logits = model.postprocess(low[:, None], original_size)[:, 0]  # (B', H, W)
        part = MaskData(masks=logits, iou_preds=iou, points=torch.as_tensor(repeated))
        del logits
        part["stability_score"] = calculate_stability_score(
            part["masks"], threshold, config.stability_score_offset
        )
        if config.stability_score_thresh > 0.0:
            part.filter(part["stability_score"] >= config.stability_score_thresh)
        part["masks"] = part["masks"] > threshold
        part["boxes"] = batched_mask_to_box(part["masks"])
        # The generator drops boxes near a crop edge that is not the image edge; with one crop
        # covering the whole image no box is dropped, so that step is omitted.
        part["rles"] = mask_to_rle_pytorch(part["masks"])  # RLE keeps memory at O(M * boundary)
        del part["masks"]
        data.cat(part)
    if "rles" not in dict(data.items()) or len(data["rles"]) == 0:
        return np.zeros((0, h, w), dtype=bool)
    keep = batched_nms(
        data["boxes"].float(),
        data["iou_preds"].float(),
        torch.zeros(len(data["boxes"]), device=data["boxes"].device),
        iou_threshold=config.box_nms_thresh,
    )
    data.filter(keep)
    masks = [rle_to_mask(rle) for rle in data["rles"]]
    if config.min_mask_region_area > 0:
        masks = _remove_small_regions(masks, data["iou_preds"], config)
    return np.stack(masks).astype(bool) if masks else np.zeros((0, h, w), dtype=bool)


def _remove_small_regions(
    masks: list[np.ndarray], iou_preds: torch.Tensor, config: EverythingConfig
) -> list[np.ndarray]:
    """``SamAutomaticMaskGenerator.postprocess_small_regions`` on decoded masks."""
    cleaned, scores = [], []
    for mask in masks:
        mask, changed_holes = remove_small_regions(mask, config.min_mask_region_area, "holes")
        mask, changed_islands = remove_small_regions(mask, config.min_mask_region_area, "islands")
        cleaned.append(torch.as_tensor(mask))
        # NMS prefers masks that needed no cleanup, as in the generator.
        scores.append(float(not (changed_holes or changed_islands)))
    stacked = torch.stack(cleaned)
    keep = batched_nms(
        batched_mask_to_box(stacked).float(),
        torch.as_tensor(scores),
        torch.zeros(len(cleaned)),
        iou_threshold=config.box_nms_thresh,
    )
    return [cleaned[i].numpy() for i in keep.tolist()]


def everything_predictions(
    model: TrainableSam,
    embedding: torch.Tensor,
    gt: np.ndarray,
    config: EverythingConfig = EverythingConfig(),
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
    generated = generate_masks(model, embedding, tuple(gt.shape[1:]), config)
    index, _ = match_masks_to_objects(generated, gt)
    matched = np.zeros_like(gt)
    if len(generated):
        matched = generated[index]
    return matched, index, np.full(len(gt), len(generated), dtype=np.int64)
