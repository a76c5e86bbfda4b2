"""Report figures, drawn with matplotlib's object API on the Agg canvas.

Figures are built from ``matplotlib.figure.Figure`` rather than ``pyplot``: nothing here touches
the global backend or pyplot's figure registry, so it is safe on headless machines and in
threads. Every function writes one PNG and returns its path. Images are (row, col); prompt points
and boxes are in (x, y) = (column, row) pixel coordinates, as SAM takes them.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter

#: (image (H, W, 3) uint8, gt (H, W) bool, pred (H, W) bool, prompt or None, title)
OverlayItem = tuple[np.ndarray, np.ndarray, np.ndarray, Any, str]

GT_COLOUR = "#00e000"
PRED_COLOUR = "#ff00ff"
BOX_COLOUR = "#00c8ff"
POSITIVE_COLOUR = "#ffe000"
NEGATIVE_COLOUR = "#ff2020"


def _save(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path


def _empty_note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def plot_grouped_bars(
    table: pd.DataFrame,
    path: str | Path,
    group: str = "prompt",
    hue: str = "model",
    value: str = "dice_mean",
    error: str | None = "dice_std",
    title: str = "Dice per prompt strategy",
    ylabel: str = "Dice",
) -> Path:
    """Grouped bar chart: one group of bars per ``group`` value, one bar per ``hue`` value.

    ``table`` holds one row per (group, hue), already in display order (first appearance wins).
    """
    groups = list(dict.fromkeys(table[group]))
    hues = list(dict.fromkeys(table[hue]))
    fig = Figure(figsize=(max(6.0, 1.2 * len(groups) * max(1, len(hues)) ** 0.5 + 2), 4.0))
    ax = fig.add_subplot()
    if table.empty:
        _empty_note(ax, "no data")
        return _save(fig, path)
    width = 0.8 / max(1, len(hues))
    x = np.arange(len(groups))
    for i, h in enumerate(hues):
        rows = table[table[hue] == h].set_index(group).reindex(groups)
        err = rows[error].to_numpy(float) if error and error in rows else None
        ax.bar(
            x + (i - (len(hues) - 1) / 2) * width,
            rows[value].to_numpy(float),
            width,
            yerr=err,
            capsize=2,
            label=str(h),
        )
    ax.set_xticks(x, [str(g) for g in groups], rotation=20, ha="right")
    ax.set_ylim(0, 1.05 if value.startswith(("dice", "iou", "nsd")) else None)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_dice_vs_jitter(table: pd.DataFrame, path: str | Path, jitter_order: Sequence[str]) -> Path:
    """Dice against prompt jitter, one line per (model, prompt) (see :func:`jitter_figure`)."""
    return _save(jitter_figure(table, jitter_order), path)


def jitter_figure(table: pd.DataFrame, jitter_order: Sequence[str]) -> Figure:
    """Dice against prompt jitter: one line per (model, prompt). With several models the colour
    is the model (zero-shot vs finetuned is the comparison a reader looks for) and the line
    style and marker the prompt; with one model the colour is the prompt.

    ``table`` has columns ``model, prompt, jitter, dice_mean`` (one row each).
    """
    fig = Figure(figsize=(7.0, 4.0))
    ax = fig.add_subplot()
    if table.empty:
        _empty_note(ax, "no jittered prompts evaluated")
        return fig
    levels = [j for j in jitter_order if j in set(table["jitter"])]
    levels += sorted(set(table["jitter"]) - set(levels))
    styles, markers = ["-", "--", ":", "-."], ["o", "s", "^", "D", "v", "P"]
    prompts = list(dict.fromkeys(table["prompt"]))
    models = list(dict.fromkeys(table["model"]))
    by_model = len(models) > 1
    for (model, prompt), rows in table.groupby(["model", "prompt"], sort=False):
        rows = rows.set_index("jitter").reindex(levels)
        m, p = models.index(model), prompts.index(prompt)
        ax.plot(
            range(len(levels)),
            rows["dice_mean"].to_numpy(float),
            marker=markers[p % len(markers)] if by_model else "o",
            color=f"C{(m if by_model else p) % 10}",
            linestyle=styles[(p if by_model else m) % len(styles)],
            label=f"{model} / {prompt}",
        )
    ax.set_xticks(range(len(levels)), [f"{j} px" if j != "none" else j for j in levels])
    ax.set_xlabel("prompt jitter")
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1.05)
    ax.set_title("Dice vs prompt jitter")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_dice_vs_clicks(curves: pd.DataFrame, path: str | Path) -> Path:
    """Mean Dice after each click, one line per model. ``curves``: ``model, click, dice_mean``."""
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    for model, rows in curves.groupby("model", sort=False):
        ax.plot(rows["click"], rows["dice_mean"], marker="o", label=str(model))
    ax.set_xlabel("number of clicks")
    ax.set_ylabel("mean Dice")
    ax.set_ylim(0, 1.05)
    ax.set_title("Dice vs clicks")
    ax.grid(alpha=0.3)
    if not curves.empty:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_dice_vs_distance(table: pd.DataFrame, path: str | Path) -> Path:
    """Mean slice Dice against the distance (slices) from the key slice, one line per model and
    prompt, no jitter. ``table``: ``propagation_distance.csv``'s rows."""
    fig = Figure(figsize=(6.0, 4.0))
    ax = fig.add_subplot()
    rows = table[table["jitter"].astype(str) == "none"]
    for (model, task, prompt), g in rows.groupby(["model", "task", "prompt"], sort=False):
        label = f"{model} {prompt}" + (f" ({task})" if rows["task"].nunique() > 1 else "")
        ax.plot(g["distance"], g["dice_mean"], marker="o", label=label)
    ax.set_xlabel("distance from the key slice (slices)")
    ax.set_ylabel("mean slice Dice")
    ax.set_ylim(0, 1.05)
    ax.set_title("Propagation: Dice vs distance from the key slice")
    ax.grid(alpha=0.3)
    if not rows.empty:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_reliability(bins: pd.DataFrame, path: str | Path) -> Path:
    """IoU-head reliability diagram: mean true IoU against mean predicted IoU per bin, one line
    per (model, prompt), the diagonal for a calibrated head. ``bins``: ``model, prompt,
    pred_iou, iou`` (``calibration.reliability_bins``)."""
    fig = Figure(figsize=(5.5, 5.0))
    ax = fig.add_subplot()
    if bins.empty:
        _empty_note(ax, "no predicted IoU recorded")
        return _save(fig, path)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    styles = ["-", "--", ":", "-."]
    models = list(dict.fromkeys(bins["model"]))
    prompts = list(dict.fromkeys(bins["prompt"]))
    for (model, prompt), rows in bins.groupby(["model", "prompt"], sort=False):
        ax.plot(
            rows["pred_iou"], rows["iou"], marker="o", color=f"C{prompts.index(prompt) % 10}",
            linestyle=styles[models.index(model) % len(styles)], label=f"{model} / {prompt}",
        )  # fmt: skip
    ax.set_xlabel("predicted IoU (bin mean)")
    ax.set_ylabel("true IoU (bin mean)")
    ax.set_xlim(0, 1.02)
    ax.set_ylim(0, 1.02)
    ax.set_title("IoU-head reliability (no jitter)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_attribute_scatter(
    rows: pd.DataFrame,
    attributes: Sequence[str],
    path: str | Path,
    metric: str = "dice",
    title: str = "",
    max_points: int = 4000,
) -> Path:
    """Metric against each object attribute (one panel each), coloured by model.

    Areas use a log x-axis. At most ``max_points`` random rows per model are drawn, to keep the
    PNG small; the selection is seeded so reruns give the same figure.
    """
    attributes = [a for a in attributes if a in rows.columns]
    n = max(1, len(attributes))
    fig = Figure(figsize=(3.6 * n, 3.4))
    axes = fig.subplots(1, n, squeeze=False)[0]
    if not attributes or rows.empty:
        _empty_note(axes[0], "no attributes")
        return _save(fig, path)
    for ax, attribute in zip(axes, attributes, strict=True):
        for model, group in rows.groupby("model", sort=False):
            if len(group) > max_points:
                group = group.sample(max_points, random_state=0)
            x = pd.to_numeric(group[attribute], errors="coerce")
            ax.scatter(x, group[metric], s=6, alpha=0.4, label=str(model))
        if attribute.startswith("area") and (pd.to_numeric(rows[attribute]) > 0).all():
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels overlap on short ranges
        ax.set_xlabel(attribute)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(metric)
    axes[0].legend(fontsize=7, markerscale=2)
    fig.suptitle(title or f"{metric} vs object attributes")
    return _save(fig, path)


