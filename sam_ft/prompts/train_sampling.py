"""Prompt simulation for finetuning (Hydra config group ``prompt``).

Every sampler is a callable ``sampler(masks, rng) -> list[Prompt]``: ``masks`` is (K, H, W) bool,
one mask per object at the ORIGINAL resolution; the result holds one Prompt per object in
original-image (x, y) = (column, row) pixels. Masks must be non-empty (the data pipeline drops
objects of 50 pixels or fewer). Point counts are drawn once per call, so all point prompts of one
image share a structure and batch together.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from sam_ft.prompts.geometry import mask_box
from sam_ft.prompts.jitter import clip_points
from sam_ft.prompts.strategies import negative_points
from sam_ft.prompts.types import Prompt


def _check_masks(masks: np.ndarray) -> np.ndarray:
    masks = np.asarray(masks, dtype=bool)
    if masks.ndim != 3:
        raise ValueError(f"expected (K, H, W) masks, got shape {masks.shape}")
    empty = np.flatnonzero(~masks.reshape(len(masks), -1).any(axis=1))
    if len(empty):
        raise ValueError(f"objects {empty.tolist()} have empty masks; no prompt can be drawn")
    return masks


def random_positives(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n pixels drawn uniformly from an (H, W) bool mask -> (n, 2) float (x, y).

    Without replacement, unless the mask has fewer than n pixels.
    """
    flat = np.flatnonzero(mask)
    idx = rng.choice(len(flat), size=n, replace=len(flat) < n)
    rows, cols = np.divmod(flat[idx], mask.shape[1])
    return np.stack([cols, rows], axis=-1).astype(np.float64)


class BoxPrompts:
    """The study's training prompt: the tight box of each object."""

    def __call__(self, masks: np.ndarray, rng: np.random.Generator) -> list[Prompt]:
        return [Prompt(box=mask_box(m)) for m in _check_masks(masks)]

    def __repr__(self) -> str:
        return "BoxPrompts()"


class JitteredBoxPrompts:
    """Tight box with each side moved by a random 0-``px`` pixels (MedSAM's box augmentation).

    Args:
        px: largest move of a side at ``reference_size``; MedSAM uses 20 at 1024. It is scaled by
            the image's longest side / ``reference_size``, so the move is the same fraction of the
            image whatever its size.
        reference_size: longest side at which ``px`` is expressed.
        outward_only: True moves sides only outward (MedSAM: the box only grows); False moves each
            side in [-px, px], corners re-sorted if they cross.
    """

    def __init__(self, px: float, reference_size: int, outward_only: bool):
        if px < 0 or reference_size <= 0:
            raise ValueError(f"need px >= 0 and reference_size > 0, got {px}, {reference_size}")
        self.px = float(px)
        self.reference_size = int(reference_size)
        self.outward_only = bool(outward_only)

    def shift(self, original_size: tuple[int, int]) -> float:
        """Largest side move in original pixels for an image of (H, W) ``original_size``."""
        return self.px * max(original_size) / self.reference_size

    def __call__(self, masks: np.ndarray, rng: np.random.Generator) -> list[Prompt]:
        masks = _check_masks(masks)
        size = masks.shape[1:]
        s = self.shift(size)
        out = []
        for m in masks:
            box = mask_box(m)
            if self.outward_only:
                d = rng.uniform(0.0, s, size=4) * np.array([-1.0, -1.0, 1.0, 1.0])
            else:
                d = rng.uniform(-s, s, size=4)
            corners = clip_points((box + d).reshape(2, 2), size)
            out.append(Prompt(box=np.concatenate([corners.min(axis=0), corners.max(axis=0)])))
        return out

    def __repr__(self) -> str:
        return (
            f"JitteredBoxPrompts(px={self.px:g}, reference_size={self.reference_size}, "
            f"outward_only={self.outward_only})"
        )


