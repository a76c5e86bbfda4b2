"""Random displacement of evaluation prompts (the study's robustness test).

Each point and each box corner moves by its own random offset whose length lies in a range such as
0-10 px, in ORIGINAL-image pixels, then is clipped to the image. Coordinates are (x, y).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sam_ft.prompts.types import Prompt

NO_JITTER = "none"

JitterRange = tuple[float, float]


def jitter_name(jitter: JitterRange | Sequence[float] | str | None) -> str:
    """Name used in configs and tables: ``None`` -> ``"none"``, ``(0, 10)`` -> ``"0-10"``."""
    if jitter is None:
        return NO_JITTER
    if isinstance(jitter, str):
        return jitter_name(parse_jitter_name(jitter))
    lo, hi = _check_range(jitter)
    return f"{lo:g}-{hi:g}"


def parse_jitter_name(name: str) -> JitterRange | None:
    """Inverse of :func:`jitter_name`: ``"none"`` -> ``None``, ``"10-20"`` -> ``(10.0, 20.0)``."""
    if name == NO_JITTER:
        return None
    try:
        lo, hi = (float(p) for p in name.split("-"))
    except ValueError:
        raise ValueError(
            f"jitter name must be 'none' or 'LO-HI' (e.g. '0-10'), got {name!r}"
        ) from None
    return _check_range((lo, hi))


def _check_range(jitter: Sequence[float]) -> JitterRange:
    if len(jitter) != 2:
        raise ValueError(f"a jitter range is [lo, hi] in pixels, got {list(jitter)!r}")
    lo, hi = float(jitter[0]), float(jitter[1])
    if not 0 <= lo <= hi:
        raise ValueError(f"a jitter range needs 0 <= lo <= hi, got [{lo:g}, {hi:g}]")
    return lo, hi


def jitter_levels(ranges: Sequence[Sequence[float]] | None) -> list[JitterRange | None]:
    """``eval.jitter_px`` -> levels to evaluate, always starting with ``None`` (unjittered).

    ``[[0, 10], [10, 20]]`` -> ``[None, (0.0, 10.0), (10.0, 20.0)]``.
    """
    levels: list[JitterRange | None] = [None]
    for r in ranges or []:
        rng = _check_range(r)
        if rng not in levels:
            levels.append(rng)
    return levels


def random_offsets(n: int, jitter: JitterRange, rng: np.random.Generator) -> np.ndarray:
    """(n, 2) (dx, dy) offsets: direction uniform on the circle, length uniform in ``jitter``."""
    lo, hi = _check_range(jitter)
    length = rng.uniform(lo, hi, size=n)
    angle = rng.uniform(0.0, 2.0 * np.pi, size=n)
    return np.stack([length * np.cos(angle), length * np.sin(angle)], axis=-1)


def clip_points(points: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
    """Clip (P, 2) (x, y) points to an (H, W) image: x in [0, W-1], y in [0, H-1]."""
    h, w = original_size
    return np.clip(points, 0.0, [w - 1.0, h - 1.0])


def jitter_prompt(
    prompt: Prompt,
    jitter: JitterRange | None,
    rng: np.random.Generator,
    original_size: tuple[int, int],
) -> Prompt:
    """Move every point and both box corners by an offset with length in ``jitter``.

    The box's two corners get independent offsets; afterwards corners are sorted so that
    ``x_min <= x_max`` and ``y_min <= y_max``. Offsets are drawn for the box first, then for the
    points in order.

    Args:
        prompt: prompt in original-image (x, y) pixels.
        jitter: (lo, hi) offset length in pixels, or ``None`` to return the prompt unchanged.
        rng: source of the offsets (see ``strategies.prompt_rng``).
        original_size: (H, W) of the image, for clipping.
    """
    if jitter is None:
        return prompt
    box = None
    if prompt.box is not None:
        corners = prompt.box.reshape(2, 2) + random_offsets(2, jitter, rng)
        corners = clip_points(corners, original_size)
        box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
    points = None
    if prompt.points is not None:
        points = clip_points(
            prompt.points + random_offsets(len(prompt.points), jitter, rng), original_size
        )
    return Prompt(
        box=box,
        points=points,
        point_labels=None if points is None else prompt.point_labels.copy(),
        mask_logits=prompt.mask_logits,
    )