def _prompt_parts(prompt: Any) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """(box, points, labels) from a ``Prompt``, a dict with the same keys, or None."""
    if prompt is None:
        return None, None, None
    get = prompt.get if isinstance(prompt, dict) else lambda k: getattr(prompt, k, None)
    box, points, labels = get("box"), get("points"), get("point_labels")
    if points is not None:
        points = _numpy(points).astype(float).reshape(-1, 2)
        labels = np.ones(len(points), int) if labels is None else _numpy(labels).reshape(-1)
    return (None if box is None else _numpy(box).astype(float).reshape(4)), points, labels


def _numpy(x: Any) -> np.ndarray:
    """A numpy array from an array or a (possibly CUDA) torch tensor."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x)


def _rgb(image: Any) -> np.ndarray:
    """(H, W, 3) from (H, W, 3), channel-first (3, H, W) or grey (H, W)."""
    image = _numpy(image)
    if image.ndim == 3 and image.shape[0] == 3 and image.shape[-1] != 3:
        image = np.moveaxis(image, 0, -1)
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    return image


def plot_overlay_grid(path: str | Path, items: Sequence[OverlayItem], ncols: int = 4) -> Path:
    """Grid of overlays: image, GT contour (green), predicted contour (magenta) and prompt.

    Args:
        path: PNG to write.
        items: (image (H, W, 3) uint8, gt (H, W) bool, pred (H, W) bool, prompt, title) each;
            numpy arrays or torch tensors (a (3, H, W) or grey (H, W) image is accepted too).
            ``prompt`` is a :class:`sam_ft.prompts.types.Prompt`, a dict with ``box`` (4,)
            [x_min, y_min, x_max, y_max] and/or ``points`` (P, 2) (x, y) with ``point_labels``
            (P,) 1 = positive (yellow +), 0 = negative (red x), or None.
        ncols: panels per row.
    """
    n = len(items)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    fig = Figure(figsize=(3.2 * ncols, 3.4 * nrows))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    if n == 0:
        _empty_note(axes[0], "no overlays")
    for ax in axes[n:]:
        ax.set_axis_off()
    for ax, (image, gt, pred, prompt, title) in zip(axes, items, strict=False):
        image = _rgb(image)
        ax.imshow(image, interpolation="nearest")
        for mask, colour in ((gt, GT_COLOUR), (pred, PRED_COLOUR)):
            mask = _numpy(mask).astype(bool)
            if mask.any() and not mask.all():
                ax.contour(mask.astype(float), levels=[0.5], colors=[colour], linewidths=1.2)
        box, points, labels = _prompt_parts(prompt)
        if box is not None:
            x0, y0, x1, y1 = box
            ax.add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor=BOX_COLOUR, lw=1.2)
            )
        if points is not None:
            pos = labels == 1
            ax.scatter(points[pos, 0], points[pos, 1], marker="+", c=POSITIVE_COLOUR, s=60)
            ax.scatter(points[~pos, 0], points[~pos, 1], marker="x", c=NEGATIVE_COLOUR, s=40)
        # Jittered prompts can fall outside the image; keep the view on the image.
        height, width = image.shape[:2]
        ax.set_xlim(-0.5, width - 0.5)
        ax.set_ylim(height - 0.5, -0.5)
        ax.set_title(str(title), fontsize=8)
        ax.set_axis_off()
    fig.suptitle("green: ground truth, magenta: prediction", fontsize=9)
    return _save(fig, path)
