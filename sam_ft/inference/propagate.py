"""``predict.py propagate=box``: prompts on one or a few slices of a volume, masks carried to
every other slice (:func:`sam_ft.evaluation.protocol.propagation.propagate_boxes`, the box rule of
``evaluate.py eval.mode=propagate``), one label volume out."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sam_ft.errors import ConfigError
from sam_ft.evaluation.protocol.predictions import label_map
from sam_ft.evaluation.protocol.propagation import Chain, chain_ranges, propagate_boxes
from sam_ft.inference.inputs import LoadedImage
from sam_ft.model.backend import SegmentBackend
from sam_ft.prompts.types import Prompt

PROPAGATORS = ("box",)
MARGIN_PX = 3
"""Pixels added to each side of the previous mask's box, in the 256 frame (the official 3)."""


def check_propagate(value: object) -> str | None:
    """``propagate=`` -> None (off) or ``box``; a one-line error otherwise."""
    if value in (None, False, "none", "null"):
        return None
    if value == "memory":
        raise ConfigError(
            "propagate=memory is not in predict.py (evaluate.py has it: "
            "eval.propagate.prompt=memory); use propagate=box"
        )
    if value not in PROPAGATORS:
        raise ConfigError(f"propagate={value!r} must be null or one of {list(PROPAGATORS)}")
    return str(value)


def propagate_from_prompts(
    model: SegmentBackend,
    image: LoadedImage,
    by_slice: Mapping[int, list[tuple[int, Prompt]]],
    mask_selection: str,
    max_per_call: int,
) -> np.ndarray:
    """Prompts {slice: [(label, Prompt)]} (slicing frame) -> (S, R, C) label stack.

    Each label is one object; its prompted slices are its key slices, each slice of the volume
    taking the chain of its nearest key; a chain runs to the volume's end or its first empty
    mask (``stop=vanish``). Objects are painted in ascending label value (the larger wins).
    """
    if image.slice_axis < 0:
        raise ConfigError("propagate= needs a volume (a 2D image has no other slice)")
    if mask_selection == "oracle":
        raise ConfigError("mask_selection=oracle needs a reference: not with propagate=")
    num_slices = image.num_slices
    keyed: dict[int, dict[int, Prompt]] = {}
    for s, items in by_slice.items():
        for label, prompt in items:
            if s in keyed.setdefault(label, {}):
                raise ConfigError(f"propagate=: label {label} has two prompts on slice {s}")
            keyed[label][s] = prompt
    labels = sorted(keyed)
    chains = []
    for i, label in enumerate(labels):
        keys = sorted(keyed[label])
        ranges = chain_ranges(keys, num_slices, (0, num_slices - 1), "vanish")
        for key, (low, high) in zip(keys, ranges, strict=True):
            chains.append(Chain(i, 0, key, keyed[label][key], low, high))
    empty = np.zeros((len(labels), *image.size), dtype=bool)  # no reference: scores dropped
    out = propagate_boxes(
        model, image.slice_image, lambda s: empty, chains, stop="vanish",
        margin_px=MARGIN_PX, selection=mask_selection, max_per_call=max_per_call,
    )  # fmt: skip
    stack = np.zeros((num_slices, *image.size), dtype=np.uint16)
    for s in range(num_slices):
        pairs = [(labels[c.obj], out[n][s].mask) for n, c in enumerate(chains) if s in out[n]]
        if pairs:
            stack[s] = label_map(pairs, image.size)
    return stack.astype(np.uint8) if stack.max(initial=0) < 256 else stack
