"""Prediction overlays drawn each validation epoch and sent to every logger that takes images."""

from __future__ import annotations

from pathlib import Path

from sam_ft.evaluation.reports.plots import plot_overlay_grid


def log_overlays(items: list, path: Path, loggers: list, step: int) -> Path:
    """Draw (image, gt, pred, prompt, title) items into ``path`` and log the PNG.

    W&B gets it as ``val/overlays`` (``log_image``); TensorBoard as an image; CSV keeps the file.
    """
    out = plot_overlay_grid(path, items)
    for logger in loggers:
        if hasattr(logger, "log_image"):
            logger.log_image(key="val/overlays", images=[str(out)], step=step)
        elif hasattr(logger, "experiment") and hasattr(logger.experiment, "add_image"):
            import numpy as np
            from PIL import Image

            pixels = np.asarray(Image.open(out).convert("RGB"))
            logger.experiment.add_image("val/overlays", pixels, step, dataformats="HWC")
    return out
