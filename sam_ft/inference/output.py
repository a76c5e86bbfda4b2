"""The outputs of ``predict.py``: a (S, R, C) label stack written back in the input's own
geometry (``.png`` or ``.nii.gz``), and an overlay PNG."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from sam_ft.data.slicing import from_slicing_frame
from sam_ft.evaluation.predictions import write_png
from sam_ft.inference.frames import file_geometry, write_label_volume
from sam_ft.inference.inputs import stem_of

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Writing


def overlay_png(path: Path, image: np.ndarray, labels: np.ndarray) -> Path:
    """The (H, W, 3) uint8 image with each label value tinted in its own colour, as PNG."""
    from matplotlib import colormaps

    out = image.astype(np.float32).copy()
    palette = colormaps["tab20"]
    for v in np.unique(labels):
        if v == 0:
            continue
        colour = np.asarray(palette((int(v) - 1) % 20)[:3], dtype=np.float32) * 255
        m = labels == v
        out[m] = 0.5 * out[m] + 0.5 * colour
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out.astype(np.uint8)).save(path)
    return path


def write_prediction(
    out_dir: Path,
    image_path: Path,
    stack: np.ndarray,
    slice_axis: int,
    ras_affine: np.ndarray,
    slice_image,
    overlay: bool,
) -> list[Path]:
    """Write the (S, R, C) label stack in the input's geometry (+ an overlay of the fullest
    slice). 2D inputs give ``<stem>.png``, volumes ``<stem>.nii.gz``."""
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
        written.append(overlay_png(out_dir / f"{stem}_overlay.png", slice_image(s), stack[s]))
    return written
