"""Overlap and surface metrics for one object: Dice, IoU, HD95 (mm) and NSD (mm tolerance).

Arrays are indexed (row, col) in 2D and (slice, row, col) in 3D; ``spacing`` is given in the same
order, in mm. Surface distances follow MONAI: a mask's surface is its foreground pixels that touch
the background under 4-connectivity (pixels on the image border count as surface), distances are
Euclidean between surface pixel centres scaled by the spacing.

- HD95: the larger of the two directed 95th percentiles (linear interpolation) of surface
  distances, as ``monai.metrics.compute_hausdorff_distance(percentile=95)``.
- NSD: the fraction of both surfaces lying within ``nsd_tolerance_mm`` of the other surface, as
  ``monai.metrics.compute_surface_dice`` (no sub-voxel areas).

Empty masks are scored explicitly, never left to MONAI (which returns NaN, inf or, for HD, 0):

============================  ====  ====  ====  =====================================
case                          Dice  IoU   NSD   HD95
============================  ====  ====  ====  =====================================
both empty                    1     1     1     0
empty pred, non-empty GT      0     0     0     NaN, ``hd95_missing=True``
non-empty pred, empty GT      0     0     0     NaN, ``hd95_missing=True``
============================  ====  ====  ====  =====================================

A missing HD95 is never replaced by 0 (the official COSMOS code did, which hides failed
predictions); averages must skip it and report how many were missing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from monai.metrics import (
    compute_dice,
    compute_hausdorff_distance,
    compute_iou,
    compute_surface_dice,
)
from scipy.ndimage import binary_erosion, distance_transform_edt

METRIC_KEYS = ("dice", "iou", "hd95", "nsd", "empty_pred", "empty_gt", "hd95_missing")


def _check_pair(pred: np.ndarray, gt: np.ndarray, ndim: int, spacing: Sequence[float]) -> None:
    if pred.shape != gt.shape:
        raise ValueError(f"pred {pred.shape} and gt {gt.shape} differ in shape")
    if pred.ndim != ndim:
        raise ValueError(f"expected {ndim}D masks, got shape {pred.shape}")
    if len(spacing) != ndim:
        raise ValueError(f"spacing {tuple(spacing)} needs {ndim} values (one per axis)")


def _empty_rule(empty_pred: bool, empty_gt: bool) -> dict:
    """Scores for a pair where at least one mask is empty (see the module table)."""
    both = empty_pred and empty_gt
    return {
        "dice": 1.0 if both else 0.0,
        "iou": 1.0 if both else 0.0,
        "hd95": 0.0 if both else float("nan"),
        "nsd": 1.0 if both else 0.0,
        "empty_pred": empty_pred,
        "empty_gt": empty_gt,
        "hd95_missing": not both,
    }


def _monai_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], nsd_tolerance_mm: float
) -> dict:
    """All four metrics from MONAI for a pair of NON-empty masks of any dimension."""
    p = torch.from_numpy(pred)[None, None]
    g = torch.from_numpy(gt)[None, None]
    sp = [float(s) for s in spacing]
    with warnings.catch_warnings():
        # MONAI emits a deprecation warning from its own internals on every call.
        warnings.simplefilter("ignore", FutureWarning)
        dice = compute_dice(p.float(), g.float(), include_background=True)
        iou = compute_iou(p.float(), g.float(), include_background=True)
        hd = compute_hausdorff_distance(p, g, include_background=True, percentile=95, spacing=sp)
        nsd = compute_surface_dice(
            p, g, class_thresholds=[float(nsd_tolerance_mm)], include_background=True, spacing=sp
        )
    return {
        "dice": float(dice),
        "iou": float(iou),
        "hd95": float(hd),
        "nsd": float(nsd),
        "empty_pred": False,
        "empty_gt": False,
        "hd95_missing": False,
    }


def slice_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0),
    nsd_tolerance_mm: float = 2.0,
) -> dict:
    """Score one predicted object mask against its ground truth on one 2D slice.

    Args:
        pred: (H, W) bool predicted mask, at the original image resolution.
        gt: (H, W) bool ground-truth mask.
        spacing: (row, col) pixel spacing in mm.
        nsd_tolerance_mm: NSD tolerance in mm.

    Returns:
        dict with ``dice, iou, hd95`` (mm, NaN when missing), ``nsd``, ``empty_pred``,
        ``empty_gt``, ``hd95_missing``; empty masks follow the module table.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    _check_pair(pred, gt, 2, spacing)
    empty_pred, empty_gt = not pred.any(), not gt.any()
    if empty_pred or empty_gt:
        return _empty_rule(empty_pred, empty_gt)
    return _monai_metrics(pred, gt, spacing, nsd_tolerance_mm)