class PointPrompts:
    """Random clicks: ``min_points``-``max_points`` positives uniformly from the mask, plus
    ``min_negatives``-``max_negatives`` negatives drawn as in the study's S4 (inside the tight box
    enlarged 2x, outside the mask). Counts are drawn once per call (per image)."""

    def __init__(
        self,
        max_points: int,
        min_points: int,
        max_negatives: int,
        min_negatives: int,
    ):
        if not 1 <= min_points <= max_points:
            raise ValueError(f"need 1 <= min_points <= max_points, got {min_points}, {max_points}")
        if not 0 <= min_negatives <= max_negatives:
            raise ValueError(
                f"need 0 <= min_negatives <= max_negatives, got {min_negatives}, {max_negatives}"
            )
        self.max_points, self.min_points = int(max_points), int(min_points)
        self.max_negatives, self.min_negatives = int(max_negatives), int(min_negatives)

    def __call__(self, masks: np.ndarray, rng: np.random.Generator) -> list[Prompt]:
        masks = _check_masks(masks)
        n_pos = int(rng.integers(self.min_points, self.max_points + 1))
        n_neg = int(rng.integers(self.min_negatives, self.max_negatives + 1))
        out = []
        for m in masks:
            pos = random_positives(m, n_pos, rng)
            neg, neg_labels = negative_points(m, n_neg, rng)
            labels = np.concatenate([np.ones(n_pos, dtype=np.int64), neg_labels])
            out.append(Prompt(points=np.concatenate([pos, neg]), point_labels=labels))
        return out

    def __repr__(self) -> str:
        return (
            f"PointPrompts(points={self.min_points}-{self.max_points}, "
            f"negatives={self.min_negatives}-{self.max_negatives})"
        )


class MixedPrompts:
    """Per object, a box with probability ``p_box``, else random points (as :class:`PointPrompts`).

    Args:
        p_box: probability that an object gets a box.
        box_px: side jitter of the box at ``reference_size`` (0 = tight box).
        reference_size: see :class:`JitteredBoxPrompts`.
        max_points, min_points, max_negatives, min_negatives: see :class:`PointPrompts`.
    """

    def __init__(
        self,
        p_box: float,
        box_px: float,
        reference_size: int,
        max_points: int,
        min_points: int,
        max_negatives: int,
        min_negatives: int,
    ):
        if not 0.0 <= p_box <= 1.0:
            raise ValueError(f"p_box must lie in [0, 1], got {p_box}")
        self.p_box = float(p_box)
        # A jittered box only grows (MedSAM's augmentation), as prompt=box_jitter's default.
        jittered = JitteredBoxPrompts(box_px, reference_size, outward_only=True)
        self.boxes = jittered if box_px > 0 else BoxPrompts()
        self.points = PointPrompts(max_points, min_points, max_negatives, min_negatives)

    def __call__(self, masks: np.ndarray, rng: np.random.Generator) -> list[Prompt]:
        masks = _check_masks(masks)
        use_box = rng.random(len(masks)) < self.p_box
        out: list[Prompt | None] = [None] * len(masks)
        for flag, sampler in ((True, self.boxes), (False, self.points)):
            idx = np.flatnonzero(use_box == flag)
            if len(idx):
                for i, p in zip(idx, sampler(masks[idx], rng), strict=True):
                    out[i] = p
        return out  # type: ignore[return-value]

    def __repr__(self) -> str:
        return f"MixedPrompts(p_box={self.p_box:g}, boxes={self.boxes!r}, points={self.points!r})"


class IterativePrompts:
    """SAM-style interactive simulation: a first box or point, then ``rounds`` corrective clicks.

    ``__call__`` gives the first prompts only (tight box, or one positive drawn uniformly from the
    mask). The training loop then, for each of ``rounds`` rounds, predicts, calls
    :func:`sam_ft.prompts.clicks.next_click` (or ``next_clicks``) on the prediction, maps the click
    to original pixels (``clicks.low_res_to_original`` when working on low-res masks) and calls
    :func:`sam_ft.prompts.clicks.add_click` with the previous low-res logits; the loss is applied
    on every round.

    Args:
        first: ``"box"`` or ``"point"``.
        rounds: number of corrective clicks after the first prompt (SAM samples 8).
        box_px: side jitter of the first box at ``reference_size`` (0 = tight box).
        reference_size: see :class:`JitteredBoxPrompts`.
    """

    def __init__(
        self,
        first: Literal["box", "point"],
        rounds: int,
        box_px: float,
        reference_size: int,
    ):
        if first not in ("box", "point"):
            raise ValueError(f"first must be 'box' or 'point', got {first!r}")
        if rounds < 0:
            raise ValueError(f"rounds must be >= 0, got {rounds}")
        self.first = first
        self.rounds = int(rounds)
        self._first: BoxPrompts | JitteredBoxPrompts | PointPrompts
        if first == "point":
            self._first = PointPrompts(1, 1, 0, 0)  # one positive click
        elif box_px > 0:
            self._first = JitteredBoxPrompts(box_px, reference_size, outward_only=True)
        else:
            self._first = BoxPrompts()

    def __call__(self, masks: np.ndarray, rng: np.random.Generator) -> list[Prompt]:
        return self._first(masks, rng)

    def __repr__(self) -> str:
        return f"IterativePrompts(first={self.first!r}, rounds={self.rounds}, via={self._first!r})"
