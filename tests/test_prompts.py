"""Evaluation prompts on tiny hand-made masks: geometry, S1-S6, jitter, seeding, mask selection."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything.utils.amg import build_point_grid

from sam_ft.evaluation.metrics.overlap import dice_matrix, match_masks_to_objects
from sam_ft.evaluation.protocol.decode_select import MASK_SELECTIONS, needs_multimask, select_masks
from sam_ft.prompts.geometry import enlarged_box, mask_box, mask_centroid, point_grid
from sam_ft.prompts.jitter import (
    jitter_levels,
    jitter_name,
    jitter_prompt,
    parse_jitter_name,
    random_offsets,
)
from sam_ft.prompts.strategies import (
    STRATEGIES,
    STRATEGY_IDS,
    make_eval_prompt,
    negative_points,
    positive_points,
    prompt_rng,
)
from sam_ft.prompts.types import Prompt

IDENT = {"seed": 0, "case": "case_001", "slice_index": 12, "label": 3}


def rect(h: int, w: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """(h, w) mask with rows r0..r1 and columns c0..c1 (inclusive) set."""
    m = np.zeros((h, w), dtype=bool)
    m[r0 : r1 + 1, c0 : c1 + 1] = True
    return m


def ring(size: int = 21, outer: int = 8, inner: int = 4) -> np.ndarray:
    """Square ring centred in a (size, size) image: its centroid is the empty centre."""
    c = size // 2
    m = rect(size, size, c - outer, c + outer, c - outer, c + outer)
    m[c - inner : c + inner + 1, c - inner : c + inner + 1] = False
    return m


# ------------------------------------------------------------------------------------------------
# Geometry


def test_box_is_x_then_y_on_a_non_square_mask():
    # Rows 2..4, columns 5..13 of a 10 x 20 image: x spans columns, y spans rows.
    m = rect(10, 20, 2, 4, 5, 13)
    np.testing.assert_array_equal(mask_box(m), [5, 2, 13, 4])


def test_single_pixel_box_and_centroid():
    m = np.zeros((6, 9), dtype=bool)
    m[4, 7] = True
    np.testing.assert_array_equal(mask_box(m), [7, 4, 7, 4])
    assert mask_centroid(m) == (7, 4)


def test_centroid_is_floored_mean_column_row():
    # Rows {1, 2} and columns {2, 3, 4, 5}: mean row 1.5 -> 1, mean column 3.5 -> 3.
    m = rect(8, 10, 1, 2, 2, 5)
    assert mask_centroid(m) == (3, 1)


def test_empty_mask_raises():
    with pytest.raises(ValueError, match="empty"):
        mask_box(np.zeros((4, 4), dtype=bool))


def _official_find_box(mask):
    y, x = np.where(mask == 1)
    return [x.min(), y.min(), x.max(), y.max()]


def _official_limit_rect(mask, box_ratio):
    """``limit_rect`` of the official utils/get_prompts.py, line for line."""
    height, width = mask.shape[0], mask.shape[1]
    box = _official_find_box(mask)
    w, h = box[2] - box[0], box[3] - box[1]
    w_ratio = w * box_ratio
    h_ratio = h * box_ratio
    x1 = box[0] - w_ratio / 2 + w / 2
    y1 = box[1] - h_ratio / 2 + h / 2
    x2 = x1 + w_ratio
    y2 = y1 + h_ratio
    if x1 < 0:
        x1 = 0
    if y1 < 0:
        y1 = 0
    if x2 >= width:
        x2 = width
    if y2 >= height:
        y2 = height
    return x1, y1, x2 - x1, y2 - y1


def _official_find_center(mask, box_ratio=2, n_fg=5, n_bg=5):
    """``find_center_from_mask_new`` of the official code, line for line (cv2.moments written
    with numpy: m10 / m00 and m01 / m00 of the 0/1 mask)."""
    m = mask.astype(np.float64)
    m00 = m.sum()
    cX = int((np.arange(mask.shape[1])[None, :] * m).sum() / m00)
    cY = int((np.arange(mask.shape[0])[:, None] * m).sum() / m00)
    center_point = np.array([cX, cY]).reshape(1, 2)
    indices_fg = np.where(mask == 1)
    points_fg = np.column_stack((indices_fg[1], indices_fg[0]))
    step_fg = int(len(points_fg) / n_fg)
    points_fg = points_fg[::step_fg, :]
    x, y, w, h = _official_limit_rect(mask, box_ratio)
    x, y, w, h = int(x), int(y), int(w), int(h)
    yy, xx = np.meshgrid(np.arange(x, x + w), np.arange(y, y + h))
    roi = mask[y : y + h, x : x + w]
    bool_mask = roi == 0
    points_bg = np.column_stack((yy[bool_mask], xx[bool_mask]))
    step_bg = int(len(points_bg) / n_bg)
    points_bg = points_bg[::step_bg, :]
    points_fg = np.concatenate((center_point, points_fg[1:]), axis=0)
    point_coords = np.concatenate((points_fg, points_bg), axis=0)
    point_labels = np.concatenate((np.ones(n_fg), np.zeros(n_bg)), axis=0)
    return point_coords, point_labels, points_fg, points_bg


def _official_prompt(mask, point_num):
    """``find_all_info``'s points for one object: the first ``point_num`` of the list."""
    coords, labels, _, _ = _official_find_center(mask.astype(np.uint8))
    return coords[:point_num], labels[:point_num]


