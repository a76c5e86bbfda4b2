"""Overlap and surface metrics for one object: Dice, IoU, conformity, HD95, HD and ASD (mm), NSD.

Arrays are indexed (row, col) in 2D and (slice, row, col) in 3D; ``spacing`` is given in the same
order, in mm (for a 2D image without spacing, (1, 1): distances are then in pixels). HD95 follows
MONAI: a mask's surface is its foreground pixels that touch the background under 4-connectivity
(pixels on the image border count as surface), distances are Euclidean between surface pixel
centres scaled by the spacing.

- HD95: the larger of the two directed 95th percentiles (linear interpolation) of surface
  distances, as ``monai.metrics.compute_hausdorff_distance(percentile=95)``.
- HD: the larger of the two directed maxima, ``compute_hausdorff_distance()`` (the official
  ``cal_matric.py``'s ``hd``).
- ASD: the mean distance from the prediction's surface pixels to the GT surface (directed, as the
  official ``asd(result, reference)``), ``compute_average_surface_distance(symmetric=False)``.
- conformity: ``(3 Dice - 2) / Dice``, 0 where Dice is 0 (the official ``d2c``).
- NSD, ``nsd_method="area"`` (the study's): DeepMind's surface Dice (the ``surface-distance``
  package, used by the Decathlon and MedSAM papers): surface elements on the grid of voxel
  corners, each weighted by its area (3D) or contour length (2D) from the neighbour-code lookup
  table, the fraction of the total area of both surfaces lying within ``nsd_tolerance_mm`` of the
  other surface. The table is MONAI's (``get_code_to_measure_table``, DeepMind's tables), as
  ``monai.metrics.compute_surface_dice(use_subvoxels=True)``.
- NSD, ``nsd_method="count"``: the fraction of surface VOXELS within the tolerance, as
  ``monai.metrics.compute_surface_dice`` without sub-voxels (every surface voxel weighs the same,
  whatever its spacing and orientation).

Empty masks are scored explicitly, never left to MONAI (which returns NaN, inf or, for HD, 0),
by the one rule of :mod:`sam_ft.evaluation.metrics.overlap` (its table lists Dice, IoU, NSD and
HD95).

A missing HD95 is never replaced by 0 (the official COSMOS code did, which hides failed
predictions); averages must skip it and report how many were missing.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Sequence

import numpy as np
import torch
from monai.metrics import (
    compute_average_surface_distance,
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)

from sam_ft.evaluation.metrics.overlap import conformity, dice_from_counts, empty_rule
from sam_ft.evaluation.metrics.surface import GtSurface

METRIC_KEYS = (
    "dice", "iou", "hd95", "hd", "asd", "nsd", "conformity", "empty_pred", "empty_gt",
    "hd95_missing",
)  # fmt: skip
NSD_METHODS = ("area", "count")
"""``area``: DeepMind's surface Dice (surface-element areas; default); ``count``: surface voxels."""


def _check_nsd_method(nsd_method: str) -> None:
    if nsd_method not in NSD_METHODS:
        raise ValueError(f"nsd_method must be one of {NSD_METHODS}, got {nsd_method!r}")


def _check_pair(pred: np.ndarray, gt: np.ndarray, ndim: int, spacing: Sequence[float]) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ in shape")
    if pred.ndim != ndim:
        raise ValueError(f"expected {ndim}D masks, got shape {pred.shape}")
    if len(spacing) != ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs {ndim} values (one per axis)")


def _monai_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float,
    nsd_method: str,
) -> dict:
    """All four metrics from MONAI for a pair of NON-empty masks of any dimension."""
    p = torch.from_numpy(pred)[None, None]
    g = torch.from_numpy(gt)[None, None]
    inter, total = np.count_nonzero(pred & gt), np.count_nonzero(pred) + np.count_nonzero(gt)
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI emits a deprecation warning from its own internals on every call.
        warnings.simplefilter("ignore", FutureWarning)
        dice = compute_dice(p.float(), g.float(), include_background=True)
        iou = compute_iou(p.float(), g.float(), include_background=True)
        hd = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=sp)
        hd_max = compute_hausdorff_distance(p, g, include_background=True, spacing=sp)
        asd = compute_average_surface_distance(
            p, g, include_background=True, symmetric=False, spacing=sp
        )
        nsd = compute_surface_dice(
            p,
            g,
            class_thresholds=[float(nsd_tolerance_mm)],
            include_background=True,
            spacing=sp,
            use_subvoxels=nsd_method == "area",
        )
    return {
        "dice": float(dice),
        "iou": float(iou),
        "hd95": float(hd),
        "hd": float(hd_max),
        "asd": float(asd),
        "nsd": float(nsd),
        # From the exact float64 Dice: 1 / Dice would magnify MONAI's float32 rounding.
        "conformity": float(conformity(dice_from_counts(inter, total))),
        "empty_pred": False,
        "empty_gt": False,
        "hd95_missing": False,
    }


