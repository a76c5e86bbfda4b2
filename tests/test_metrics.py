"""Metrics: hand-computed cases, the empty-mask rules, and agreement with MONAI."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from monai.metrics import compute_hausdorff_distance, compute_surface_dice

from sam_ft.evaluation.metrics.object_metrics import (
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
    m = slice_metrics(np.roll(gt, 1, axis=0), gt, (2.0, 0.5), 2.0, "area")
    assert set(m) == set(METRIC_KEYS)
    assert m["dice"] == pytest.approx(0.75)
    assert m["iou"] == pytest.approx(0.6)
    assert m["hd95"] == pytest.approx(2.0)
    assert m["nsd"] == pytest.approx(1.0)
    assert not (m["empty_pred"] or m["empty_gt"] or m["hd95_missing"])


def test_shift_by_one_column_uses_column_spacing():
    gt = _square()
    m = slice_metrics(np.roll(gt, 1, axis=1), gt, (2.0, 0.5), 2.0, "area")
    assert m["hd95"] == pytest.approx(0.5)


def test_nsd_counts_surface_within_tolerance():
    # nsd_method=count: with a 1 mm tolerance the 4 shifted-edge pixels (2 mm away) fail in each
    # direction: (8 + 8) of (12 + 12) surface pixels are within tolerance.
    gt = _square()
    shifted = np.roll(gt, 1, axis=0)
    m = slice_metrics(shifted, gt, (2.0, 0.5), 1.0, "count")
    assert m["nsd"] == pytest.approx(16 / 24)
    batch = batch_slice_metrics(shifted[None], gt, (2.0, 0.5), 1.0, "count")
    assert batch["nsd"][0] == pytest.approx(16 / 24)


def test_identical_masks():
    gt = _square()
    m = slice_metrics(gt, gt, (3.0, 3.0), 2.0, "area")
    assert (m["dice"], m["iou"], m["hd95"], m["nsd"]) == (1.0, 1.0, 0.0, 1.0)


def test_empty_prediction_is_a_failure_with_missing_hd95():
    m = slice_metrics(np.zeros((8, 8), bool), _square(), (1.0, 1.0), 2.0, "area")
    assert (m["dice"], m["iou"], m["nsd"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m["hd95"]) and m["hd95_missing"]
    assert m["empty_pred"] and not m["empty_gt"]


def test_empty_ground_truth_with_prediction():
    m = slice_metrics(_square(), np.zeros((8, 8), bool), (1.0, 1.0), 2.0, "area")
    assert (m["dice"], m["iou"], m["nsd"]) == (0.0, 0.0, 0.0)
    assert math.isnan(m["hd95"]) and m["hd95_missing"]
    assert m["empty_gt"] and not m["empty_pred"]


def test_both_empty_is_perfect():
    empty = np.zeros((8, 8), bool)
    m = slice_metrics(empty, empty, (1.0, 1.0), 2.0, "area")
    assert (m["dice"], m["iou"], m["hd95"], m["nsd"]) == (1.0, 1.0, 0.0, 1.0)
    assert not m["hd95_missing"]


def test_shape_and_spacing_checks():
    with pytest.raises(ValueError, match="differ in shape"):
        slice_metrics(np.zeros((4, 4), bool), np.zeros((4, 5), bool), (1.0, 1.0), 2.0, "area")
    with pytest.raises(ValueError, match="spacing"):
        slice_metrics(_square(), _square(), (1.0, 1.0, 1.0), 2.0, "area")


def _monai_reference(pred, gt, spacing, tol, nsd_method="area"):
    p, g = torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd = compute_hausdorff_distance(
            p, g, include_background=True, percentile=95, spacing=spacing
        )
        # use_subvoxels: MONAI's area-weighted surface Dice (DeepMind's), our default NSD.
        nsd = compute_surface_dice(
            p,
            g,
            class_thresholds=[tol],
            include_background=True,
            spacing=[float(s) for s in spacing],
            use_subvoxels=nsd_method == "area",
        )
    inter = np.logical_and(pred, gt).sum()
    dice = 2 * inter / (pred.sum() + gt.sum())
    return dice, inter / np.logical_or(pred, gt).sum(), float(hd), float(nsd)


def test_random_masks_match_monai_and_batch_matches_single():
    rng = np.random.default_rng(0)
    spacing = (0.7, 1.3)
    gt = _blob(rng)
    preds = np.stack([_blob(rng) for _ in range(12)] + [np.zeros_like(gt)])
    batch = batch_slice_metrics(preds, gt, spacing, 1.5, "area")
    pergt = batch_slice_metrics(preds, np.broadcast_to(gt, preds.shape), spacing, 1.5, "area")
    for i, pred in enumerate(preds):
        single = slice_metrics(pred, gt, spacing, 1.5, "area")
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
    out = batch_slice_metrics(preds, gt, (2.0, 0.5), 2.0, "area")
    np.testing.assert_allclose(out["dice"], [0.75, 1.0])
    np.testing.assert_allclose(out["hd95"], [2.0, 0.0])
    np.testing.assert_array_equal(out["empty_gt"], [False, True])
    with pytest.raises(ValueError, match="fits neither"):
        batch_slice_metrics(preds, np.zeros((3, 8, 8), bool), (1.0, 1.0), 2.0, "area")


def test_volume_metrics_use_slice_spacing():
    # A cube moved by one slice: the moved face is one slice (5 mm) away, the rest 0 or in-plane.
    gt = np.zeros((6, 8, 8), dtype=bool)
    gt[1:5, 2:6, 2:6] = True
    pred = np.roll(gt, 1, axis=0)
    m = volume_metrics(pred, gt, (5.0, 0.5, 0.5), 2.0, "area")
    assert m["dice"] == pytest.approx(0.75)
    assert m["hd95"] == pytest.approx(5.0)
    assert 0.0 < m["nsd"] < 1.0
    empty = volume_metrics(np.zeros_like(gt), gt, (5.0, 0.5, 0.5), 2.0, "area")
    assert empty["dice"] == 0.0 and empty["hd95_missing"]


# --------------------------------------------------------------------------------------------
# The batch APIs and the pieces that make them fast, against per-variant scores and MONAI


def _monai_scores(pred, gt, spacing, tol) -> dict:
    """MONAI's Dice, IoU, HD95 and NSD of two non-empty masks (2D or 3D)."""
    dice, iou, hd, nsd = _monai_reference(pred, gt, spacing, tol)
    return {"dice": dice, "iou": iou, "hd95": hd, "nsd": nsd}


