"""NSD against DeepMind's ``surface-distance`` package (the Decathlon / MedSAM surface Dice).

The package (PyPI ``surface-distance``, a dev dependency) is the reference: our default
``nsd_method="area"`` must agree with ``compute_surface_dice_at_tolerance`` within 1e-3 on 2D and
3D masks with anisotropic spacing; ``count`` (surface voxels) is the other, documented option.
"""

from __future__ import annotations

import numpy as np
import pytest
import surface_distance
from scipy.ndimage import binary_dilation

from sam_ft.evaluation.metrics.object_metrics import (
    batch_slice_metrics,
    batch_volume_metrics,
    slice_metrics,
    volume_metrics,
)


def _deepmind_nsd(pred: np.ndarray, gt: np.ndarray, spacing, tol: float) -> float:
    distances = surface_distance.compute_surface_distances(gt, pred, spacing)
    return float(surface_distance.compute_surface_dice_at_tolerance(distances, tol))


def _pairs(rng: np.random.Generator, shape: tuple[int, ...], n: int):
    """Irregular non-empty masks: dilated random seeds plus a shifted copy of the GT."""
    for _ in range(n):
        gt = binary_dilation(rng.random(shape) > 0.985, iterations=2)
        pred = binary_dilation(rng.random(shape) > 0.985, iterations=2)
        yield pred | np.roll(gt, 1, axis=-1), gt


@pytest.mark.parametrize("spacing", [(1.5, 0.7), (0.4, 2.5), (1.0, 1.0)])
def test_2d_area_nsd_matches_surface_distance(spacing):
    rng = np.random.default_rng(1)
    for pred, gt in _pairs(rng, (40, 52), 4):
        for tol in (0.5, 1.0, 2.0, 3.5):
            want = _deepmind_nsd(pred, gt, spacing, tol)
            assert slice_metrics(pred, gt, spacing, tol, "area")["nsd"] == pytest.approx(
                want, abs=1e-3
            )
            got = batch_slice_metrics(pred[None], gt, spacing, tol, "area")["nsd"][0]
            assert got == pytest.approx(want, abs=1e-3)


@pytest.mark.parametrize("spacing", [(5.0, 0.8, 0.7), (2.5, 1.5, 0.6)])
def test_3d_area_nsd_matches_surface_distance(spacing):
    rng = np.random.default_rng(2)
    pairs = list(_pairs(rng, (7, 30, 36), 3))
    gt = pairs[0][1]
    preds = [p for p, _ in pairs]
    for tol in (1.0, 2.0, 6.0):
        batch = batch_volume_metrics(iter(preds), gt, spacing, tol, "area")["nsd"]
        for i, pred in enumerate(preds):
            want = _deepmind_nsd(pred, gt, spacing, tol)
            assert volume_metrics(pred, gt, spacing, tol, "area")["nsd"] == pytest.approx(
                want, abs=1e-3
            )
            assert batch[i] == pytest.approx(want, abs=1e-3)


def test_voxel_count_nsd_is_another_number_on_anisotropic_masks():
    """The count option weighs every surface voxel the same, so on anisotropic data it departs
    from the field's area-weighted NSD: the default must be the area one."""
    gt = np.zeros((8, 40, 40), dtype=bool)
    gt[2:6, 8:30, 10:22] = True
    pred = np.roll(gt, 2, axis=2)
    spacing = (5.0, 0.5, 0.5)
    want = _deepmind_nsd(pred, gt, spacing, 0.6)
    area = volume_metrics(pred, gt, spacing, 0.6, "area")["nsd"]
    count = volume_metrics(pred, gt, spacing, 0.6, "count")["nsd"]
    assert area == pytest.approx(want, abs=1e-3)
    assert abs(count - want) > 0.01
    with pytest.raises(ValueError, match="nsd_method"):
        volume_metrics(pred, gt, spacing, 0.6, "voxels")