def _synthetic_masks(count: int = 60, seed: int = 0) -> list[np.ndarray]:
    """Ellipses and rectangles of 51+ pixels at random places, some touching the border."""
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < count:
        h, w = (int(v) for v in rng.integers(24, 70, 2))
        yy, xx = np.mgrid[:h, :w]
        cy, cx = rng.uniform(0, h), rng.uniform(0, w)
        ry, rx = rng.uniform(3, h / 2), rng.uniform(3, w / 2)
        if rng.random() < 0.5:
            m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        else:
            m = (abs(yy - cy) <= ry) & (abs(xx - cx) <= rx)
        if 50 < m.sum() < m.size // 2:
            out.append(m)
    return out


def test_enlarged_box_is_the_official_limit_rect():
    # The official region is mask[int(y):int(y) + int(h), int(x):int(x) + int(w)].
    for mask in _synthetic_masks() + [rect(30, 30, 0, 3, 0, 6), rect(30, 30, 20, 29, 25, 29)]:
        x, y, w, h = (int(v) for v in _official_limit_rect(mask.astype(np.uint8), 2))
        want = [x, y, x + w - 1, y + h - 1]
        np.testing.assert_array_equal(enlarged_box(mask_box(mask), 2.0, mask.shape), want)
    # Columns 10..19: extent 9 -> start 10 - 9 + 4.5 = 5.5, width 18 -> int: columns 5..22.
    # Rows 20..23: extent 3 -> start 18.5, height 6 -> rows 18..23.
    np.testing.assert_array_equal(enlarged_box([10, 20, 19, 23], 2.0, (100, 100)), [5, 18, 22, 23])


def test_official_sampling_is_find_all_info_quirk_included():
    quirks = 0
    for mask in _synthetic_masks():
        for strategy, n in (("point1", 1), ("point5", 5), ("point5_neg5", 10)):
            coords, labels = _official_prompt(mask, n)
            p = make_eval_prompt(mask, strategy, None, **IDENT, sampling="official")
            np.testing.assert_array_equal(p.points, coords)
            np.testing.assert_array_equal(p.point_labels, labels)
        quirks += int(mask.sum() % 5 != 0)
    assert quirks > 0  # the 6th positive labelled negative occurs in this set


def test_point_grid_matches_segment_anything():
    grid = point_grid(4, (30, 50))  # H = 30, W = 50
    expected = build_point_grid(4) * np.array([50, 30])
    np.testing.assert_allclose(grid, expected)
    assert grid.shape == (16, 2)
    # First row of the grid: x increases, y fixed at the first cell centre (30 / 8).
    np.testing.assert_allclose(grid[:4, 0], [6.25, 18.75, 31.25, 43.75])
    np.testing.assert_allclose(grid[:4, 1], 3.75)


