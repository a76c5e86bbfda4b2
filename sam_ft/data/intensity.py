"""Map raw intensities to the uint8 0-255 images SAM sees (``task.intensity``).

Modes:

* ``window``: CT window ``[level - width / 2, level + width / 2]`` (e.g. level 40, width 400).
* ``percentile``: the official COSMOS rule, clip to ``[np.percentile(x, 0.95),
  np.percentile(x, 99.5)]`` (the 0.95th percentile, not the 5th). ``scope: slice`` (default, the
  official code's ``np.percentile`` per 2D image) computes the bounds on each 2D slice;
  ``scope: volume`` once over the whole volume (one mapping for all slices of a case). Pixels that
  were exactly 0 stay 0 (``keep_zero``, default true, as the study prescribes).
* ``none``: 8-bit 2D images kept as they are (RGB stays RGB); data outside 0-255 is min-max scaled.

The clipped range is scaled linearly to 0-255 and truncated to uint8 like the official code's
``np.uint8(...)``. Model-specific resizing and normalisation live in ``sam_ft.model.preprocess``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from sam_ft.errors import ConfigError

MODES = ("window", "percentile", "none")
SCOPES = ("slice", "volume")
DEFAULT_PERCENTILES = (0.95, 99.5)


def window_bounds(level: float, width: float) -> tuple[float, float]:
    """(low, high) intensity bounds of a CT window."""
    if width <= 0:
        raise ConfigError(f"task.intensity.width must be > 0, got {width}")
    return float(level) - float(width) / 2.0, float(level) + float(width) / 2.0


def percentile_bounds(
    x: np.ndarray, lower: float = DEFAULT_PERCENTILES[0], upper: float = DEFAULT_PERCENTILES[1]
) -> tuple[float, float]:
    """(low, high) = (``lower``-th, ``upper``-th) percentiles of all values of ``x``.

    The defaults are the official code's 0.95th and 99.5th percentiles.
    """
    lo, hi = np.percentile(np.asarray(x, dtype=np.float64), [lower, upper])
    return float(lo), float(hi)


def scale_to_uint8(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Clip ``x`` to [low, high], scale to [0, 255] and truncate to uint8 (any shape).

    A constant range (high <= low) gives zeros rather than dividing by zero.
    """
    x = np.asarray(x, dtype=np.float64)
    if high <= low:
        return np.zeros(x.shape, dtype=np.uint8)
    y = (np.clip(x, low, high) - low) / (high - low) * 255.0
    # Truncation (not rounding) matches the official code's np.uint8 cast.
    return y.astype(np.uint8)


def intensity_bounds(volume: np.ndarray, intensity: Mapping[str, Any]) -> tuple[float, float]:
    """Bounds used to map one whole volume (or one 2D image) to uint8.

    Args:
        volume: raw intensities, any shape (all voxels of the case, all channels).
        intensity: ``task.intensity`` (``mode`` plus ``level``/``width`` or ``lower``/``upper``).

    Returns:
        (low, high) for :func:`scale_to_uint8`. ``none`` returns (0, 255) for data already in
        0-255, else the data's min and max.
    """
    mode = intensity["mode"]
    if mode == "window":
        if intensity.get("level") is None or intensity.get("width") is None:
            raise ConfigError("task.intensity.mode=window needs task.intensity.level and .width")
        return window_bounds(intensity["level"], intensity["width"])
    if mode == "percentile":
        lower = intensity.get("lower", DEFAULT_PERCENTILES[0])
        upper = intensity.get("upper", DEFAULT_PERCENTILES[1])
        if not 0 <= lower < upper <= 100:
            raise ConfigError(
                f"task.intensity percentiles need 0 <= lower < upper <= 100, got {lower}, {upper}"
            )
        return percentile_bounds(volume, lower, upper)
    if mode == "none":
        lo, hi = float(np.min(volume)), float(np.max(volume))
        if lo >= 0 and hi <= 255:
            return 0.0, 255.0
        return lo, hi
    raise ConfigError(f"task.intensity.mode must be one of {MODES}, got {mode!r}")


def intensity_scope(intensity: Mapping[str, Any]) -> str:
    """``slice`` when the bounds are computed per 2D slice, else ``volume``.

    Only the percentile rule depends on the data; ``window`` and ``none`` give the same bounds
    either way, so they count as ``volume`` (one computation per case).
    """
    scope = intensity["scope"]
    if scope not in SCOPES:
        raise ConfigError(f"task.intensity.scope must be one of {SCOPES}, got {scope!r}")
    return scope if intensity["mode"] == "percentile" else "volume"


def map_slice(
    raw: np.ndarray, intensity: Mapping[str, Any], bounds: tuple[float, float] | None
) -> np.ndarray:
    """One raw 2D slice -> uint8 with the task's intensity mapping.

    Args:
        raw: (H, W) or (H, W, 3) raw intensities.
        intensity: ``task.intensity`` with every key (``parse_config`` or ``task_options``
            fills a preset's from conf/task/folder.yaml).
        bounds: the volume's (low, high), or None to compute them on this slice (``scope:
            slice``, the official code's per-image percentiles).

    Returns:
        uint8 array of ``raw``'s shape; with the percentile rule and ``keep_zero``, pixels
        that were exactly 0 stay 0.
    """
    if bounds is None:
        bounds = intensity_bounds(raw, intensity)
    out = to_uint8(raw, *bounds)
    if intensity["mode"] == "percentile" and intensity["keep_zero"]:
        out[np.asarray(raw) == 0] = 0
    return out


def case_bounds(volume: np.ndarray, intensity: Mapping[str, Any]) -> tuple[float, float] | None:
    """The bounds of a whole case for :func:`prepare_slice`, or None when they are computed on
    each slice (``scope: slice`` with the percentile rule)."""
    if intensity_scope(intensity) == "slice":
        return None
    return intensity_bounds(volume, intensity)


def prepare_slice(
    raw: np.ndarray, intensity: Mapping[str, Any], bounds: tuple[float, float] | None
) -> np.ndarray:
    """One raw 2D slice -> the (H, W, 3) uint8 image SAM's preprocessing takes.

    The one function the loader (training, evaluation) and ``predict.py`` prepare images with:
    :func:`map_slice` (``bounds`` from :func:`case_bounds`), then grey replicated to RGB.

    Args:
        raw: (H, W) or (H, W, 3) raw intensities.
    """
    return to_rgb(map_slice(np.asarray(raw, dtype=np.float32), intensity, bounds))


def to_uint8(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """Like :func:`scale_to_uint8`, but (0, 255) bounds pass integer 8-bit data through exactly."""
    if low == 0.0 and high == 255.0:
        return np.clip(np.asarray(x), 0, 255).astype(np.uint8)
    return scale_to_uint8(x, low, high)


def to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W) grey or (H, W, 3) colour uint8 -> (H, W, 3) uint8 (grey replicated to 3 channels)."""
    if image.ndim == 2:
        return np.repeat(image[:, :, None], 3, axis=2)
    if image.ndim == 3 and image.shape[2] == 3:
        return image
    raise ValueError(f"expected (H, W) or (H, W, 3), got {image.shape}")