def _assert_monai(got: dict, pred, gt, spacing, tol) -> None:
    if not (pred.any() and gt.any()):
        return
    ref = _monai_scores(pred, gt, spacing, tol)
    # MONAI returns float32: HD95 is float32 here too, Dice / IoU / NSD are float64 ratios.
    assert got["hd95"] == pytest.approx(ref["hd95"], rel=1e-6, abs=1e-6)
    for key in ("dice", "iou", "nsd"):
        assert got[key] == pytest.approx(ref[key], abs=1e-6), key


def _assert_same(batch: dict, i: int, single: dict) -> None:
    """Batch entry ``i`` equals a single-pair result bit for bit (NaN equal to NaN)."""
    for key in METRIC_KEYS:
        got, want = batch[key][i], single[key]
        assert (math.isnan(got) and math.isnan(want)) or got == want, key


def _volume_variants(rng: np.random.Generator, gt: np.ndarray) -> list[np.ndarray]:
    """Predictions of every kind the engine meets: hugging, noisy, far, partial, empty."""
    from scipy.ndimage import gaussian_filter

    shape = gt.shape
    hug = np.roll(gt, 1, axis=-1) ^ (rng.random(shape) < 0.01)
    noise = np.zeros(shape, dtype=bool)
    noise[:, 2:-2, 3:] = rng.random((shape[0], shape[1] - 4, shape[2] - 3)) < 0.5
    far = np.zeros(shape, dtype=bool)
    far[-1, -4:, -3:] = True  # a blob in the far corner only
    stray = gt.copy()
    stray[0, 0, 0] = True  # the object plus one voxel at the far border
    partial = gt.copy()
    partial[:, : shape[1] // 2] = False  # half the object missing
    blob = gaussian_filter(rng.normal(size=shape), (0.5, 2, 2)) > 0.4
    return [hug, noise, far, stray, partial, blob, np.zeros(shape, dtype=bool), gt.copy()]


def test_quantile_matches_torch_bit_for_bit():
    # The HD95 percentile skips torch's sort; it must still give torch.quantile's float32 value.
    from sam_ft.evaluation.metrics.surface import _quantile95

    rng = np.random.default_rng(3)
    sizes = [*range(1, 120), 1000, 4321, 65537]
    for n in sizes:
        spacing = rng.uniform(0.1, 5, 3)
        grid = np.sqrt(((rng.integers(0, 30, (3, n)) * spacing[:, None]) ** 2).sum(axis=0))
        for d in (
            (rng.random(n) ** 3 * rng.choice([1, 10, 1000])).astype(np.float32),
            grid.astype(np.float32),  # distances of a voxel grid: many ties
            rng.integers(0, 4, n).astype(np.float32),
        ):
            want = torch.quantile(torch.from_numpy(d), 0.95).item()
            assert float(_quantile95(d)) == want, n


def test_surface_is_mask_minus_its_erosion():
    from scipy.ndimage import binary_erosion

    from sam_ft.evaluation.metrics.surface import _surface

    rng = np.random.default_rng(4)
    for shape in [(1, 5), (5, 1), (7, 9), (1, 6, 6), (2, 8, 9), (5, 1, 4), (6, 7, 8)]:
        mask = rng.random(shape) < 0.7
        np.testing.assert_array_equal(_surface(mask), mask & ~binary_erosion(mask))


def test_distance_map_equals_scipy_edt():
    from scipy.ndimage import distance_transform_edt

    from sam_ft.evaluation.metrics import surface

    rng = np.random.default_rng(5)
    for shape in [(30, 41), (6, 25, 33)]:
        feature = rng.random(shape) < 0.02
        spacing = tuple(rng.uniform(0.3, 4, len(shape)))
        want = distance_transform_edt(~feature, sampling=spacing).astype(np.float32)
        np.testing.assert_array_equal(surface._distance_map(feature, spacing), want)


def test_batch_volume_matches_volume_metrics_and_monai():
    from sam_ft.evaluation.metrics.object_metrics import batch_volume_metrics

    rng = np.random.default_rng(6)
    for trial in range(3):
        shape = (int(rng.integers(3, 6)), int(rng.integers(24, 40)), int(rng.integers(24, 40)))
        gt = np.zeros(shape, dtype=bool)
        gt[1:-1, 6:18, 8:20] = True
        gt[1, 10:14, 10:30] = True
        spacing = (float(rng.uniform(2, 5)), float(rng.uniform(0.4, 1)), float(rng.uniform(0.4, 1)))
        tol = [2.0, spacing[0], 1.0][trial]  # one tolerance exactly one slice away
        preds = _volume_variants(rng, gt)
        batch = batch_volume_metrics(
            iter(preds), gt, spacing, tol, "area"
        )  # a generator, one at a time
        stacked = batch_volume_metrics(np.stack(preds), gt, spacing, tol, "area")
        assert len(batch["dice"]) == len(preds)
        for i, pred in enumerate(preds):
            single = volume_metrics(pred, gt, spacing, tol, "area")
            _assert_same(batch, i, single)
            _assert_same(stacked, i, single)
            _assert_monai(single, pred, gt, spacing, tol)
        assert batch["empty_pred"][-2] and batch["hd95_missing"][-2]
        assert (batch["dice"][-1], batch["hd95"][-1], batch["nsd"][-1]) == (1.0, 0.0, 1.0)


def test_batch_volume_grows_its_distance_map_for_later_predictions():
    # Each prediction reaches farther than the ones before: the shared map must be rebuilt.
    from sam_ft.evaluation.metrics.object_metrics import batch_volume_metrics

    gt = np.zeros((4, 60, 50), dtype=bool)
    gt[1:3, 25:32, 20:26] = True
    preds = []
    for reach in (2, 6, 15, 24):
        p = gt.copy()
        p[2, 28, 23 + reach] = True
        p[1, 28 - reach, 22] = True
        preds.append(p)
    spacing = (3.0, 0.7, 0.9)
    batch = batch_volume_metrics(iter(preds), gt, spacing, 1.5, "area")
    for i, pred in enumerate(preds):
        _assert_same(batch, i, volume_metrics(pred, gt, spacing, 1.5, "area"))
        _assert_monai(volume_metrics(pred, gt, spacing, 1.5, "area"), pred, gt, spacing, 1.5)


def test_gt_far_from_prediction_in_part_only():
    # A small piece of the GT far from the prediction, whose stray pixel in the far corner makes
    # the box of both large: the GT -> prediction distances come from a window around the GT.
    # Below 5% of the GT surface the far piece's distances need not be exact (they lie beyond
    # the 95th percentile), above it they set HD95. Sizes on both sides of that line.
    for size in range(1, 6):
        gt = np.zeros((300, 300), dtype=bool)
        gt[10:40, 10:40] = True
        gt[60 : 60 + size, 70 : 70 + size] = True
        pred = np.zeros_like(gt)
        pred[11:41, 9:39] = True
        pred[299, 0] = True
        spacing = (0.8, 0.6)
        out = batch_slice_metrics(pred[None], gt, spacing, 1.0, "area")
        _assert_monai({k: v[0] for k, v in out.items()}, pred, gt, spacing, 1.0)


def test_far_apart_masks_2d_and_3d():
    rng = np.random.default_rng(8)
    gt2 = np.zeros((90, 120), dtype=bool)
    gt2[5:15, 4:12] = True
    pred2 = np.zeros_like(gt2)
    pred2[70:85, 95:115] = True
    preds = np.stack([pred2, pred2 | (rng.random(gt2.shape) < 0.001)])  # far, and far + noise
    out = batch_slice_metrics(preds, gt2, (1.0, 1.0), 2.0, "area")
    for i, pred in enumerate(preds):
        _assert_monai({k: v[i] for k, v in out.items()}, pred, gt2, (1.0, 1.0), 2.0)
    gt3 = np.zeros((6, 50, 40), dtype=bool)
    gt3[0:2, 2:8, 3:9] = True
    pred3 = np.zeros_like(gt3)
    pred3[4:6, 40:48, 30:38] = True
    spacing = (4.0, 0.5, 0.7)
    m = volume_metrics(pred3, gt3, spacing, 2.0, "area")
    assert m["dice"] == 0.0 and m["nsd"] == 0.0
    _assert_monai(m, pred3, gt3, spacing, 2.0)


def test_batch_volume_empty_rules_and_checks():
    from sam_ft.evaluation.metrics.object_metrics import batch_volume_metrics

    gt = np.zeros((3, 8, 8), dtype=bool)
    gt[1, 2:6, 2:6] = True
    empty = np.zeros_like(gt)
    out = batch_volume_metrics([empty, gt], empty, (2.0, 1.0, 1.0), 2.0, "area")  # empty GT
    np.testing.assert_array_equal(out["dice"], [1.0, 0.0])
    np.testing.assert_array_equal(out["nsd"], [1.0, 0.0])
    assert out["hd95"][0] == 0.0 and math.isnan(out["hd95"][1])
    np.testing.assert_array_equal(out["hd95_missing"], [False, True])
    np.testing.assert_array_equal(out["empty_gt"], [True, True])
    out = batch_volume_metrics([empty], gt, (2.0, 1.0, 1.0), 2.0, "area")  # empty prediction
    assert out["dice"][0] == 0.0 and out["hd95_missing"][0] and out["empty_pred"][0]
    assert len(batch_volume_metrics([], gt, (1.0, 1.0, 1.0), 2.0, "area")["dice"]) == 0
    with pytest.raises(ValueError, match="differ in shape"):
        batch_volume_metrics([np.zeros((3, 8, 9), bool)], gt, (1.0, 1.0, 1.0), 2.0, "area")
    with pytest.raises(ValueError, match="spacing"):
        batch_volume_metrics([gt], gt, (1.0, 1.0), 2.0, "area")


# --- the official cal_matric.py metrics (issue 25, item 8) ---------------------------------


def _official_surface_distances(result, reference, voxelspacing=None, connectivity=1):
    """get_score.py's __surface_distances (medpy's), line for line."""
    from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

    result = np.atleast_1d(result.astype(np.bool_))
    reference = np.atleast_1d(reference.astype(np.bool_))
    footprint = generate_binary_structure(result.ndim, connectivity)
    result_border = result ^ binary_erosion(result, structure=footprint, iterations=1)
    reference_border = reference ^ binary_erosion(reference, structure=footprint, iterations=1)
    dt = distance_transform_edt(~reference_border, sampling=voxelspacing)
    return dt[result_border]


def _official_scores(pred, gt, spacing):
    """cal_matric.py's hd, asd and d2c (on a Dice in [0, 1]) for non-empty masks."""
    hd = max(
        _official_surface_distances(pred, gt, spacing).max(),
        _official_surface_distances(gt, pred, spacing).max(),
    )
    asd = _official_surface_distances(pred, gt, spacing).mean()
    dice = 2.0 * np.count_nonzero(pred & gt) / (np.count_nonzero(pred) + np.count_nonzero(gt))
    con = 0.0 if dice == 0.0 else (3 * dice - 2) / dice
    return hd, asd, con


def test_hd_asd_conformity_are_the_official_codes_and_monais():
    from monai.metrics import compute_average_surface_distance

    rng = np.random.default_rng(5)
    spacing = (0.7, 1.3)
    preds, gts = [], []
    while len(preds) < 12:
        p, g = _blob(rng), _blob(rng)
        if p.any() and g.any():
            preds.append(p)
            gts.append(g)
    preds.append(gts[0] & ~_square((40, 48), 0, 0, 40))  # no overlap: Dice 0, conformity 0
    gts.append(gts[0] & _square((40, 48), 0, 0, 40))
    batch = batch_slice_metrics(np.stack(preds), np.stack(gts), spacing, 2.0, "area")
    for i, (p, g) in enumerate(zip(preds, gts, strict=True)):
        if not (p.any() and g.any()):
            continue
        hd, asd, con = _official_scores(p, g, spacing)
        single = slice_metrics(p, g, spacing, 2.0, "area")  # the MONAI path
        for got in (single, {k: v[i] for k, v in batch.items()}):
            assert got["hd"] == pytest.approx(hd, rel=1e-5)
            assert got["asd"] == pytest.approx(asd, rel=1e-5)
            assert got["conformity"] == pytest.approx(con, rel=1e-9, abs=1e-12)
        t_p, t_g = torch.from_numpy(p)[None, None], torch.from_numpy(g)[None, None]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            monai_hd = compute_hausdorff_distance(
                t_p, t_g, include_background=True, spacing=spacing
            )
            monai_asd = compute_average_surface_distance(
                t_p, t_g, include_background=True, symmetric=False, spacing=spacing
            )
        assert batch["hd"][i] == pytest.approx(float(monai_hd), rel=1e-5)
        assert batch["asd"][i] == pytest.approx(float(monai_asd), rel=1e-5)
    # 3D: the per-case path, with the slice spacing.
    vp, vg = np.stack(preds[:4]), np.stack(gts[:4])
    hd, asd, con = _official_scores(vp, vg, (3.0, *spacing))
    got = volume_metrics(vp, vg, (3.0, *spacing), 2.0, "area")
    assert got["hd"] == pytest.approx(hd, rel=1e-5) and got["asd"] == pytest.approx(asd, rel=1e-5)
    assert got["conformity"] == pytest.approx(con, rel=1e-9)
    # An empty prediction: the official code says HD = ASD = 0; here they are missing.
    empty = slice_metrics(np.zeros_like(gts[0]), gts[0], spacing, 2.0, "area")
    assert math.isnan(empty["hd"]) and math.isnan(empty["asd"]) and empty["hd95_missing"]
    assert empty["conformity"] == 0.0