def test_dice_matrix_hand_values():
    a = np.zeros((2, 1, 4), dtype=bool)
    a[0, 0, :2] = True  # pixels 0, 1
    a[1, 0, :] = True  # pixels 0..3
    b = np.zeros((1, 1, 4), dtype=bool)
    b[0, 0, 1:3] = True  # pixels 1, 2
    # a0 vs b: 2*1/(2+2) = 0.5; a1 vs b: 2*2/(4+2) = 2/3.
    np.testing.assert_allclose(dice_matrix(a, b)[:, 0], [0.5, 2 / 3])


def test_match_masks_to_objects_picks_highest_dice():
    gt = np.stack([rect(8, 8, 0, 3, 0, 3), rect(8, 8, 5, 7, 5, 7)])
    generated = np.stack(
        [
            rect(8, 8, 5, 7, 5, 6),  # 6 of object 1's 9 pixels: Dice 12/15 = 0.8
            rect(8, 8, 0, 3, 0, 3),  # object 0 exactly
            rect(8, 8, 0, 7, 0, 7),  # everything
        ]
    )
    index, dice = match_masks_to_objects(generated, gt)
    np.testing.assert_array_equal(index, [1, 0])
    np.testing.assert_allclose(dice, [1.0, 0.8])


def test_match_masks_with_no_generated_mask():
    gt = np.stack([rect(5, 5, 0, 1, 0, 1)] * 3)
    index, dice = match_masks_to_objects(np.zeros((0, 5, 5), dtype=bool), gt)
    np.testing.assert_array_equal(index, [-1, -1, -1])
    np.testing.assert_array_equal(dice, [0.0, 0.0, 0.0])


# ------------------------------------------------------------------------------------------------
# Points


def test_first_point_is_centroid_when_inside():
    m = rect(10, 20, 2, 4, 5, 13)  # centroid (x=9, y=3)
    pts = positive_points(m, 1, np.random.default_rng(0))
    np.testing.assert_array_equal(pts, [[9, 3]])


def test_first_point_sampled_from_mask_when_centroid_outside():
    m = ring()
    assert not m[10, 10] and mask_centroid(m) == (10, 10)
    for seed in range(5):
        pts = positive_points(m, 5, np.random.default_rng(seed))
        assert m[pts[:, 1].astype(int), pts[:, 0].astype(int)].all()
        assert len({tuple(p) for p in pts}) == 5  # distinct pixels


def test_positive_points_are_in_mask_and_distinct_on_non_square_mask():
    m = np.zeros((7, 30), dtype=bool)
    m[1:3, 20:28] = True  # 16 pixels, all with x >= 20 and y <= 2
    pts = positive_points(m, 5, np.random.default_rng(1))
    assert pts.shape == (5, 2)
    assert (pts[:, 0] >= 20).all() and (pts[:, 1] <= 2).all()
    assert m[pts[:, 1].astype(int), pts[:, 0].astype(int)].all()
    assert len({tuple(p) for p in pts}) == 5


def test_negative_points_outside_mask_inside_enlarged_box():
    m = rect(40, 60, 10, 19, 20, 29)  # 10 x 10 square -> enlarged box x 15..34, y 5..24
    pts, labels = negative_points(m, 5, np.random.default_rng(2))
    assert pts.shape == (5, 2)
    np.testing.assert_array_equal(labels, 0)
    x, y = pts[:, 0].astype(int), pts[:, 1].astype(int)
    assert not m[y, x].any()
    assert ((x >= 15) & (x <= 34) & (y >= 5) & (y <= 24)).all()


def test_negatives_fall_back_to_pad_label_when_mask_is_whole_image():
    pts, labels = negative_points(np.ones((4, 4), dtype=bool), 3, np.random.default_rng(0))
    assert pts.shape == (3, 2)
    np.testing.assert_array_equal(labels, -1)


