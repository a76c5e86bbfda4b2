"""Records passed between the data pipeline, the model and the evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class CaseFiles:
    """One case of a task: an image file (or DICOM folder) and its label file.

    ``case`` is the id used for splits (one patient / one study), never shared between splits.
    ``image_id`` names the image itself (the file stem); it equals ``case`` unless several images
    belong to one patient (``task.case_pattern``). ``label_parts``, when given, are binary mask
    files merged into one label map with values 1..n in order (e.g. left and right lung masks).
    """

    case: str
    image: str
    label: str | None
    image_id: str = ""
    label_parts: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.image_id:
            self.image_id = self.case


@dataclass
class SliceRecord:
    """One 2D slice with its objects, at the ORIGINAL resolution.

    Attributes:
        case: case id the slice comes from.
        slice_index: index along the slicing axis of the volume; -1 for a 2D image.
        image: (H, W, 3) uint8, grey replicated to 3 channels after the task's intensity mapping.
        masks: (K, H, W) bool, one binary mask per object kept in this slice.
        labels: (K,) int64 label value of each object (the first value of the object's group).
        names: K object names (``task.labels`` keys, or ``"label_<v>"``).
        spacing: (row, col) pixel spacing in mm (1.0, 1.0 when unknown).
        modality: e.g. ``"CT"``, ``"MR"``, ``"endoscopy"``.
        raw: (H, W) float32 intensities before the uint8 mapping, for the contrast attribute.
        num_slices: length of the volume along the slicing axis (1 for 2D), for 3D re-stacking.
        slice_spacing: spacing in mm along the slicing axis (1.0 for 2D).
        image_id: the image the slice comes from (equals ``case`` unless several images share a
            case); ``(image_id, slice_index)`` is unique within a task.
    """

    case: str
    slice_index: int
    image: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    names: list[str]
    spacing: tuple[float, float] = (1.0, 1.0)
    modality: str = ""
    raw: np.ndarray | None = None
    num_slices: int = 1
    slice_spacing: float = 1.0
    image_id: str = ""

    def __post_init__(self) -> None:
        if not self.image_id:
            self.image_id = self.case

    @property
    def original_size(self) -> tuple[int, int]:
        """(H, W) of the slice."""
        return int(self.image.shape[0]), int(self.image.shape[1])
