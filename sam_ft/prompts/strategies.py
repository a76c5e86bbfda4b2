"""The study's evaluation prompt strategies (S1-S6) and their seeding.

Prompts are (x, y) = (column, row) in ORIGINAL-image pixels; masks are (H, W) arrays indexed
(row, col). Evaluation calls :func:`make_eval_prompt` once per (object, strategy, jitter).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence

import numpy as np

from sam_ft.prompts.geometry import enlarged_box, mask_box, mask_centroid
from sam_ft.prompts.jitter import JitterRange, jitter_name, jitter_prompt, parse_jitter_name
from sam_ft.prompts.types import Prompt

STRATEGIES: tuple[str, ...] = ("everything", "point1", "point5", "point5_neg5", "box", "box_point1")
"""Strategy names as used in configs and output tables, in the study's order S1-S6."""

STRATEGY_IDS: dict[str, str] = {name: f"S{i + 1}" for i, name in enumerate(STRATEGIES)}

# (positives, negatives, box) of each per-object strategy; `everything` has no per-object prompt.
_LAYOUT: dict[str, tuple[int, int, bool]] = {
    "point1": (1, 0, False),
    "point5": (5, 0, False),
    "point5_neg5": (5, 5, False),
    "box": (0, 0, True),
    "box_point1": (1, 0, True),
}

POINT_SAMPLINGS: tuple[str, ...] = ("even", "random", "official")
"""``even``: the official code's evenly spaced points (raster order, fixed stride; the default),
with n positives and n negatives exactly and the centroid checked; ``official``: the official code
verbatim, its S4 quirk and unchecked centroid included (:func:`official_points`); ``random``:
uniform draws without replacement from the prompt stream."""

OFFICIAL_POINTS_PER_KIND = 5
"""``find_center_from_mask_new`` samples 5 positives and 5 negatives, whatever the strategy."""

NEGATIVE_BOX_FACTOR = 2.0
"""Negatives are drawn inside the tight box enlarged this many times about its centre."""

PAD_LABEL = -1
"""SAM's "not a point" label, used only when no negative pixel exists (the prompt encoder ignores
such points), so a strategy always yields the number of points its name promises."""


def prompt_rng(
    seed: int,
    case: str,
    slice_index: int,
    label: int,
    strategy: str,
    jitter: JitterRange | Sequence[float] | str | None,
) -> np.random.Generator:
    """Generator seeded by sha256 of (seed, case, slice, object label, strategy, jitter name).

    Python's ``hash()`` is salted per process, so it would give different prompts in two runs;
    sha256 of a canonical JSON string does not. ``strategy`` may also be a sub-stream name (e.g.
    ``"positives"``). Streams are stable for a fixed numpy version (numpy does not promise
    ``Generator`` method streams across versions).
    """
    key = json.dumps(
        [int(seed), str(case), int(slice_index), int(label), str(strategy), jitter_name(jitter)]
    )
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    entropy = int.from_bytes(digest, "little")
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))


def _draw_distinct(n: int, k: int, rng: np.random.Generator, taken: set[int]) -> list[int]:
    """k indices in [0, n) not in ``taken``, drawn one at a time.

    Drawing one at a time makes the first j draws independent of k, so point5's first points equal
    point1's for the same stream. Falls back to repeats when fewer than k indices are free.
    """
    out: list[int] = []
    distinct = n - len(taken) >= k
    while len(out) < k:
        i = int(rng.integers(n))
        if distinct and (i in taken or i in out):
            continue
        out.append(i)
    return out