# ------------------------------------------------------------------------------------------------
# Strategies


def test_strategy_names_and_ids():
    assert STRATEGIES == ("everything", "point1", "point5", "point5_neg5", "box", "box_point1")
    assert STRATEGY_IDS["everything"] == "S1" and STRATEGY_IDS["box_point1"] == "S6"


@pytest.mark.parametrize(
    ("strategy", "has_box", "labels"),
    [
        ("point1", False, [1]),
        ("point5", False, [1] * 5),
        ("point5_neg5", False, [1] * 5 + [0] * 5),
        ("box", True, None),
        ("box_point1", True, [1]),
    ],
)
def test_eval_prompt_structure(strategy, has_box, labels):
    m = rect(30, 50, 5, 14, 10, 29)
    p = make_eval_prompt(m, strategy, None, **IDENT)
    assert (p.box is not None) == has_box
    if has_box:
        np.testing.assert_array_equal(p.box, [10, 5, 29, 14])
    if labels is None:
        assert p.points is None
    else:
        np.testing.assert_array_equal(p.point_labels, labels)
        x, y = p.points[:, 0].astype(int), p.points[:, 1].astype(int)
        np.testing.assert_array_equal(m[y, x], np.array(labels) == 1)


def test_everything_has_no_per_object_prompt():
    with pytest.raises(ValueError, match="point_grid"):
        make_eval_prompt(rect(5, 5, 1, 3, 1, 3), "everything", None, **IDENT)


def test_prompts_nest_across_strategies():
    m = ring(31, 12, 5)  # centroid outside: points are sampled, so nesting is a real check
    p1 = make_eval_prompt(m, "point1", None, **IDENT)
    p5 = make_eval_prompt(m, "point5", None, **IDENT)
    p10 = make_eval_prompt(m, "point5_neg5", None, **IDENT)
    p6 = make_eval_prompt(m, "box_point1", None, **IDENT)
    np.testing.assert_array_equal(p5.points[:1], p1.points)
    np.testing.assert_array_equal(p10.points[:5], p5.points)
    np.testing.assert_array_equal(p6.points, p1.points)


def test_same_seed_same_prompt_other_case_differs():
    m = ring(41, 15, 6)
    a = make_eval_prompt(m, "point5_neg5", "10-20", **IDENT)
    b = make_eval_prompt(m, "point5_neg5", (10, 20), **IDENT)
    np.testing.assert_array_equal(a.points, b.points)
    np.testing.assert_array_equal(a.point_labels, b.point_labels)
    c = make_eval_prompt(m, "point5_neg5", "10-20", **{**IDENT, "case": "case_002"})
    assert not np.array_equal(a.points, c.points)


def test_prompt_rng_is_stable_across_processes():
    # sha256 seeding: the bit generator's first word is fixed, whatever PYTHONHASHSEED is (a switch
    # to Python's salted hash() would break this). Range and its name seed alike.
    rng = prompt_rng(0, "case_001", 12, 3, "box", "0-10")
    assert rng.bit_generator.random_raw() == 5997448728947022409
    rng2 = prompt_rng(0, "case_001", 12, 3, "box", (0, 10))
    assert rng2.bit_generator.random_raw() == 5997448728947022409
    other = prompt_rng(0, "case_001", 12, 3, "box", "10-20")
    assert other.bit_generator.random_raw() != 5997448728947022409


# ------------------------------------------------------------------------------------------------
# Jitter


def test_jitter_names():
    assert jitter_name(None) == "none"
    assert jitter_name([0, 10]) == "0-10"
    assert parse_jitter_name("20-30") == (20.0, 30.0)
    assert parse_jitter_name("none") is None
    assert jitter_levels([[0, 10], [10, 20], [20, 30]]) == [None, (0, 10), (10, 20), (20, 30)]
    with pytest.raises(ValueError):
        parse_jitter_name("big")


