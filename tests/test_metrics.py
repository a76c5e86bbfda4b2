"""Metrics: hand-computed cases, the empty-mask rules, and agreement with MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from sam_ft.evaluation.metrics import (
    METRIC_KEYS,
    batch_slice_metrics,
    slice_metrics,
    volume_metrics,
)


def _square(shape=(8, 8), r0=2, c0=2, size=4) -> np.ndarray:
    m = np.zeros(shape, dtype=bool)
    m[r0 : r0 + size, c0 : c0 + size] = True
    return m


def _blob(rng: np.random.Generator, shape=(40, 48)) -> np.ndarray:
    """A random ellipse plus random pixels: irregular surfaces, sometimes empty."""
    rows, cols = np.mgrid[: shape[0], : shape[1]]
    cr, cc = rng.uniform(5, shape[0] - 5), rng.uniform(5, shape[1] - 5)
    ar, ac = rng.uniform(2, 12), rng.uniform(2, 12)
    m = ((rows - cr) / ar) ** 2 + ((cols - cc) / ac) ** 2 < 1
    return m | (rng.random(shape) < 0.01)


def test_shift_by_one_row_with_anisotropic_spacing():
    # 4x4 square moved down one row: 12 of 16 pixels overlap -> Dice 24/32, IoU 12/20.
    # The moved bottom edge is one row (2.0 mm) from the old one; every other surface pixel is
    # 0 or one column (0.5 mm) away, so the 95th percentile is 2.0 mm.
    gt = _square()
    m = slice_metrics(np.roll(gt, 1, axis=0), gt, spacing=(2.0, 0.5), nsd_tolerance_mm=2.0)
    assert set(m) == set(METRIC_KEYS)
    assert m["dice"] == pytest.approx(0.75)
    assert m["iou"] == pytest.approx(0.6)
    assert m["hd95"] == pytest.approx(2.0)
    assert m["nsd"] == pytest.approx(1.0)
    assert not (m["empty_pred"] or m["empty_gt"] or m["hd95_missing"])


def test_shift_by_one_column_uses_column_spacing():
    gt = _square()
    m = slice_metrics(np.roll(gt, 1, axis=1), gt, spacing=(2.0, 0.5))
    assert m["hd95"] == pytest.approx(0.5)


def test_nsd_counts_surface_within_tolerance():
    # With a 1 mm tolerance the 4 shifted-edge pixels (2 mm away) fail in each direction:
    # (8 + 8) of (12 + 12) surface pixels are within tolerance.
    gt = _square()
    m = slice_metrics(np.roll(gt, 1, axis=0), gt, spacing=(2.0, 0.5), nsd_tolerance_mm=1.0)
    assert m["nsd"] == pytest.approx(16 / 24)


def test_identical_masks():
    gt = _square()
    m = slice_metrics(gt, gt, spacing=(3.0, 3.0))
    assert (m["dice"], m["iou"], m["hd95"], m["nsd"]) == (1.0, 1.0, 0.0, 1.0)


def test_empty_prediction_is_a_failure_with_missing_hd95():
    m = slice_metrics(np.zeros((8, 8), bool), _square())
    assert (m["dice"], m["iou"], m["nsd"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m["hd95"]) and m["hd95_missing"]
    assert m["empty_pred"] and not m["empty_gt"]


def test_empty_ground_truth_with_prediction():
    m = slice_metrics(_square(), np.zeros((8, 8), bool))
    assert (m["dice"], m["iou"], m["nsd"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m["hd95"]) and m["hd95_missing"]
    assert m["empty_gt"] and not m["empty_pred"]


def test_both_empty_is_perfect():
    empty = np.zeros((8, 8), bool)
    m = slice_metrics(empty, empty)
    assert (m["dice"], m["iou"], m["hd95"], m["nsd"]) == (1.0, 1.0, 0.0, 1.0)
    assert not m["hd95_missing"]


def test_shape_and_spacing_checks():
    with pytest.raises(ValueError, match="differ in shape"):
        slice_metrics(np.zeros((4, 4), bool), np.zeros((4, 5), bool))
    with pytest.raises(ValueError, match="spacing"):
        slice_metrics(_square(), _square(), spacing=(1.0, 1.0, 1.0))


def _monai_reference(pred, gt, spacing, tol):
    p, g = torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(
            p, g, include_background=True, percentile=95, spacing=spacing
        )
        nsd = compute_surface_dice(
            p, g, class_thresholds=[tol], include_background=True, spacing=spacing
        )
    inter = np.logical_and(pred, gt).sum()
    dice = 2 * inter / (pred.sum() + gt.sum())
    return dice, inter / np.logical_or(pred, gt).sum(), float(hd), float(nsd)


def test_random_masks_match_monai_and_batch_matches_single():
    rng = np.random.default_rng(0)
    spacing = (0.7, 1.3)
    gt = _blob(rng)
    preds = np.stack([_blob(rng) for _ in range(12)] + [np.zeros_like(gt)])
    batch = batch_slice_metrics(preds, gt, spacing=spacing, nsd_tolerance_mm=1.5)
    pergt = batch_slice_metrics(preds, np.broadcast_to(gt, preds.shape), spacing, 1.5)
    for i, pred in enumerate(preds):
        single = slice_metrics(pred, gt, spacing=spacing, nsd_tolerance_mm=1.5)
        for key in METRIC_KEYS:
            for got in (batch[key][i], pergt[key][i]):
                assert got == pytest.approx(single[key], abs=1e-6, nan_ok=True), key
        if pred.any():
            dice, iou, hd, nsd = _monai_reference(pred, gt, spacing, 1.5)
            assert single["dice"] == pytest.approx(dice, abs=1e-6)
            assert single["iou"] == pytest.approx(iou, abs=1e-6)
            assert single["hd95"] == pytest.approx(hd, abs=1e-5)
            assert single["nsd"] == pytest.approx(nsd, abs=1e-6)
    assert batch["hd95_missing"][-1] and batch["empty_pred"][-1]


def test_batch_with_one_gt_per_prediction_and_empty_gt():
    gt = np.stack([_square(), np.zeros((8, 8), bool)])
    preds = np.stack([np.roll(_square(), 1, axis=0), np.zeros((8, 8), bool)])
    out = batch_slice_metrics(preds, gt, spacing=(2.0, 0.5))
    np.testing.assert_allclose(out["dice"], [0.75, 1.0])
    np.testing.assert_allclose(out["hd95"], [2.0, 0.0])
    np.testing.assert_array_equal(out["empty_gt"], [False, True])
    with pytest.raises(ValueError, match="fits neither"):
        batch_slice_metrics(preds, np.zeros((3, 8, 8), bool))


def test_volume_metrics_use_slice_spacing():
    # A cube moved by one slice: the moved face is one slice (5 mm) away, the rest 0 or in-plane.
    gt = np.zeros((6, 8, 8), dtype=bool)
    gt[1:5, 2:6, 2:6] = True
    pred = np.roll(gt, 1, axis=0)
    m = volume_metrics(pred, gt, spacing=(5.0, 0.5, 0.5), nsd_tolerance_mm=2.0)
    assert m["dice"] == pytest.approx(0.75)
    assert m["hd95"] == pytest.approx(5.0)
    assert 0.0 < m["nsd"] < 1.0
    empty = volume_metrics(np.zeros_like(gt), gt, spacing=(5.0, 0.5, 0.5))
    assert empty["dice"] == 0.0 and empty["hd95_missing"]
