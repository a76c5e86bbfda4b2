"""Object attributes on hand-made shapes, and the Spearman table."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from sam_ft.evaluation.metrics.attributes import object_attributes, spearman_table

ROWS, COLS = np.mgrid[:128, :128]


def _disc(radius: float = 30.0) -> np.ndarray:
    return np.hypot(ROWS - 64, COLS - 64) < radius


def _star(radius: float = 40.0, arms: int = 5) -> np.ndarray:
    theta = np.arctan2(ROWS - 64, COLS - 64)
    return np.hypot(ROWS - 64, COLS - 64) < radius * (1 + 0.4 * np.cos(arms * theta))


def _rect(r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    m = np.zeros((128, 128), dtype=bool)
    m[r0:r1, c0:c1] = True
    return m


def test_area_and_aspect_ratio():
    a = object_attributes(_rect(10, 30, 20, 80), spacing=(1.0, 1.0))
    assert a["area_px"] == 20 * 60
    assert a["area_mm2"] == pytest.approx(1200.0)
    assert a["aspect_ratio"] == pytest.approx(3.0)
    assert object_attributes(_rect(10, 50, 10, 50))["aspect_ratio"] == pytest.approx(1.0)


def test_aspect_ratio_is_measured_in_mm():
    # 40 x 20 pixels with 0.5 mm rows is 20 x 20 mm: a square.
    a = object_attributes(_rect(10, 50, 10, 30), spacing=(0.5, 1.0))
    assert a["aspect_ratio"] == pytest.approx(1.0)
    assert a["area_mm2"] == pytest.approx(400.0)


def test_boundary_complexity_orders_disc_square_star():
    disc = object_attributes(_disc())["boundary_complexity"]
    square = object_attributes(_rect(24, 104, 24, 104))["boundary_complexity"]
    star = object_attributes(_star())["boundary_complexity"]
    assert disc == pytest.approx(1.0, abs=0.03)
    assert square == pytest.approx(4 / math.pi, abs=0.05)
    assert disc < square < star
    assert star > 2.0


def test_boundary_complexity_is_scale_free():
    a = object_attributes(_disc(), spacing=(0.8, 0.8))["boundary_complexity"]
    b = object_attributes(_disc(), spacing=(1.0, 1.0))["boundary_complexity"]
    assert a == pytest.approx(b)


def test_contrast_from_inside_and_ring():
    mask = _disc(20)
    image = np.zeros((128, 128))
    image[mask] = 10.0
    # Inside 10, ring 0: difference 10 over the image std.
    expected = 10.0 / image.std()
    assert object_attributes(mask, image)["contrast"] == pytest.approx(expected, rel=1e-5)
    flat = object_attributes(mask, np.full((128, 128), 3.0))
    assert flat["contrast"] == pytest.approx(0.0)
    assert math.isnan(object_attributes(mask)["contrast"])


def test_contrast_ignores_intensities_beyond_the_ring():
    mask = _disc(20)
    image = np.zeros((128, 128))
    image[mask] = 10.0
    far = np.hypot(ROWS - 64, COLS - 64) > 40
    image[far] = 10.0  # the ring (radius 20..25) stays 0
    a = object_attributes(mask, image, ring_px=5)
    assert a["contrast"] == pytest.approx(10.0 / image.std(), rel=1e-5)


def test_empty_mask_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        object_attributes(np.zeros((8, 8), bool))


def test_spearman_table_values():
    df = pd.DataFrame(
        {
            "model": ["a"] * 5 + ["b"] * 5,
            "dice": [0.1, 0.2, 0.3, 0.4, 0.5] * 2,
            "area_px": [10, 20, 30, 40, 50, 50, 40, 30, 20, 10],
            "contrast": [1.0, np.nan, 3.0, 2.0, 5.0] * 2,
        }
    )
    t = spearman_table(df, attributes=["area_px", "contrast", "missing_column"])
    assert list(t.columns) == ["attribute", "rho", "p_value", "n"]
    assert list(t["attribute"]) == ["area_px", "contrast"]
    assert t["n"].tolist() == [10, 8]

    g = spearman_table(df, attributes=["area_px", "contrast"], by=["model"]).set_index(
        ["model", "attribute"]
    )
    assert g.loc[("a", "area_px"), "rho"] == pytest.approx(1.0)
    assert g.loc[("b", "area_px"), "rho"] == pytest.approx(-1.0)
    # Dice (0.1, 0.3, 0.4, 0.5) vs contrast (1, 3, 2, 5): ranks differ by one swap -> 0.8.
    assert g.loc[("a", "contrast"), "rho"] == pytest.approx(0.8)
    assert g.loc[("a", "contrast"), "n"] == 4


def test_spearman_table_too_few_rows_gives_nan():
    df = pd.DataFrame({"dice": [0.5, 0.6], "area_px": [1, 2]})
    t = spearman_table(df, attributes=["area_px"])
    assert math.isnan(t.loc[0, "rho"]) and t.loc[0, "n"] == 2