def test_offset_lengths_lie_in_range():
    off = random_offsets(1000, (10.0, 20.0), np.random.default_rng(0))
    length = np.hypot(off[:, 0], off[:, 1])
    assert length.min() >= 10.0 and length.max() <= 20.0
    # Directions cover all four quadrants.
    assert (off[:, 0] > 0).any() and (off[:, 0] < 0).any()
    assert (off[:, 1] > 0).any() and (off[:, 1] < 0).any()


def test_jittered_points_move_by_range_and_stay_in_image():
    m = rect(200, 300, 90, 110, 140, 160)  # far from the border: no clipping
    base = make_eval_prompt(m, "point5", None, **IDENT)
    for lo, hi in [(0, 10), (10, 20), (20, 30)]:
        moved = make_eval_prompt(m, "point5", [lo, hi], **IDENT)
        d = np.hypot(*(moved.points - base.points).T)
        assert (d >= lo - 1e-9).all() and (d <= hi + 1e-9).all()


def test_jitter_clips_to_image_and_keeps_box_valid():
    size = (12, 40)  # H = 12, W = 40
    rng = np.random.default_rng(0)
    p = Prompt(box=[0, 0, 2, 1], points=[[39, 11], [0, 0]], point_labels=[1, 0])
    for _ in range(200):
        q = jitter_prompt(p, (20, 30), rng, size)
        assert q.box[0] <= q.box[2] and q.box[1] <= q.box[3]
        for xy in (q.points, q.box.reshape(2, 2)):
            assert (xy[:, 0] >= 0).all() and (xy[:, 0] <= 39).all()
            assert (xy[:, 1] >= 0).all() and (xy[:, 1] <= 11).all()
        np.testing.assert_array_equal(q.point_labels, [1, 0])


def test_jittered_box_corners_move_by_range():
    m = rect(200, 300, 80, 120, 100, 180)
    base = make_eval_prompt(m, "box", None, **IDENT)
    moved = make_eval_prompt(m, "box", "0-10", **IDENT)
    # A 0-10 px move cannot swap corners 40+ px apart, so corner k maps to corner k.
    d = np.hypot(*(moved.box - base.box).reshape(2, 2).T)
    assert (d <= 10 + 1e-9).all()
    assert not np.array_equal(moved.box, base.box)


# ------------------------------------------------------------------------------------------------
# Mask selection


def _three_masks() -> tuple[np.ndarray, np.ndarray]:
    gt = rect(6, 6, 1, 4, 1, 4)[None]  # (1, 6, 6)
    masks = np.stack([rect(6, 6, 0, 5, 0, 5), rect(6, 6, 1, 4, 1, 4), rect(6, 6, 1, 2, 1, 2)])
    return masks[None], gt  # (1, 3, 6, 6)


def test_select_oracle_and_predicted_iou():
    masks, gt = _three_masks()
    iou_pred = np.array([[0.9, 0.5, 0.1]])
    chosen, idx = select_masks(masks, iou_pred, gt, "oracle")
    np.testing.assert_array_equal(idx, [1])
    np.testing.assert_array_equal(chosen[0], gt[0])
    chosen, idx = select_masks(masks, iou_pred, gt, "predicted_iou")
    np.testing.assert_array_equal(idx, [0])
    assert chosen[0].all()


def test_select_from_logits_tensor():
    masks, gt = _three_masks()
    logits = torch.from_numpy(np.where(masks, 5.0, -5.0)).float()
    chosen, idx = select_masks(
        logits, torch.tensor([[0.1, 0.2, 0.3]]), torch.from_numpy(gt), "oracle"
    )
    np.testing.assert_array_equal(idx, [1])
    assert chosen.dtype == bool and chosen.shape == (1, 6, 6)


def test_single_mode():
    masks, gt = _three_masks()
    chosen, idx = select_masks(masks[:, 1:2], None, None, "single")
    np.testing.assert_array_equal(idx, [0])
    np.testing.assert_array_equal(chosen[0], gt[0])
    with pytest.raises(ValueError):
        select_masks(masks, None, None, "single")
    assert MASK_SELECTIONS == ("oracle", "predicted_iou", "single", "auto")
    assert needs_multimask("oracle") and needs_multimask("predicted_iou")
    assert not needs_multimask("single")