def slice_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float,
    nsd_method: str,
) -> dict:
    """Score one predicted object mask against its ground truth on one 2D slice.

    Args:
        pred: (H, W) bool predicted mask, at the original image resolution.
        gt: (H, W) bool ground-truth mask.
        spacing: (row, col) pixel spacing in mm.
        nsd_tolerance_mm: NSD tolerance in mm.
        nsd_method: ``area`` (DeepMind's surface Dice) or ``count`` (surface voxels).

    Returns:
        dict with ``dice, iou, hd95, hd, asd`` (mm, NaN when missing), ``nsd``, ``conformity``,
        ``empty_pred``, ``empty_gt``, ``hd95_missing``; empty masks follow the module table.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    _check_pair(pred, gt, 2, spacing)
    _check_nsd_method(nsd_method)
    empty_pred, empty_gt = not pred.any(), not gt.any()
    if empty_pred or empty_gt:
        return empty_rule(empty_pred, empty_gt)
    return _monai_metrics(pred, gt, spacing, nsd_tolerance_mm, nsd_method)


def volume_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float,
    nsd_method: str,
) -> dict:
    """Score one object over a whole case: its per-slice masks stacked back into a volume.

    Args:
        pred: (D, H, W) bool predicted mask; slices without a prediction are all False.
        gt: (D, H, W) bool ground-truth mask.
        spacing: (slice, row, col) voxel spacing in mm.
        nsd_tolerance_mm: NSD tolerance in mm.
        nsd_method: ``area`` or ``count`` (see :func:`slice_metrics`).

    Returns:
        the same keys as :func:`slice_metrics`, computed in 3D with the voxel spacing.
    """
    out = batch_volume_metrics([pred], gt, spacing, nsd_tolerance_mm, nsd_method)  # checks pair
    return {key: out[key][0].item() for key in METRIC_KEYS}


def batch_volume_metrics(
    preds: Iterable[np.ndarray],
    gt: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float,
    nsd_method: str,
) -> dict[str, np.ndarray]:
    """Score many predicted volumes of one object (e.g. its prompt variants) against one GT.

    Gives the same numbers as :func:`volume_metrics` per prediction, faster: the work that
    depends on the ground truth alone (its surface, the distance map to that surface) is done
    once for all predictions. Predictions are taken one at a time, so a generator of volumes
    keeps a single (D, H, W) prediction in memory however many variants there are.

    Args:
        preds: (D, H, W) bool predicted volumes: an iterable, or an (N, D, H, W) array.
        gt: (D, H, W) bool ground truth shared by all predictions.
        spacing: (slice, row, col) voxel spacing in mm.
        nsd_tolerance_mm: NSD tolerance in mm.
        nsd_method: ``area`` or ``count`` (see :func:`slice_metrics`).

    Returns:
        dict of (N,) arrays under the keys of :func:`slice_metrics` (float64 or bool).
    """
    gt = np.asarray(gt, dtype=bool)
    if gt.ndim != 3:
        raise ValueError(f"gt must be (D, H, W), got shape {gt.shape}")
    if len(spacing) != 3:
        raise ValueError(f"spacing {tuple(spacing)} needs 3 values (slice, row, col)")
    _check_nsd_method(nsd_method)
    target = GtSurface(gt, spacing, float(nsd_tolerance_mm), nsd_method)
    if isinstance(preds, np.ndarray) and preds.shape[1:] == gt.shape:
        target.cover(preds)
    scores = []
    for pred in preds:
        pred = np.asarray(pred, dtype=bool)
        _check_pair(pred, gt, 3, spacing)
        scores.append(target.score(pred))
    return _columns(scores)


def batch_slice_metrics(
    preds: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float],
    nsd_tolerance_mm: float,
    nsd_method: str,
) -> dict[str, np.ndarray]:
    """Score many predicted masks of one slice (e.g. the prompt variants of one object) at once.

    Gives the same numbers as :func:`slice_metrics` per mask, faster: the ground truth's surface
    and the distance map to it are computed once for all masks sharing it, and HD95 / NSD come
    from exact distance transforms over bounding boxes instead of the whole slice.

    Args:
        preds: (N, H, W) bool predicted masks.
        gt: (H, W) bool ground truth shared by all predictions, or (N, H, W) one per prediction.
        spacing: (row, col) pixel spacing in mm.
        nsd_tolerance_mm: NSD tolerance in mm.
        nsd_method: ``area`` or ``count`` (see :func:`slice_metrics`).

    Returns:
        dict of (N,) arrays under the keys of :func:`slice_metrics` (float64 or bool).
    """
    preds = np.asarray(preds, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if preds.ndim != 3:
        raise ValueError(f"preds must be (N, H, W), got shape {preds.shape}")
    if gt.shape not in (preds.shape, preds.shape[1:]):
        raise ValueError(f"gt {gt.shape} fits neither (H, W) nor (N, H, W) of preds {preds.shape}")
    if len(spacing) != 2:
        raise ValueError(f"spacing {tuple(spacing)} needs 2 values (row, col)")
    _check_nsd_method(nsd_method)
    tol = float(nsd_tolerance_mm)
    if gt.ndim == 3 and len(gt) > 0 and gt.strides[0] == 0:
        gt = gt[0]  # one mask broadcast to every prediction: share its work as well
    if gt.ndim == 2:
        target = GtSurface(gt, spacing, tol, nsd_method)
        target.cover(preds)
        return _columns([target.score(p) for p in preds])
    return _columns(
        [GtSurface(g, spacing, tol, nsd_method).score(p) for p, g in zip(preds, gt, strict=True)]
    )


def _columns(scores: list[dict]) -> dict[str, np.ndarray]:
    """Per-prediction score dicts as (N,) arrays per key (float64, or bool for the flags)."""
    out = {}
    for key in METRIC_KEYS:
        dtype = bool if key in ("empty_pred", "empty_gt", "hd95_missing") else np.float64
        out[key] = np.array([s[key] for s in scores], dtype=dtype)
    return out
