"""Dice and IoU of bool masks, numpy and torch, with one rule for empty masks.

============================  ====  ====  ====  ===========  ================================
case                          Dice  IoU   NSD   conformity   HD95, HD, ASD
============================  ====  ====  ====  ===========  ================================
both empty                    1     1     1     1            0
empty pred, non-empty GT      0     0     0     0            NaN, ``hd95_missing=True``
non-empty pred, empty GT      0     0     0     0            NaN, ``hd95_missing=True``
============================  ====  ====  ====  ===========  ================================

The official code returns 0 for HD and ASD when a mask is empty; a NaN keeps the failure visible
(``hd95_missing`` flags all three distances, which are missing together).

Every Dice in the package (the engine's scores, the oracle mask selection, Everything mode's
matching, the training module's validation) comes from here.
"""

from __future__ import annotations

import numpy as np
import torch


def empty_rule(empty_pred: bool, empty_gt: bool) -> dict:
    """Scores for a pair where at least one mask is empty (see the module table)."""
    both = empty_pred and empty_gt
    return {
        "dice": 1.0 if both else 0.0,
        "iou": 1.0 if both else 0.0,
        "hd95": 0.0 if both else float("nan"),
        "hd": 0.0 if both else float("nan"),
        "asd": 0.0 if both else float("nan"),
        "nsd": 1.0 if both else 0.0,
        "conformity": 1.0 if both else 0.0,
        "empty_pred": empty_pred,
        "empty_gt": empty_gt,
        "hd95_missing": not both,
    }


def conformity(dice: np.ndarray | float) -> np.ndarray:
    """The conformity coefficient of the official ``cal_matric.py`` (``d2c``) from Dice:
    ``(3 * dice - 2) / dice``, 0 where Dice is 0 (as the official code); 1 for a perfect mask,
    negative once Dice < 2/3 (mis-segmented pixels outnumber the correct ones). Float64."""
    dice = np.asarray(dice, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(dice == 0, 0.0, (3 * dice - 2) / np.where(dice == 0, 1.0, dice))


def dice_from_counts(inter: np.ndarray, total: np.ndarray) -> np.ndarray:
    """Dice (float64) from intersection and total (``|pred| + |gt|``) pixel counts of any
    matching shapes: 1 where both masks are empty, 0 where one is, else ``2 * inter / total``
    (one IEEE float64 division of exact integers, as :func:`dice_iou` on a device)."""
    inter, total = np.asarray(inter), np.asarray(total)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2.0 * inter / np.maximum(total, 1), 1.0)


def iou_from_counts(inter: np.ndarray, total: np.ndarray) -> np.ndarray:
    """IoU (float64) from the counts of :func:`dice_from_counts`: 1 where both masks are empty,
    else ``inter / (total - inter)``."""
    inter, total = np.asarray(inter), np.asarray(total)
    union = total - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


def overlap_counts(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(..., H, W) bool masks and ground truth (broadcast against each other) on one device ->
    (...) int64 intersection and total (``|pred| + |gt|``) pixel counts, on that device."""
    inter = (pred & gt).sum(dim=(-2, -1))
    total = pred.sum(dim=(-2, -1)) + gt.sum(dim=(-2, -1))
    return inter, total


def dice_iou(inter: torch.Tensor, total: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU (float64, on the counts' device) from :func:`overlap_counts`.

    The numbers of :func:`~sam_ft.evaluation.metrics.object_metrics.batch_slice_metrics` bit for
    bit: 1 when both masks are empty, 0 when one is, else ``2 * inter / total`` and ``inter / (total
    - inter)``, each one IEEE float64 division of exact integers (correctly rounded on CPUs and CUDA
    alike), as numpy's and Python's.
    """
    inter, total = inter.double(), total.double()
    union = total - inter
    dice = torch.where(total > 0, 2.0 * inter / total.clamp_min(1), 1.0)
    iou = torch.where(union > 0, inter / union.clamp_min(1), 1.0)
    return dice, iou


def overlap_scores(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dice and IoU of (..., H, W) bool masks against their ground truth on the masks' device
    -> (...) float64 each (:func:`dice_iou` of :func:`overlap_counts`)."""
    return dice_iou(*overlap_counts(pred, gt))


def dice_matrix(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise Dice between (M, H, W) and (K, H, W) bool masks -> (M, K) float.

    Two empty masks score 1.0 (they agree); an empty and a non-empty mask score 0.0.
    Intersections are counted only over the pixels of each ``b`` mask, which keeps memory at
    O(M * |b_k|) instead of materialising M x K full-size products.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    if a.shape[1:] != b.shape[1:]:
        raise ValueError(f"mask sizes differ: {a.shape[1:]} vs {b.shape[1:]}")
    a_flat = a.reshape(len(a), -1)
    b_flat = b.reshape(len(b), -1)
    area_a = a_flat.sum(axis=1, dtype=np.int64)
    area_b = b_flat.sum(axis=1, dtype=np.int64)
    inter = np.empty((len(a), len(b)), dtype=np.int64)
    for k in range(len(b)):
        idx = np.flatnonzero(b_flat[k])
        inter[:, k] = a_flat[:, idx].sum(axis=1, dtype=np.int64)
    return dice_from_counts(inter, area_a[:, None] + area_b[None, :])


def match_masks_to_objects(generated: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Match each ground-truth object to the generated mask with the highest Dice (study's S1).

    Several objects may pick the same generated mask, as in the study (no one-to-one assignment).

    Args:
        generated: (M, H, W) bool masks from automatic mask generation; M may be 0.
        gt: (K, H, W) bool ground-truth object masks.

    Returns:
        index: (K,) int64 index into ``generated`` (-1 when M == 0).
        dice: (K,) float64 Dice of the chosen mask (0.0 when M == 0).
    """
    gt = np.asarray(gt, dtype=bool)
    k = len(gt)
    generated = np.asarray(generated, dtype=bool)
    if generated.size == 0 or len(generated) == 0:
        return np.full(k, -1, dtype=np.int64), np.zeros(k, dtype=np.float64)
    dice = dice_matrix(generated, gt)  # (M, K)
    index = dice.argmax(axis=0)
    return index.astype(np.int64), dice[index, np.arange(k)]