# ------------------------------------------------------------------------------------------------
# Evenly spaced points (the official code's sampling, the default)


def _official_positives(mask: np.ndarray, n: int) -> list:
    """The official COSMOS positives written out literally: the raster-order pixel list at
    stride floor(count / n) from the first, the first replaced by the moments' centroid."""
    ys, xs = np.where(mask)
    stride = len(ys) // n
    pos = [[int(xs[i * stride]), int(ys[i * stride])] for i in range(n)]
    m = mask.astype(np.float64)
    cy = int((np.arange(mask.shape[0])[:, None] * m).sum() / m.sum())
    cx = int((np.arange(mask.shape[1])[None, :] * m).sum() / m.sum())
    pos[0] = [cx, cy]
    return pos


@pytest.mark.parametrize(
    "mask",
    [rect(20, 30, 2, 4, 5, 13), rect(40, 60, 10, 19, 20, 29), rect(64, 64, 3, 40, 10, 17)],
)
def test_default_points_are_the_official_evenly_spaced_ones(mask):
    pos = _official_positives(mask, 5)
    p = make_eval_prompt(mask, "point5_neg5", None, **IDENT)
    np.testing.assert_array_equal(p.points[:5], pos)
    # Negatives: the official code's 5 background points (its list after the positives).
    _, _, _, points_bg = _official_find_center(mask.astype(np.uint8))
    np.testing.assert_array_equal(p.points[5:], points_bg[:5])
    np.testing.assert_array_equal(p.point_labels, [1] * 5 + [0] * 5)
    # Same for every seed and case: no random stream is involved.
    other = make_eval_prompt(mask, "point5_neg5", None, **{**IDENT, "seed": 7, "case": "x"})
    np.testing.assert_array_equal(other.points, p.points)


def test_even_points_hand_computed():
    m = rect(10, 20, 2, 4, 5, 13)  # 27 pixels, stride 5: raster indices 0, 5, 10, 15, 20
    pts = make_eval_prompt(m, "point5", None, **IDENT).points
    # index 0 -> centroid (9, 3); 5 -> (10, 2); 10 -> (6, 3); 15 -> (11, 3); 20 -> (7, 4)
    np.testing.assert_array_equal(pts, [[9, 3], [10, 2], [6, 3], [11, 3], [7, 4]])


def test_even_first_point_inside_when_centroid_outside():
    m = ring()
    p = make_eval_prompt(m, "point5", None, **IDENT)
    x, y = p.points[:, 0].astype(int), p.points[:, 1].astype(int)
    assert m[y, x].all()
    # The first point is the mask pixel nearest the centroid (10, 10): distance 4 (inner radius).
    nearest = np.sqrt(((np.argwhere(m) - 10) ** 2).sum(axis=1)).min()
    assert np.hypot(x[0] - 10, y[0] - 10) == pytest.approx(nearest)


def test_random_sampling_stays_an_option_and_deterministic():
    from sam_ft.evaluation.protocol.options import eval_options

    assert eval_options({}).point_sampling == "even"
    m = rect(40, 60, 10, 29, 20, 49)
    even = make_eval_prompt(m, "point5_neg5", None, **IDENT)
    a = make_eval_prompt(m, "point5_neg5", None, **IDENT, sampling="random")
    b = make_eval_prompt(m, "point5_neg5", None, **IDENT, sampling="random")
    c = make_eval_prompt(m, "point5_neg5", None, **{**IDENT, "slice_index": 13}, sampling="random")
    np.testing.assert_array_equal(a.points, b.points)
    assert not np.array_equal(a.points[1:], even.points[1:])
    assert not np.array_equal(a.points[1:], c.points[1:])
    np.testing.assert_array_equal(a.points[0], even.points[0])  # the centroid either way
    with pytest.raises(ValueError, match="point sampling"):
        make_eval_prompt(m, "point5", None, **IDENT, sampling="grid")