def positive_points(mask: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n positive points of an (H, W) bool mask -> (n, 2) float (x, y).

    The first is the centroid (floored mean column, mean row) when that pixel is in the mask,
    else a pixel drawn uniformly from the mask; the rest are drawn uniformly without replacement
    from the other mask pixels (with replacement only if the mask has fewer than n pixels).
    """
    mask = np.asarray(mask, dtype=bool)
    if n <= 0:
        return np.zeros((0, 2))
    w = mask.shape[1]
    flat = np.flatnonzero(mask)  # sorted row-major indices of the mask's pixels
    cx, cy = mask_centroid(mask)
    chosen: list[int] = []
    if mask[cy, cx]:
        chosen.append(int(np.searchsorted(flat, cy * w + cx)))
    chosen += _draw_distinct(len(flat), n - len(chosen), rng, set(chosen))
    rows, cols = np.divmod(flat[chosen], w)
    return np.stack([cols, rows], axis=-1).astype(np.float64)


def _negative_region(mask: np.ndarray, factor: float) -> np.ndarray:
    """Raster-order flat indices of the background inside the enlarged box (clipped), or of the
    whole image's background when that box has none."""
    x0, y0, x1, y1 = enlarged_box(mask_box(mask), factor, mask.shape)
    region = np.zeros_like(mask)
    region[y0 : y1 + 1, x0 : x1 + 1] = True
    region &= ~mask
    if not region.any():
        region = ~mask
    return np.flatnonzero(region)


def _negatives(
    mask: np.ndarray, n: int, factor: float, pick: Callable[[int], Sequence[int] | np.ndarray]
) -> tuple[np.ndarray, np.ndarray]:
    """n negative points at ``pick(count)``, indices into the ``count`` background pixels of the
    enlarged box (:func:`_negative_region`, raster order); ``pick`` is called only when there is
    such a pixel, so a random picker draws nothing otherwise."""
    mask = np.asarray(mask, dtype=bool)
    if n <= 0:
        return np.zeros((0, 2)), np.zeros(0, dtype=np.int64)
    flat = _negative_region(mask, factor)
    if len(flat) == 0:
        return np.zeros((n, 2)), np.full(n, PAD_LABEL, dtype=np.int64)
    rows, cols = np.divmod(flat[pick(len(flat))], mask.shape[1])
    return np.stack([cols, rows], axis=-1).astype(np.float64), np.zeros(n, dtype=np.int64)


def negative_points(
    mask: np.ndarray, n: int, rng: np.random.Generator, factor: float = NEGATIVE_BOX_FACTOR
) -> tuple[np.ndarray, np.ndarray]:
    """n negative points inside the tight box enlarged ``factor`` x (clipped), outside the mask.

    Returns ``(points (n, 2) float (x, y), labels (n,) int)``. Points are drawn uniformly without
    replacement. If the enlarged box has no background pixel (a mask filling it, e.g. a thin line)
    they come from the whole image's background; if the mask covers the whole image, the points
    are (0, 0) with label ``PAD_LABEL`` (-1), which SAM ignores.
    """
    return _negatives(mask, n, factor, lambda count: _draw_distinct(count, n, rng, set()))


def _strided(count: int, n: int) -> np.ndarray:
    """Indices 0, s, 2s, ... (n of them) with stride s = floor(count / n), the official code's
    spacing; wrapped around (repeats) only when count < n."""
    stride = max(count // n, 1)
    return (np.arange(n) * stride) % count


def even_positive_points(mask: np.ndarray, n: int) -> np.ndarray:
    """n evenly spaced positive points of an (H, W) bool mask -> (n, 2) float (x, y).

    The official code: the mask's pixels in raster order (row by row), taken at stride
    floor(count / n) starting from the first, the first replaced by the centroid. Where the
    centroid lies outside the mask (the official code does not check), the mask pixel nearest
    to it (first in raster order on ties) replaces the first point instead.
    """
    mask = np.asarray(mask, dtype=bool)
    if n <= 0:
        return np.zeros((0, 2))
    rows, cols = np.nonzero(mask)  # raster order
    chosen = _strided(len(rows), n)
    pts = np.stack([cols[chosen], rows[chosen]], axis=-1).astype(np.float64)
    cx, cy = mask_centroid(mask)
    if not mask[cy, cx]:
        nearest = int(np.argmin((cols - cx) ** 2 + (rows - cy) ** 2))
        cx, cy = int(cols[nearest]), int(rows[nearest])
    pts[0] = (cx, cy)
    return pts


def even_negative_points(
    mask: np.ndarray, n: int, factor: float = NEGATIVE_BOX_FACTOR
) -> tuple[np.ndarray, np.ndarray]:
    """n evenly spaced negative points: the background pixels of the tight box enlarged
    ``factor`` x (clipped to the image) in raster order, at stride floor(count / n) from the first.

    Returns ``(points (n, 2) float (x, y), labels (n,) int)``; the fallbacks are those of
    :func:`negative_points` (whole-image background, then ``PAD_LABEL`` points).
    """
    return _negatives(mask, n, factor, lambda count: _strided(count, n))


def official_points(mask: np.ndarray, n: int, factor: float = NEGATIVE_BOX_FACTOR):
    """The official ``find_all_info(..., point_num=n)``: its first n points and labels.

    ``find_center_from_mask_new`` lists the mask's pixels in raster order at stride
    floor(count / 5) (5 points, or 6 when count is not a multiple of 5), replaces the first by
    the centroid (``int`` of the image moments, unchecked: it may lie outside the mask), appends
    the enlarged box's background pixels at stride floor(count / 5) and labels the list
    ``[1] * 5 + [0] * 5``. With 6 positives, S4 (n = 10) labels the 6th in-mask pixel negative
    and keeps 4 background points. Where the official code would crash (a stride of 0, no
    background in the box) the fallbacks of :func:`_negatives` apply.

    Returns ``(points (n, 2) float (x, y), labels (n,) int)``.
    """
    mask = np.asarray(mask, dtype=bool)
    k = OFFICIAL_POINTS_PER_KIND
    rows, cols = np.nonzero(mask)  # raster order
    fg = np.stack([cols, rows], axis=-1)[:: max(len(rows) // k, 1)].astype(np.float64)
    fg[0] = mask_centroid(mask)
    labels = np.concatenate([np.ones(k, dtype=np.int64), np.zeros(k, dtype=np.int64)])
    if n <= len(fg):
        return fg[:n], labels[:n]
    flat = _negative_region(mask, factor)
    if len(flat) == 0:
        pad = n - len(fg)
        pts = np.concatenate([fg, np.zeros((pad, 2))])
        return pts, np.concatenate([labels[: len(fg)], np.full(pad, PAD_LABEL, dtype=np.int64)])
    r, c = np.divmod(flat[:: max(len(flat) // k, 1)], mask.shape[1])
    pts = np.concatenate([fg, np.stack([c, r], axis=-1).astype(np.float64)])[:n]
    return pts, labels[: len(pts)]


def make_prompt(
    mask: np.ndarray,
    strategy: str,
    rng: np.random.Generator | None = None,
    neg_rng: np.random.Generator | None = None,
    sampling: str = "even",
) -> Prompt:
    """Unjittered prompt of one per-object strategy (all of S2-S6) for an (H, W) bool mask.

    ``sampling="even"`` (default, the official code's spacing) spreads the points evenly and
    uses no random stream; ``"official"`` is the official code verbatim (:func:`official_points`);
    ``"random"`` draws positives from ``rng`` and negatives from ``neg_rng``
    (default ``rng``).
    """
    if sampling not in POINT_SAMPLINGS:
        raise ValueError(f"point sampling must be one of {POINT_SAMPLINGS}, got {sampling!r}")
    if strategy not in _LAYOUT:
        raise ValueError(
            f"strategy {strategy!r} has no per-object prompt; choose from {sorted(_LAYOUT)}"
            + (
                " (everything uses point_grid and match_masks_to_objects)"
                if strategy == "everything"
                else ""
            )
        )
    n_pos, n_neg, with_box = _LAYOUT[strategy]
    box = mask_box(mask) if with_box else None
    if n_pos + n_neg == 0:
        return Prompt(box=box)
    if sampling == "official":
        points, labels = official_points(mask, n_pos + n_neg)
        return Prompt(box=box, points=points, point_labels=labels)
    if sampling == "even":
        pos = even_positive_points(mask, n_pos)
        neg, neg_labels = even_negative_points(mask, n_neg)
    else:
        if rng is None:
            raise ValueError("random point sampling needs a random generator")
        pos = positive_points(mask, n_pos, rng)
        neg, neg_labels = negative_points(mask, n_neg, rng if neg_rng is None else neg_rng)
    points = np.concatenate([pos, neg])
    labels = np.concatenate([np.ones(n_pos, dtype=np.int64), neg_labels])
    return Prompt(box=box, points=points, point_labels=labels)


def make_eval_prompt(
    mask: np.ndarray,
    strategy: str,
    jitter: JitterRange | Sequence[float] | str | None,
    *,
    seed: int,
    case: str,
    slice_index: int,
    label: int,
    sampling: str = "even",
) -> Prompt:
    """The evaluation prompt for one object: a pure function of its arguments.

    With ``sampling="even"`` (default) the unjittered points are the official code's evenly
    spaced ones, the same for every seed. With ``"random"`` the unjittered prompt draws positives
    and negatives from two streams keyed by (seed, case, slice, label) only. Either way prompts
    nest across strategies (point1's point is point5's first, and point5_neg5 adds negatives to
    point5's points) and every jitter level moves the same base prompt. The jitter offsets come
    from a stream keyed by strategy and jitter name.

    Args:
        mask: (H, W) bool ground-truth mask of the object, original resolution.
        strategy: one of ``STRATEGIES`` except ``"everything"``.
        jitter: ``None``/``"none"``, a name such as ``"0-10"``, or a ``[lo, hi]`` range in pixels.
        seed, case, slice_index, label: identity of the object (``label`` is its label value).
        sampling: ``even``, ``official`` or ``random`` (``eval.point_sampling``).

    Returns:
        Prompt in original-image (x, y) pixel coordinates.
    """
    if isinstance(jitter, str):
        jitter = parse_jitter_name(jitter)
    ident = (seed, case, slice_index, label)
    base = make_prompt(
        mask,
        strategy,
        prompt_rng(*ident, "positives", None),
        prompt_rng(*ident, "negatives", None),
        sampling=sampling,
    )
    if jitter is None:
        return base
    return jitter_prompt(base, tuple(jitter), prompt_rng(*ident, strategy, jitter), mask.shape)