def volume_metrics(
    pred: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    nsd_tolerance_mm: float = 2.0,
) -> dict:
    """Score one object over a whole case: its per-slice masks stacked back into a volume.

    Args:
        pred: (D, H, W) bool predicted mask; slices without a prediction are all False.
        gt: (D, H, W) bool ground-truth mask.
        spacing: (slice, row, col) voxel spacing in mm.
        nsd_tolerance_mm: NSD tolerance in mm.

    Returns:
        the same keys as :func:`slice_metrics`, computed in 3D with the voxel spacing.
    """
    pred = np.asarray(pred, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    _check_pair(pred, gt, 3, spacing)
    empty_pred, empty_gt = not pred.any(), not gt.any()
    if empty_pred or empty_gt:
        return _empty_rule(empty_pred, empty_gt)
    hd95, nsd = _surface_scores(pred, gt, spacing, float(nsd_tolerance_mm))
    inter = float(np.count_nonzero(pred & gt))
    total = float(np.count_nonzero(pred) + np.count_nonzero(gt))
    return {
        "dice": 2.0 * inter / total,
        "iou": inter / (total - inter),
        "hd95": hd95,
        "nsd": nsd,
        "empty_pred": False,
        "empty_gt": False,
        "hd95_missing": False,
    }


def _surface_scores(
    pred: np.ndarray, gt: np.ndarray, spacing: Sequence[float], tol: float
) -> tuple[float, float]:
    """(HD95, NSD) of two NON-empty masks of any dimension, as MONAI computes them.

    A surface is the mask minus its erosion (face connectivity, voxels on the array border
    count); distances come from exact Euclidean distance transforms, as in MONAI, but over the
    union's bounding box padded by one voxel instead of the whole array. Every surface voxel of
    both masks lies in that box, so the nearest-surface distances are unchanged, while an
    object of a 512 x 512 x 100 volume costs a small fraction of the full transforms.
    """
    lo, hi = _bbox(pred | gt)
    box = [slice(a, b + 1) for a, b in zip(lo, hi, strict=True)]
    # Zero padding: outside the box is background or beyond the array, both make a surface.
    p = np.pad(pred[tuple(box)], 1)
    g = np.pad(gt[tuple(box)], 1)
    p_edge = p & ~binary_erosion(p)
    g_edge = g & ~binary_erosion(g)
    sampling = [float(s) for s in spacing]
    # float32 like MONAI, so ties at the NSD tolerance fall the same way.
    d_pg = distance_transform_edt(~g_edge, sampling=sampling)[p_edge].astype(np.float32)
    d_gp = _distances_near(g_edge, p_edge, sampling).astype(np.float32)
    within = np.count_nonzero(d_pg <= tol) + np.count_nonzero(d_gp <= tol)
    return _hd95(d_pg, d_gp), within / (len(d_pg) + len(d_gp))


def _bbox(mask: np.ndarray) -> tuple[list[int], list[int]]:
    """First and last index of a non-empty mask's foreground along each axis (inclusive)."""
    lo, hi = [], []
    for axis in range(mask.ndim):
        idx = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        lo.append(int(idx[0]))
        hi.append(int(idx[-1]))
    return lo, hi


def _distances_near(src: np.ndarray, dst: np.ndarray, sampling: list[float]) -> np.ndarray:
    """Distance (mm) from every ``src`` voxel to the nearest ``dst`` voxel (both non-empty).

    The transform runs on ``src``'s bounding box grown by ``r`` voxels, ``r`` growing until every
    distance found is at most ``r * min(sampling)``: any voxel outside that window is farther,
    so the result is exact, while a prediction hugging its object (or a noisy one spread over
    the whole image) needs only a small window around the ground truth's surface.
    """
    lo, hi = _bbox(src)
    r = 4
    while True:
        win = tuple(
            slice(max(a - r, 0), min(b + 1 + r, n))
            for a, b, n in zip(lo, hi, src.shape, strict=True)
        )
        whole = all(w.start == 0 and w.stop == n for w, n in zip(win, src.shape, strict=True))
        near = dst[win]
        if near.any():
            d = distance_transform_edt(~near, sampling=sampling)[src[win]]
            if whole or d.max() <= r * min(sampling):
                return d
        r *= 4


def _hd95(d_pred_to_gt: np.ndarray, d_gt_to_pred: np.ndarray) -> float:
    # torch.quantile in float32 on float32 distances, exactly as MONAI computes it.
    q = [torch.quantile(torch.from_numpy(d), 0.95) for d in (d_pred_to_gt, d_gt_to_pred)]
    return float(torch.max(torch.stack(q)))


def batch_slice_metrics(
    preds: np.ndarray,
    gt: np.ndarray,
    spacing: Sequence[float] = (1.0, 1.0),
    nsd_tolerance_mm: float = 2.0,
) -> dict[str, np.ndarray]:
    """Score many predicted masks of one slice (e.g. the prompt variants of one object) at once.

    Gives the same numbers as calling :func:`slice_metrics` per mask, faster: Dice and IoU are
    vectorised; HD95 and NSD come from distance transforms over each pair's bounding box.

    Args:
        preds: (N, H, W) bool predicted masks.
        gt: (H, W) bool ground truth shared by all predictions, or (N, H, W) one per prediction.
        spacing: (row, col) pixel spacing in mm.
        nsd_tolerance_mm: NSD tolerance in mm.

    Returns:
        dict of (N,) arrays under the keys of :func:`slice_metrics` (float64 or bool).
    """
    preds = np.asarray(preds, dtype=bool)
    gt = np.asarray(gt, dtype=bool)
    if preds.ndim != 3:
        raise ValueError(f"preds must be (N, H, W), got shape {preds.shape}")
    shared = gt.ndim == 2
    if gt.shape not in (preds.shape, preds.shape[1:]):
        raise ValueError(f"gt {gt.shape} fits neither (H, W) nor (N, H, W) of preds {preds.shape}")
    if len(spacing) != 2:
        raise ValueError(f"spacing {tuple(spacing)} needs 2 values (row, col)")
    gts = np.broadcast_to(gt, preds.shape) if shared else gt
    n = len(preds)

    p = preds.reshape(n, -1)
    g = gts.reshape(n, -1)
    inter = np.count_nonzero(p & g, axis=1).astype(np.float64)
    sum_p = np.count_nonzero(p, axis=1).astype(np.float64)
    sum_g = np.count_nonzero(g, axis=1).astype(np.float64)
    out = {
        "dice": 2.0 * inter / np.maximum(sum_p + sum_g, 1.0),
        "iou": inter / np.maximum(sum_p + sum_g - inter, 1.0),
        "hd95": np.full(n, np.nan),
        "nsd": np.zeros(n),
        "empty_pred": sum_p == 0,
        "empty_gt": sum_g == 0,
        "hd95_missing": np.zeros(n, dtype=bool),
    }

    tol = float(nsd_tolerance_mm)
    for i in range(n):
        if out["empty_pred"][i] or out["empty_gt"][i]:
            for key, value in _empty_rule(
                bool(out["empty_pred"][i]), bool(out["empty_gt"][i])
            ).items():
                out[key][i] = value
            continue
        out["hd95"][i], out["nsd"][i] = _surface_scores(preds[i], gts[i], spacing, tol)
    return out
