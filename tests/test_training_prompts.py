"""Training prompt samplers, their Hydra configs, and corrective clicks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sam_ft.model.preprocess import SamTransform
from sam_ft.prompts.clicks import add_click, low_res_to_original, next_click, next_clicks
from sam_ft.prompts.train_sampling import (
    BoxPrompts,
    IterativePrompts,
    JitteredBoxPrompts,
    MixedPrompts,
    PointPrompts,
)
from sam_ft.prompts.types import Prompt

CONF = Path(__file__).resolve().parents[1] / "conf" / "prompt"


def objects() -> np.ndarray:
    """(3, 40, 64) masks: a rectangle, a corner square touching the border, a thin bar."""
    m = np.zeros((3, 40, 64), dtype=bool)
    m[0, 10:20, 30:50] = True
    m[1, 0:8, 0:8] = True
    m[2, 35:37, 5:60] = True
    return m


def assert_inside(prompt: Prompt, size: tuple[int, int]) -> None:
    h, w = size
    for xy in ([] if prompt.box is None else [prompt.box.reshape(2, 2)]) + (
        [] if prompt.points is None else [prompt.points]
    ):
        assert (xy[:, 0] >= 0).all() and (xy[:, 0] <= w - 1).all()
        assert (xy[:, 1] >= 0).all() and (xy[:, 1] <= h - 1).all()
    if prompt.box is not None:
        assert prompt.box[0] <= prompt.box[2] and prompt.box[1] <= prompt.box[3]


# ------------------------------------------------------------------------------------------------
# Samplers


def test_box_sampler_gives_tight_boxes():
    prompts = BoxPrompts()(objects(), np.random.default_rng(0))
    assert len(prompts) == 3
    np.testing.assert_array_equal(prompts[0].box, [30, 10, 49, 19])
    np.testing.assert_array_equal(prompts[1].box, [0, 0, 7, 7])
    assert all(p.points is None for p in prompts)


def test_jittered_box_grows_by_at_most_scaled_px():
    masks = objects()
    sampler = JitteredBoxPrompts(px=20, reference_size=1024, outward_only=True)
    assert sampler.shift((40, 64)) == pytest.approx(20 * 64 / 1024)  # 1.25 px at this size
    for seed in range(20):
        prompts = sampler(masks, np.random.default_rng(seed))
        tight = BoxPrompts()(masks, None)
        for p, t in zip(prompts, tight, strict=True):
            assert_inside(p, (40, 64))
            grow = (p.box - t.box) * np.array([-1, -1, 1, 1])  # outward moves are >= 0
            assert (grow >= 0).all() and (grow <= 1.25 + 1e-9).all()


def test_symmetric_box_jitter_stays_valid():
    sampler = JitteredBoxPrompts(px=400, reference_size=1024, outward_only=False)
    for seed in range(20):
        for p in sampler(objects(), np.random.default_rng(seed)):
            assert_inside(p, (40, 64))


def test_point_sampler_counts_labels_and_positions():
    masks = objects()
    sampler = PointPrompts(max_points=4, min_points=2, max_negatives=3, min_negatives=3)
    seen = set()
    for seed in range(20):
        prompts = sampler(masks, np.random.default_rng(seed))
        assert len(prompts) == 3
        assert len({p.structure for p in prompts}) == 1  # one structure per image: batchable
        for p, m in zip(prompts, masks, strict=True):
            n_pos = int((p.point_labels == 1).sum())
            seen.add(n_pos)
            assert 2 <= n_pos <= 4 and (p.point_labels[n_pos:] == 0).all()
            assert p.points.shape == (n_pos + 3, 2)
            assert_inside(p, (40, 64))
            x, y = p.points[:, 0].astype(int), p.points[:, 1].astype(int)
            np.testing.assert_array_equal(m[y, x], p.point_labels == 1)
    assert seen == {2, 3, 4}


def test_mixed_sampler_uses_both_kinds():
    sampler = MixedPrompts(
        0.5, 0.0, 1024, max_points=3, min_points=1, max_negatives=0, min_negatives=0
    )
    kinds = set()
    for seed in range(10):
        prompts = sampler(objects(), np.random.default_rng(seed))
        assert len(prompts) == 3
        for p in prompts:
            assert (p.box is None) != (p.points is None)
            kinds.add(p.box is not None)
            assert_inside(p, (40, 64))
    assert kinds == {True, False}
    assert all(
        p.box is not None
        for p in MixedPrompts(1.0, 0.0, 1024, 5, 1, 0, 0)(objects(), np.random.default_rng(0))
    )


def test_iterative_first_prompts():
    masks = objects()
    boxes = IterativePrompts(first="box", rounds=3, box_px=0.0, reference_size=1024)(
        masks, np.random.default_rng(0)
    )
    np.testing.assert_array_equal(boxes[0].box, [30, 10, 49, 19])
    points = IterativePrompts(first="point", rounds=3, box_px=0.0, reference_size=1024)(
        masks, np.random.default_rng(0)
    )
    for p, m in zip(points, masks, strict=True):
        assert p.box is None and p.points.shape == (1, 2)
        np.testing.assert_array_equal(p.point_labels, [1])
        assert m[int(p.points[0, 1]), int(p.points[0, 0])]


def test_sampler_rejects_empty_mask():
    masks = objects()
    masks[1] = False
    with pytest.raises(ValueError, match=r"objects \[1\]"):
        BoxPrompts()(masks, np.random.default_rng(0))


@pytest.mark.parametrize("name", ["box", "box_jitter", "points", "mixed", "iterative"])
def test_prompt_configs_instantiate(name):
    sampler = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    prompts = sampler(objects(), np.random.default_rng(0))
    assert len(prompts) == 3 and all(isinstance(p, Prompt) for p in prompts)
    for p in prompts:
        assert_inside(p, (40, 64))
    if name == "iterative":
        assert sampler.first == "box" and sampler.rounds == 8


# ------------------------------------------------------------------------------------------------
# Corrective clicks


def test_click_in_missed_region_is_positive():
    gt = np.zeros((20, 30), dtype=bool)
    gt[2:12, 4:24] = True
    pred = gt.copy()
    pred[2:12, 14:24] = False  # right half missed: FN block rows 2..11, cols 14..23
    x, y, label = next_click(pred, gt)
    assert label == 1
    assert gt[y, x] and not pred[y, x]
    assert 14 <= x <= 23 and 2 <= y <= 11
    # Deepest pixel of a 10 x 10 block lies at its centre (rows/cols 4..5 of the block).
    assert x in (18, 19) and y in (6, 7)


def test_click_in_false_region_is_negative_and_largest_wins():
    gt = np.zeros((20, 30), dtype=bool)
    gt[5:15, 5:15] = True
    pred = gt.copy()
    pred[5:15, 20:28] = True  # FP block, 80 pixels
    pred[5, 5] = False  # FN of 1 pixel: smaller
    x, y, label = next_click(pred, gt)
    assert label == 0
    assert pred[y, x] and not gt[y, x] and x >= 20


def test_click_rows_cols_order_on_non_square_mask():
    gt = np.zeros((6, 40), dtype=bool)
    gt[1:5, 30:38] = True
    x, y, label = next_click(np.zeros_like(gt), gt)
    assert label == 1 and 30 <= x <= 37 and 1 <= y <= 4


def test_no_error_gives_positive_click_inside_gt_or_none():
    gt = np.zeros((9, 9), dtype=bool)
    gt[2:7, 2:7] = True
    assert next_click(gt, gt) == (4, 4, 1)
    assert next_click(np.zeros_like(gt), np.zeros_like(gt)) is None


def test_batched_clicks_from_logits_tensor():
    gt = torch.zeros(2, 16, 16)
    gt[:, 4:12, 4:12] = 1
    logits = torch.full((2, 16, 16), -3.0)
    logits[1, 4:12, 4:12] = 3.0
    logits[1, 0:3, 0:16] = 3.0  # FP strip on object 1
    clicks = next_clicks(logits, gt)
    assert clicks.shape == (2, 3)
    assert clicks[0, 2] == 1 and 4 <= clicks[0, 0] <= 11 and 4 <= clicks[0, 1] <= 11
    assert clicks[1, 2] == 0 and clicks[1, 1] <= 2
    empty = next_clicks(np.zeros((1, 4, 4), bool), np.zeros((1, 4, 4), bool))
    np.testing.assert_array_equal(empty, [[-1, -1, -1]])


def test_add_click_appends_point_and_feeds_back_logits():
    first = Prompt(box=[1, 2, 30, 40])
    logits = torch.randn(1, 64, 64)
    p = add_click(first, (10, 12, 1), logits)
    np.testing.assert_array_equal(p.box, [1, 2, 30, 40])
    np.testing.assert_array_equal(p.points, [[10, 12]])
    np.testing.assert_array_equal(p.point_labels, [1])
    assert p.mask_logits.shape == (64, 64) and p.mask_logits.dtype == np.float32
    q = add_click(p, np.array([5, 6, 0]), p.mask_logits)
    np.testing.assert_array_equal(q.point_labels, [1, 0])
    assert p.points.shape == (1, 2)  # the input prompt is unchanged
    assert q.structure == (True, 2, True)
    r = add_click(q, None, None)
    assert r.structure == (True, 2, False)


@pytest.mark.parametrize("mode", ["sam", "medsam"])
def test_low_res_click_maps_back_through_transform(mode):
    transform = SamTransform(256, mode)
    size = (100, 200)  # H, W
    # The original pixel at the centre of low-res cell (x=20, y=10) must map back to that cell.
    xy = low_res_to_original(
        np.array([[20, 10]]),
        transform.low_res_size,
        transform.image_size,
        transform.input_size(size),
        size,
    )
    in_xy = transform.apply_coords(xy, size)
    np.testing.assert_allclose(in_xy // (256 / 64), [[20, 10]])
    assert (xy >= 0).all() and xy[0, 0] <= 199 and xy[0, 1] <= 99
