"""The prompt given to SAM for one object."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class Prompt:
    """Prompt for one object, in ORIGINAL-image pixel coordinates.

    Attributes:
        box: (4,) float [x_min, y_min, x_max, y_max] or None.
        points: (P, 2) float (x, y) = (column, row) or None.
        point_labels: (P,) int, 1 = positive (foreground), 0 = negative; None when no points.
        mask_logits: (S/4, S/4) float low-resolution logits of a previous prediction, or None.
    """

    box: np.ndarray | None = None
    points: np.ndarray | None = None
    point_labels: np.ndarray | None = None
    mask_logits: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.box is not None:
            self.box = np.asarray(self.box, dtype=np.float64).reshape(4)
        if self.points is not None:
            self.points = np.asarray(self.points, dtype=np.float64).reshape(-1, 2)
            if self.point_labels is None:
                raise ValueError("Prompt.points needs point_labels")
            self.point_labels = np.asarray(self.point_labels, dtype=np.int64).reshape(-1)
            if len(self.point_labels) != len(self.points):
                raise ValueError("Prompt.points and point_labels differ in length")
        if self.box is None and self.points is None:
            raise ValueError("a Prompt needs a box or points")

    @property
    def structure(self) -> tuple[bool, int, bool]:
        """(has box, number of points, has mask): prompts with equal structure batch together."""
        n = 0 if self.points is None else len(self.points)
        return self.box is not None, n, self.mask_logits is not None
