"""The outputs of ``predict.py``: a (S, R, C) label stack written back in the input's own
geometry (``.png`` or ``.nii.gz``), and an overlay PNG."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from sam_ft.data.slicing import from_slicing_frame
from sam_ft.evaluation.protocol.predictions import write_png
from sam_ft.inference.frames import file_geometry, write_label_volume
from sam_ft.inference.inputs import stem_of
from sam_ft.prompts.types import Prompt

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Writing


# Distinct hues for the first ten label values (tab20 pairs a dark and a light shade of one
# hue, so labels 1 and 2 looked the same blue); more values cycle through tab20's other shades.
def label_colour(value: int) -> tuple[float, float, float]:
    """RGB in [0, 1] for a label value >= 1."""
    from matplotlib import colormaps

    v = int(value) - 1
    palette = colormaps["tab10"] if v < 10 else colormaps["tab20"]
    return tuple(float(c) for c in palette(v % (10 if v < 10 else 20))[:3])  # type: ignore


OVERLAY_SIDE = 768  # pixels of the overlay's longer side: small slices are shown enlarged


def overlay_png(
    path: Path,
    image: np.ndarray,
    labels: np.ndarray,
    prompts: list[tuple[int, Prompt]] | None = None,
    title: str = "",
) -> Path:
    """The (H, W, 3) uint8 image with each label value tinted and outlined in its own colour, a
    legend of the values, and the prompts drawn (boxes; points: + foreground, x background), at
    a readable size (longer side ``OVERLAY_SIDE`` pixels), as PNG.

    Args:
        image: (H, W, 3) uint8 slice image.
        labels: (H, W) label values, 0 = background.
        prompts: [(label value, Prompt)] in the slice's (x, y) pixel coordinates, or None.
    """
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    rows, cols = labels.shape
    scale = OVERLAY_SIDE / max(rows, cols)
    fig = Figure(figsize=(cols * scale / 100, rows * scale / 100 + 0.6), dpi=100)
    ax = fig.add_axes((0, 0, 1, rows / (rows + 60 / scale)))
    tinted = image.astype(np.float32).copy()
    values = [int(v) for v in np.unique(labels) if v != 0]
    for v in values:
        m = labels == v
        tinted[m] = 0.55 * tinted[m] + 0.45 * np.asarray(label_colour(v)) * 255
    ax.imshow(tinted.astype(np.uint8), interpolation="nearest")
    for v in values:
        ax.contour((labels == v).astype(float), levels=[0.5], colors=[label_colour(v)])
    for value, prompt in prompts or []:
        colour = label_colour(value)
        if prompt.box is not None:
            x0, y0, x1, y1 = prompt.box
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ec=colour, lw=1.5))
        if prompt.points is not None:
            for (x, y), positive in zip(prompt.points, prompt.point_labels, strict=True):
                ax.plot(x, y, "+" if positive else "x", color=colour, ms=10, mew=2.5)
    ax.set_xlim(-0.5, cols - 0.5)
    ax.set_ylim(rows - 0.5, -0.5)
    ax.axis("off")
    handles = [Patch(color=label_colour(v), label=f"label {v}") for v in values[:20]]
    if handles:
        fig.legend(handles=handles, loc="upper center", ncol=min(len(handles), 6), fontsize=9)
    elif not title:
        title = "no object predicted"
    if title:
        fig.text(0.01, 0.99, title, va="top", fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    return path


def write_prediction(
    out_dir: Path,
    image_path: Path,
    stack: np.ndarray,
    slice_axis: int,
    ras_affine: np.ndarray,
    slice_image,
    overlay: bool,
    prompts: Mapping[int, list[tuple[int, Prompt]]] | None = None,
) -> list[Path]:
    """Write the (S, R, C) label stack in the input's geometry (+ an overlay of the fullest
    slice, with its prompts when given as {slice: [(label, Prompt)]} in the slicing frame).
    2D inputs give ``<stem>.png``, volumes ``<stem>.nii.gz``."""
    stem = stem_of(image_path)
    geometry = file_geometry(image_path)
    written = []
    if slice_axis < 0:
        written.append(write_png(out_dir / f"{stem}.png", stack[0]))
    else:
        ras = from_slicing_frame(stack, slice_axis)
        written.append(write_label_volume(out_dir / f"{stem}.nii.gz", ras, geometry, ras_affine))
    if overlay:
        s = int(np.count_nonzero(stack.reshape(len(stack), -1), axis=1).argmax())
        shown = (prompts or {}).get(s if slice_axis >= 0 else -1)
        title = f"{stem}, slice {s}" if slice_axis >= 0 else stem
        written.append(
            overlay_png(out_dir / f"{stem}_overlay.png", slice_image(s), stack[s], shown, title)
        )
    return written
