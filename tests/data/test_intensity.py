"""Intensity modes against hand-computed values; percentile bounds are the 0.95th / 99.5th."""

from __future__ import annotations

import numpy as np
import pytest

from sam_ft.data.folder import find_cases
from sam_ft.data.intensity import (
    intensity_bounds,
    intensity_scope,
    map_slice,
    percentile_bounds,
    scale_to_uint8,
    to_rgb,
    to_uint8,
    window_bounds,
)
from sam_ft.data.loading import load_case
from sam_ft.errors import ConfigError


def test_window_level_40_width_400():
    lo, hi = window_bounds(40, 400)
    assert (lo, hi) == (-160.0, 240.0)
    hu = np.array([-1000.0, -160.0, 40.0, 140.0, 240.0, 3000.0])
    # (hu + 160) / 400 * 255, truncated: 40 -> 127.5 -> 127; 140 -> 191.25 -> 191.
    assert scale_to_uint8(hu, lo, hi).tolist() == [0, 0, 127, 191, 255, 255]


def test_percentile_rule_is_0_95th_not_5th():
    x = np.arange(1001, dtype=np.float64)  # 0..1000
    lo, hi = percentile_bounds(x)
    assert lo == pytest.approx(9.5)  # np.percentile(x, 0.95); the 5th would be 50
    assert hi == pytest.approx(995.0)
    assert intensity_bounds(x, {"mode": "percentile"}) == (lo, hi)
    # 20 -> (20 - 9.5) / 985.5 * 255 = 2.72 -> 2; 500 -> 126.9 -> 126
    assert scale_to_uint8(np.array([0.0, 20.0, 500.0, 1000.0]), lo, hi).tolist() == [0, 2, 126, 255]


def _two_slice_case(nifti_folder, scope=None):
    # Slice z=0 holds 0..99, slice z=1 holds 1000..1099.
    image = np.zeros((10, 10, 2), dtype=np.float32)
    image[..., 0] = np.arange(100).reshape(10, 10)
    image[..., 1] = 1000 + np.arange(100).reshape(10, 10)
    label = np.ones((10, 10, 2), dtype=np.uint8)
    root = nifti_folder({"c": (image, label)})
    intensity = {"mode": "percentile", **({"scope": scope} if scope else {})}
    task = {"root": str(root), "slice_axis": 2, "intensity": intensity}
    return image, load_case(find_cases(root, task)[0], task, {"min_object_pixels": 10})


def test_percentile_bounds_are_per_slice_by_default(nifti_folder):
    # The official code runs np.percentile on each 2D image: each slice spans 0-255 on its own.
    image, data = _two_slice_case(nifti_folder)
    for z in range(2):
        lo, hi = np.percentile(image[..., z], [0.95, 99.5])
        expected = scale_to_uint8(image[..., z], lo, hi)
        expected[image[..., z] == 0] = 0  # pixels that were 0 stay 0
        np.testing.assert_array_equal(data.slices[z].image[..., 0], expected)
        assert data.slices[z].image.max() == 255
    np.testing.assert_array_equal(data.slices[1].raw, image[..., 1])


def test_percentile_bounds_per_volume_option(nifti_folder):
    # scope=volume: the bounds come from both slices together.
    image, data = _two_slice_case(nifti_folder, scope="volume")
    lo, hi = np.percentile(image, [0.95, 99.5])
    expected0 = scale_to_uint8(image[..., 0], lo, hi)
    np.testing.assert_array_equal(data.slices[0].image[..., 0], expected0)
    # Dark (<= 22, not 255): the bright slice set the upper bound of the whole volume.
    assert data.slices[0].image.max() == 22
    np.testing.assert_array_equal(data.slices[1].raw, image[..., 1])


def test_percentile_keeps_zero_pixels_at_zero():
    # 0 lies above the 0.95th percentile here (negatives present), yet stays 0 as prescribed.
    raw = np.concatenate([np.full(10, -500.0), np.zeros(10), np.linspace(1, 1000, 980)])
    intensity = {"mode": "percentile"}
    out = map_slice(raw.reshape(20, 50), intensity, None).ravel()
    assert (out[10:20] == 0).all() and out.max() == 255
    kept = map_slice(raw.reshape(20, 50), {**intensity, "keep_zero": False}, None).ravel()
    assert (kept[10:20] > 0).all()
    with pytest.raises(ConfigError, match="scope"):
        intensity_scope({"mode": "percentile", "scope": "case"})


def test_none_keeps_8bit_and_scales_otherwise():
    x = np.array([[0, 17, 255]], dtype=np.uint8)
    lo, hi = intensity_bounds(x, {"mode": "none"})
    assert to_uint8(x, lo, hi).tolist() == [[0, 17, 255]]
    y = np.array([[0.0, 500.0, 1000.0]])
    assert to_uint8(y, *intensity_bounds(y, {"mode": "none"})).tolist() == [[0, 127, 255]]


def test_window_from_task_on_a_ct_volume(nifti_folder):
    image = np.full((12, 12, 1), -1000.0, dtype=np.float32)
    image[2:10, 2:10, 0] = 140.0
    label = (image > 0).astype(np.uint8)
    root = nifti_folder({"ct": (image, label)}, modality="CT")
    task = {"root": str(root), "intensity": {"mode": "window", "level": 40, "width": 400}}
    data = load_case(find_cases(root, task)[0], task)
    img = data.slices[0].image
    assert data.modality == "CT"
    assert img[5, 5].tolist() == [191, 191, 191] and img[0, 0].tolist() == [0, 0, 0]


def test_grey_replicated_and_rgb_kept():
    g = np.array([[1, 2]], dtype=np.uint8)
    assert to_rgb(g).shape == (1, 2, 3) and to_rgb(g)[0, 1].tolist() == [2, 2, 2]
    rgb = np.zeros((2, 2, 3), dtype=np.uint8)
    assert to_rgb(rgb) is rgb


def test_bad_intensity_settings():
    with pytest.raises(ConfigError, match="level"):
        intensity_bounds(np.zeros(3), {"mode": "window"})
    with pytest.raises(ConfigError, match="mode"):
        intensity_bounds(np.zeros(3), {"mode": "zscore"})
    assert scale_to_uint8(np.ones(4), 1.0, 1.0).tolist() == [0, 0, 0, 0]
