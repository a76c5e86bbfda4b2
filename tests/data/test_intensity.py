"""Intensity modes against hand-computed values; percentile bounds are the 0.95th / 99.5th."""

from __future__ import annotations

import numpy as np
import pytest
from partial_api import find_cases, load_case

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
    intensity = {"mode": "percentile", "keep_zero": True}
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


def _official_percentile_rule(x: np.ndarray, keep_zero: bool) -> np.ndarray:
    """pre_grey_rgb2D.py's intensity lines on one 2D image (its np.uint8 cast included)."""
    lower_bound, upper_bound = np.percentile(x, 0.95), np.percentile(x, 99.5)
    pre = np.clip(x, lower_bound, upper_bound)
    pre = (pre - np.min(pre)) / (np.max(pre) - np.min(pre)) * 255.0
    if keep_zero:
        pre[x == 0] = 0
    return np.uint8(pre)


@pytest.mark.parametrize("name", ["liver_ct", "pancreas_ct", "spleen_ct", "lung_tumour_ct"])
def test_ct_presets_keep_water_visible(name):
    """On raw HU, 0 is water: the CT presets map it by the percentile rule like any other value
    (the official 0-stays-0 line ran on 8-bit PNGs, where 0 is background)."""
    from sam_ft.data.tasks import task_options
    from sam_ft.defaults import group_defaults

    intensity = task_options(group_defaults("task", name))["intensity"]
    hu = np.random.default_rng(0).normal(-100, 300, (32, 32)).round()
    hu[10:20, 10:20] = 0.0  # a water-filled region
    got = map_slice(hu, intensity, None)
    np.testing.assert_array_equal(got, _official_percentile_rule(hu, keep_zero=False))
    assert (got[10:20, 10:20] > 0).all()
    # The literal rule stays one option away.
    literal = map_slice(hu, {**intensity, "keep_zero": True}, None)
    np.testing.assert_array_equal(literal, _official_percentile_rule(hu, keep_zero=True))


@pytest.mark.parametrize("scope", ["slice", "volume"])
def test_predict_prepares_images_as_the_loader(nifti_folder, tmp_path, scope):
    """predict.py's load_image gives each slice the loader's image: per-slice percentiles and
    the zero rule included (the official rule computed here on each 2D image)."""
    from partial_api import load_image

    image, data = _two_slice_case(nifti_folder, scope)
    task = {"slice_axis": 2, "intensity": {"mode": "percentile", "scope": scope}}
    loaded = load_image(tmp_path / "task" / "imagesTr" / "c.nii.gz", task)
    for z in range(2):
        x = image[..., z] if scope == "slice" else image
        want = _official_percentile_rule(x, keep_zero=True)
        want = want if scope == "slice" else want[..., z]
        np.testing.assert_array_equal(data.slices[z].image[..., 0], want)
        np.testing.assert_array_equal(loaded.slice_image(z), data.slices[z].image)
