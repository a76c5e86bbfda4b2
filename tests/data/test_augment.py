"""Augmentation keeps image and masks aligned, drops vanished objects, is seeded and optional."""

from __future__ import annotations

import numpy as np
import pytest

from sam_ft.data.augment import SliceAugment
from sam_ft.errors import ConfigError

GEOMETRIC = {
    "enabled": True,
    "hflip_p": 0.5,
    "vflip_p": 0.5,
    "affine_p": 1.0,
    "scale": [0.8, 1.2],
    "translate": 0.1,
    "rotate": 20.0,
    "brightness_contrast_p": 0.0,
    "elastic_p": 0.5,
}


def _square_sample() -> tuple[np.ndarray, np.ndarray]:
    """A 64x80 image, bright only on two squares; each mask is one square (row, col indexing)."""
    image = np.zeros((64, 80, 3), dtype=np.uint8)
    masks = np.zeros((2, 64, 80), dtype=bool)
    masks[0, 10:30, 12:36] = True
    masks[1, 38:56, 50:70] = True
    image[masks.any(axis=0)] = 255
    return image, masks


@pytest.mark.parametrize("seed", range(8))
def test_masks_follow_the_bright_pixels(seed):
    image, masks = _square_sample()
    aug = SliceAugment(GEOMETRIC)
    out, out_masks, kept = aug(image, masks, np.random.default_rng(seed))
    assert out.shape == image.shape and out.dtype == np.uint8
    assert out_masks.dtype == bool and out_masks.shape == (len(kept), 64, 80)
    bright = out[..., 0] > 127
    union = out_masks.any(axis=0)
    iou = (bright & union).sum() / (bright | union).sum()
    assert iou > 0.9, iou  # only interpolated edge pixels may disagree
    for m in out_masks:
        assert out[m, 0].mean() > 200


def test_identity_when_disabled():
    assert SliceAugment.from_config(None) is None
    assert SliceAugment.from_config({"enabled": False, "hflip_p": 1.0}) is None
    assert isinstance(SliceAugment.from_config({"enabled": True}), SliceAugment)


def test_same_generator_state_same_result_and_flip_moves_mask():
    image, masks = _square_sample()
    aug = SliceAugment({"enabled": True, "hflip_p": 1.0, "affine_p": 0.0})
    a = aug(image, masks, np.random.default_rng(3))
    b = aug(image, masks, np.random.default_rng(3))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    np.testing.assert_array_equal(a[1], masks[:, :, ::-1])  # flip mirrors the columns


def test_vanished_objects_are_dropped_and_all_vanished_falls_back():
    image, masks = _square_sample()  # object areas 480 and 360 pixels
    flip = {"enabled": True, "hflip_p": 1.0, "affine_p": 0.0, "brightness_contrast_p": 0.0}
    out, out_masks, kept = SliceAugment(flip, min_object_pixels=400)(
        image, masks, np.random.default_rng(0)
    )
    assert kept.tolist() == [0] and len(out_masks) == 1
    np.testing.assert_array_equal(out_masks[0], masks[0, :, ::-1])
    out, out_masks, kept = SliceAugment(flip, min_object_pixels=10_000)(
        image, masks, np.random.default_rng(0)
    )
    assert kept.tolist() == [0, 1]
    np.testing.assert_array_equal(out, image)  # the unaugmented sample
    np.testing.assert_array_equal(out_masks, masks)


def test_brightness_contrast_keeps_grey_and_masks():
    image, masks = _square_sample()
    image[..., :] = np.linspace(0, 200, 80, dtype=np.uint8)[None, :, None]
    cfg = {"enabled": True, "hflip_p": 0.0, "affine_p": 0.0, "brightness_contrast_p": 1.0}
    aug = SliceAugment(cfg)
    out, out_masks, _ = aug(image, masks, np.random.default_rng(1))
    assert not np.array_equal(out, image)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    np.testing.assert_array_equal(out_masks, masks)


def test_bad_config_is_rejected():
    with pytest.raises(ConfigError, match="hflip"):
        SliceAugment({"enabled": True, "hflip": 0.5})
    with pytest.raises(ConfigError, match="affine_p"):
        SliceAugment({"enabled": True, "affine_p": 2})
