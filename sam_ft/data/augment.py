"""Training augmentation: one random geometric/intensity transform applied to an image and all of
its object masks together, before prompts are drawn from the (augmented) masks.

Config (``data.augment``; every key optional, ``enabled: false`` => no augmentation). The keys,
whose defaults are those of ``conf/data/default.yaml`` only (read by
:func:`sam_ft.defaults.group_defaults`)::

    enabled                      # false: no augmentation at all
    hflip_p                      # horizontal flip probability
    vflip_p                      # vertical flip probability
    affine_p                     # small affine probability, with:
    scale                        #   zoom range [low, high]
    translate                    #   max shift, fraction of the side
    rotate                       #   max rotation, degrees
    brightness_contrast_p        # brightness/contrast jitter probability, with:
    brightness                   #   max brightness change, fraction of 255
    contrast                     #   max contrast change, fraction
    elastic_p                    # elastic deformation probability, with:
    elastic_alpha                #   displacement scale, pixels
    elastic_sigma                #   smoothing of the displacement field, pixels

Images are (H, W, 3) uint8; masks are (K, H, W) bool, indexed (row, col). Masks are warped with
nearest-neighbour interpolation and zero fill, so they stay binary and aligned with the image.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import albumentations as A
import cv2
import numpy as np

from sam_ft.defaults import group_defaults
from sam_ft.errors import ConfigError


class SliceAugment:
    """Random augmentation of (image, masks), reproducible from a numpy ``Generator``.

    Args:
        cfg: the ``data.augment`` mapping (see module docstring); missing keys take the values
            of ``data.augment`` in ``conf/data/default.yaml``.
        min_object_pixels: an object whose augmented mask has this many pixels or fewer is
            dropped (it left the image or shrank below the dataset's object threshold).
    """

    def __init__(self, cfg: Mapping[str, Any] | None = None, min_object_pixels: int = 0) -> None:
        cfg = dict(cfg or {})
        defaults = group_defaults("data")["augment"]
        unknown = set(cfg) - set(defaults)
        if unknown:
            raise ConfigError(f"unknown data.augment keys: {sorted(unknown)}")
        c = {**defaults, **cfg}
        self.cfg = c
        self.min_object_pixels = int(min_object_pixels)
        for key in ("hflip_p", "vflip_p", "affine_p", "brightness_contrast_p", "elastic_p"):
            if not 0.0 <= float(c[key]) <= 1.0:
                raise ConfigError(f"data.augment.{key} must be in [0, 1], got {c[key]}")
        transforms: list[A.BasicTransform] = []
        if c["hflip_p"] > 0:
            transforms.append(A.HorizontalFlip(p=float(c["hflip_p"])))
        if c["vflip_p"] > 0:
            transforms.append(A.VerticalFlip(p=float(c["vflip_p"])))
        if c["affine_p"] > 0:
            t = float(c["translate"])
            transforms.append(
                A.Affine(
                    scale=tuple(float(s) for s in c["scale"]),
                    translate_percent=(-t, t),
                    rotate=(-float(c["rotate"]), float(c["rotate"])),
                    interpolation=cv2.INTER_LINEAR,
                    mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=0,
                    p=float(c["affine_p"]),
                )
            )
        if c["elastic_p"] > 0:
            transforms.append(
                A.ElasticTransform(
                    alpha=float(c["elastic_alpha"]),
                    sigma=float(c["elastic_sigma"]),
                    mask_interpolation=cv2.INTER_NEAREST,
                    border_mode=cv2.BORDER_CONSTANT,
                    fill=0,
                    fill_mask=0,
                    p=float(c["elastic_p"]),
                )
            )
        if c["brightness_contrast_p"] > 0:
            transforms.append(
                A.RandomBrightnessContrast(
                    brightness_limit=float(c["brightness"]),
                    contrast_limit=float(c["contrast"]),
                    p=float(c["brightness_contrast_p"]),
                )
            )
        self._compose = A.Compose(transforms)

    @classmethod
    def from_config(
        cls, cfg: Mapping[str, Any] | None, min_object_pixels: int = 0
    ) -> SliceAugment | None:
        """The augmentation ``data.augment`` asks for, or ``None`` (identity) when disabled."""
        augment = cls(cfg or {}, min_object_pixels)  # keys not given: the YAML's
        return augment if augment.cfg["enabled"] else None

    def __call__(
        self, image: np.ndarray, masks: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Augment an image and its masks with the same random transform.

        Args:
            image: (H, W, 3) uint8.
            masks: (K, H, W) bool, one per object.
            rng: source of the transform's randomness (same state => same output).

        Returns:
            (image (H, W, 3) uint8, masks (K', H, W) bool, kept (K',) int64 indices into the
            input objects). Objects that vanished are dropped; if none would survive, the
            unaugmented sample is returned with every object kept.
        """
        k = len(masks)
        if k == 0:
            return image, masks, np.arange(0, dtype=np.int64)
        # albumentations draws from its own generators; seeding them from ``rng`` keeps the
        # sample a function of (seed, epoch, index) in any worker process.
        self._compose.set_random_seed(int(rng.integers(0, 2**31 - 1)))
        out = self._compose(image=image, masks=np.asarray(masks, dtype=np.uint8))
        new_masks = np.asarray(out["masks"]).astype(bool).reshape(k, *out["image"].shape[:2])
        areas = new_masks.reshape(k, -1).sum(axis=1)
        kept = np.flatnonzero(areas > max(self.min_object_pixels, 0)).astype(np.int64)
        if len(kept) == 0:
            return image, np.asarray(masks, dtype=bool), np.arange(k, dtype=np.int64)
        return np.ascontiguousarray(out["image"]), new_masks[kept], kept
