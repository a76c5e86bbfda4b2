"""Label maps for new images with a (finetuned) SAM: the work behind ``predict.py``.

Three ways to prompt, per input file:

* ``labels``: a reference or rough label map; every object of every slice gets the prompt of a
  study strategy (``box`` by default), made exactly as evaluation makes it
  (:func:`sam_ft.prompts.strategies.make_eval_prompt`, same seed, case id and label), and the
  image is loaded by evaluation's own :func:`sam_ft.data.loading.load_case`: for the same weights,
  image and prompts the masks equal those ``evaluate.py`` scores.
* ``prompts``: a JSON file of objects with ``box`` [x_min, y_min, x_max, y_max] and/or
  ``points`` [[x, y], ...] with ``point_labels`` (1 foreground, 0 background), optional
  ``label`` (the value written; default: the object's position, 1, 2, ...) and, for volumes,
  ``slice``. Coordinates are the input file's own pixel indices: for a 2D image x = column and
  y = row; for a NIfTI volume ``slice`` indexes the file axis that is sliced (the one the loader's
  slicing axis comes from), and (y, x) index the two other file axes in their order. A DICOM
  series has no array of its own: its coordinates index the RAS-oriented array the label map is
  written in, by the same rule.
* ``everything``: SAM's automatic mask generation on every slice (values 1..M per slice).

Images go through the loader of training and evaluation (RAS orientation, the slicing axis, the
intensity mapping, grey to RGB); each prediction is written back in the input's own geometry
(:mod:`sam_ft.inference.frames`). Masks are (row, col); prompts (x, y).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam_ft.data.loading import CaseData, dataset_meta, load_case
from sam_ft.data.types import CaseFiles
from sam_ft.errors import ConfigError
from sam_ft.evaluation.protocol.decode_select import MASK_SELECTIONS, decode_masks
from sam_ft.evaluation.protocol.everything import EverythingConfig, generate_codes
from sam_ft.evaluation.protocol.everything import decode_mask as decode_code
from sam_ft.evaluation.protocol.predictions import label_map
from sam_ft.inference.inputs import LoadedImage, stem_of
from sam_ft.model.backend import SegmentBackend, embedding_at
from sam_ft.prompts.strategies import STRATEGIES, make_eval_prompt
from sam_ft.prompts.types import Prompt

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """How images are read and fed (from the model card or run config, then the overrides).

    Attributes:
        task: a ``task`` mapping for the loader (name, modality, intensity, slice_axis, channel,
            labels, label_binarize, ...).
        data: a ``data`` mapping (``min_object_pixels``, ``affine_atol``, ``on_error=raise``).
        prompt: ``box``, ``point1``, ``point5``, ``point5_neg5``, ``box_point1`` or
            ``everything``.
        mask_selection: ``predicted_iou``, ``single`` or ``oracle`` (needs ``labels``).
        seed: the prompt seed (evaluation's ``seed``).
        max_prompts_per_call: prompts per decoder call.
        everything: Everything mode settings.
        overlay: also write ``<name>_overlay.png``.
    """

    task: dict[str, Any]
    data: dict[str, Any]
    prompt: str = "box"
    mask_selection: str = "predicted_iou"
    seed: int = 42
    max_prompts_per_call: int = 256
    everything: EverythingConfig = field(default_factory=EverythingConfig)
    overlay: bool = True

    def __post_init__(self) -> None:
        if self.prompt not in STRATEGIES:
            raise ConfigError(f"prompt={self.prompt!r} must be one of {list(STRATEGIES)}")
        if self.mask_selection not in MASK_SELECTIONS:
            raise ConfigError(
                f"mask_selection={self.mask_selection!r} must be one of {list(MASK_SELECTIONS)}"
            )
        if int(self.max_prompts_per_call) < 1:
            raise ConfigError("max_prompts_per_call must be >= 1")


def _embed(model: SegmentBackend, image: np.ndarray) -> torch.Tensor:
    device = next(model.parameters()).device
    return embedding_at(model.encode(model.preprocess(image)[None].to(device)), 0)


def _bar(total: int, desc: str, leave: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="slice", leave=leave)


def predict_from_labels(
    model: SegmentBackend, image_path: Path, label_path: Path, settings: Settings
) -> tuple[CaseData, np.ndarray, dict[int, np.ndarray], dict[int, list[tuple[int, Prompt]]]]:
    """Prompts from a label map, per object per slice -> (case, (S, R, C) label stack,
    {slice: (H, W, 3) uint8 image} of the prompted slices, {slice: [(label, Prompt)]}: the
    prompts, for the overlay; slice -1 for a 2D image).

    The case is loaded by evaluation's ``load_case`` and prompted by ``make_eval_prompt`` with
    evaluation's identity (seed, image id, slice, label value).
    """
    stem = stem_of(image_path)
    files = CaseFiles(case=stem, image=str(image_path), label=str(label_path))
    # The dataset.json evaluation would read for this image (its task folder's), if any.
    case = load_case(files, settings.task, settings.data, meta=dataset_meta(files, settings.task))
    stack = np.zeros(case.volume_shape, dtype=np.uint16)
    pairs_by_slice: dict[int, list[tuple[int, np.ndarray]]] = {}
    shown: dict[int, np.ndarray] = {}
    used: dict[int, list[tuple[int, Prompt]]] = {}
    with _bar(len(case.slices), f"predict {stem}") as bar:
        for rec in case.slices:
            gt = np.asarray(rec.masks, dtype=bool)
            labels = [int(v) for v in rec.labels]
            prompts = [
                make_eval_prompt(
                    gt[i],
                    settings.prompt,
                    None,
                    seed=settings.seed,
                    case=case.image_id,
                    slice_index=rec.slice_index,
                    label=lab,
                )
                for i, lab in enumerate(labels)
            ]
            masks = decode_masks(
                model,
                _embed(model, rec.image),
                prompts,
                rec.original_size,
                settings.mask_selection,
                settings.max_prompts_per_call,
                gt if settings.mask_selection == "oracle" else None,
            )
            s = max(rec.slice_index, 0)
            pairs_by_slice[s] = list(zip(labels, masks, strict=True))
            shown[s] = rec.image
            used[s if case.slice_axis >= 0 else -1] = list(zip(labels, prompts, strict=True))
            bar.update(1)
    for s, pairs in pairs_by_slice.items():
        stack[s] = label_map(pairs, stack.shape[1:])
    return case, _narrow(stack), shown, used


def predict_from_prompts(
    model: SegmentBackend,
    image: LoadedImage,
    by_slice: Mapping[int, list[tuple[int, Prompt]]],
    settings: Settings,
    name: str,
) -> np.ndarray:
    """Given prompts {slice: [(label, Prompt)]} -> (S, R, C) label stack."""
    if settings.mask_selection == "oracle":
        raise ConfigError("mask_selection=oracle needs a reference: use labels=, not prompts=")
    stack = np.zeros((image.num_slices, *image.size), dtype=np.uint16)
    with _bar(len(by_slice), f"predict {name}") as bar:
        for s, items in sorted(by_slice.items()):
            idx = max(s, 0)
            masks = decode_masks(
                model,
                _embed(model, image.slice_image(idx)),
                [p for _, p in items],
                image.size,
                settings.mask_selection,
                settings.max_prompts_per_call,
            )
            stack[idx] = label_map(
                [(lab, m) for (lab, _), m in zip(items, masks, strict=True)], image.size
            )
            bar.update(1)
    return _narrow(stack)


def predict_everything(
    model: SegmentBackend, image: LoadedImage, settings: Settings, name: str
) -> np.ndarray:
    """Everything mode on every slice -> (S, R, C) label stack, values 1..M per slice."""
    stack = np.zeros((image.num_slices, *image.size), dtype=np.uint16)
    with _bar(image.num_slices, f"everything {name}") as bar:
        for s in range(image.num_slices):
            img = image.slice_image(s)
            codes = generate_codes(model, _embed(model, img), image.size, settings.everything)
            stack[s] = label_map(
                [(m + 1, decode_code(c)) for m, c in enumerate(codes[:65535])], image.size
            )
            bar.update(1)
    if not stack.any():
        e = settings.everything
        log.warning(
            "%s: Everything mode kept no mask on any of its %d slice(s): none of the %d x %d grid "
            "prompts passed pred_iou_thresh=%s and stability_score_thresh=%s (SAM's defaults, "
            "tuned on natural images); the label map is empty. Lower them "
            "(everything.pred_iou_thresh=0.5 everything.stability_score_thresh=0.8) or prompt "
            "the objects (box=, points=, prompts=, labels=)",
            name, image.num_slices, e.grid, e.grid, e.pred_iou_thresh, e.stability_score_thresh,
        )  # fmt: skip
    return _narrow(stack)


def _narrow(stack: np.ndarray) -> np.ndarray:
    return stack.astype(np.uint8) if stack.max(initial=0) < 256 else stack
