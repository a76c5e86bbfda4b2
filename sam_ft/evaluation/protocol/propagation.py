"""Slice-to-slice propagation (``eval.mode=propagate``): prompt an object on key slice(s), carry
its mask through the volume both ways.

A :class:`Chain` is one object under one prompt variant from one key slice, over its share of
the volume's slices ``[low, high]``. A propagator turns chains into masks; the ``box``
propagator (:func:`propagate_boxes`, any 2D model) is the MedSAM / LiteMedSAM 3D rule: on the
key slice the chain's prompt, on each next slice the previous mask's box widened by
``margin_px`` in the 256 x 256 frame (:func:`next_box`).

How it differs from the official LiteMedSAM 3D loop (the CVPR 2024 challenge's
``MedSAM_infer_npz_3D``), which the test suite re-implements and matches with ``stop=box_ends``,
``key=middle`` and a box prompt:

- official: the key slice is the middle of the ground truth's 3D box and its prompt is the 3D
  box's (x, y) extent; here the key slice follows ``eval.propagate.key`` and its prompt is the
  study's S2-S6 prompt on that slice's own mask (with jitter), as in ``eval.mode=slices``;
- official (``stop=box_ends``): the loop runs to the 3D box's z ends, which a user without the
  ground truth does not know, and an empty mask falls back to the key box on the next slice;
  ``stop=vanish`` (default) runs to the volume's ends and stops a chain at its first empty
  mask, so masks past the object's ends are possible and counted (over-propagation);
- official: the previous mask is painted with the object's index before its INTER_AREA resize,
  so objects 2, 3... keep more boundary pixels; here every mask is 0/1 (object 1's rule).

The ``memory`` propagator (SAM 2's video predictor,
:mod:`sam_ft.evaluation.protocol.propagation_memory`) takes the same chains and returns the same
``{chain: {slice: mask}}`` (:data:`Propagated`); ``volume_case.PROPAGATORS`` names both.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sam_ft.evaluation.protocol.decode_select import decode_scored
from sam_ft.model.backend import SegmentBackend, embedding_at
from sam_ft.prompts.types import Prompt

FRAME = 256
"""Side of the frame the box rule is defined in (LiteMedSAM's input; MedSAM's 3D rule too)."""


@dataclass(frozen=True)
class Chain:
    """One object (``obj``: index into the case's objects) under prompt variant ``variant``,
    prompted on slice ``key`` with ``prompt`` ((x, y) original pixels), propagated over slices
    ``low..high`` (inclusive, ``low <= key <= high``)."""

    obj: int
    variant: int
    key: int
    prompt: Prompt
    low: int
    high: int


@dataclass
class SliceMask:
    """A chain's prediction on one slice: the (H, W) bool mask, the IoU head's score."""

    mask: np.ndarray
    pred_iou: float


Propagated = dict[int, dict[int, SliceMask]]
"""What a propagator returns: {chain index: {slice index: its mask}} (slices it did not reach
are absent: empty)."""


# --------------------------------------------------------------------------------------------
# Key slices and chains


def key_slices(
    areas: np.ndarray, rule: str, k: int = 1, promptable: np.ndarray | None = None
) -> list[int]:
    """The key slice(s) of one object from its (S,) pixel count per slice.

    ``largest``: the slice of the largest cross-section (the first on a tie); ``middle``: the
    official loop's ``int((z_max - z_min) / 2 + z_min)`` of the extent; ``even``: ``k`` slices
    evenly spaced over the extent (``np.linspace``, rounded). A key that falls on a slice that
    cannot be prompted (the object absent, or, with ``promptable`` ((S,) bool), too small to
    keep) moves to the nearest slice that can (the lower on a tie). Ascending, distinct.
    """
    areas = np.asarray(areas)
    filled = np.flatnonzero(areas > 0)
    ok = areas > 0 if promptable is None else np.asarray(promptable, dtype=bool) & (areas > 0)
    present = np.flatnonzero(ok)
    if not len(present):
        raise ValueError("the object is on no slice")
    z0, z1 = int(filled[0]), int(filled[-1])
    if rule == "largest":
        wanted = [int(present[np.argmax(areas[present])])]
    elif rule == "middle":
        wanted = [int((z1 - z0) / 2 + z0)]
    elif rule == "even":
        wanted = [int(round(z)) for z in np.linspace(z0, z1, k)] if k > 1 else [(z0 + z1) // 2]
    else:
        raise ValueError(f"unknown key rule {rule!r}")
    return sorted({int(present[np.argmin(np.abs(present - z))]) for z in wanted})


def chain_ranges(
    keys: Sequence[int], num_slices: int, extent: tuple[int, int], stop: str
) -> list[tuple[int, int]]:
    """(low, high) of each key's chain: each slice goes to its nearest key (the lower on a
    tie); the outer chains run to the volume's ends (``vanish``) or the object's z extent
    (``box_ends``, the official loop's 3D box)."""
    first, last = (0, num_slices - 1) if stop == "vanish" else extent
    out = []
    for i, key in enumerate(keys):
        low = first if i == 0 else (keys[i - 1] + key) // 2 + 1
        high = last if i == len(keys) - 1 else (key + keys[i + 1]) // 2
        out.append((min(low, key), max(high, key)))
    return out


# --------------------------------------------------------------------------------------------
# The box rule


def next_box(mask: np.ndarray, margin_px: int, frame: int = FRAME) -> np.ndarray | None:
    """The next slice's box from this slice's (H, W) bool mask, or None when it is empty.

    The official rule (``get_bbox256``): the mask resized like the image (longest side to
    ``frame``, OpenCV ``INTER_AREA`` on the 0/1 mask), its box widened by ``margin_px`` on each
    side and clipped to [0, frame]. Returned in original (x, y) pixels as the centres of those
    frame pixels, ``(b + 0.5) * max(H, W) / frame``, so LiteMedSAM's truncating box transform
    gives back the frame box exactly.
    """
    import cv2

    from sam_ft.model.preprocess_lite import lite_input_size

    h, w = lite_input_size(mask.shape, frame)
    small = cv2.resize(mask.astype(np.uint8), (w, h), interpolation=cv2.INTER_AREA)
    rows, cols = np.nonzero(small)
    if not len(rows):
        return None
    box = np.array(
        [
            max(0, cols.min() - margin_px),
            max(0, rows.min() - margin_px),
            min(frame, cols.max() + margin_px),
            min(frame, rows.max() + margin_px),
        ],
        dtype=np.float64,
    )
    return (box + 0.5) * (max(mask.shape) / frame)


def propagated_selection(mode: str) -> str:
    """Mask selection on slices reached by propagation: the ground truth is not looked at there
    (the oracle becomes the IoU head's choice); the key slice keeps ``eval.mask_selection``."""
    return "predicted_iou" if mode == "oracle" else mode


# --------------------------------------------------------------------------------------------
# The box propagator


def propagate_boxes(
    model: SegmentBackend,
    image_of: Callable[[int], np.ndarray],
    gt_of: Callable[[int], np.ndarray],
    chains: Sequence[Chain],
    *,
    stop: str,
    margin_px: int,
    selection: str,
    max_per_call: int,
    num_slices: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Propagated:
    """Run every chain with the box rule: one pass up the volume, then one down.

    Each slice is encoded once per pass and decoded once for all the chains active there (their
    prompts batched), so a volume costs about one encoder call per slice whatever the number of
    objects and prompt variants.

    Args:
        image_of: slice index -> (H, W, 3) uint8 image.
        gt_of: slice index -> (K, H, W) bool ground truth of the case's objects on it (read only
            by the key slices' oracle selection, and for the Dice :func:`decode_scored` returns).
        chains: the chains (:func:`chain_ranges` gives their ranges).
        stop: ``vanish`` (a chain ends at its first empty mask) or ``box_ends`` (an empty mask
            makes the next slice use the key prompt again, as the official loop does).
        selection: ``eval.mask_selection`` (the key slices'; :func:`propagated_selection` on the
            others).
        num_slices: the volume's slice count (not needed here: the chains' ranges bound it).
        progress: called with (slices passed, slices of both passes) after each slice.
    """
    out: Propagated = {i: {} for i in range(len(chains))}
    if not chains:
        return out
    device = next(model.parameters()).device
    keys = [c.key for c in chains]
    up = range(min(keys), max(c.high for c in chains) + 1)
    down = range(max(keys) - 1, min(c.low for c in chains) - 1, -1)
    passed = [0]

    def run(order: Sequence[int], step: int) -> None:
        ended: set[int] = set()  # chains stopped in this direction (vanish)
        for s in order:
            passed[0] += 1
            if progress is not None:
                progress(passed[0], len(up) + len(down))
            active = [
                i
                for i, c in enumerate(chains)
                if i not in ended
                and c.low <= s <= c.high
                and (s >= c.key if step > 0 else s < c.key)
            ]
            prompts: dict[int, Prompt] = {}
            for i in active:
                c = chains[i]
                if s == c.key:
                    prompts[i] = c.prompt
                    continue
                previous = out[i].get(s - step)
                box = None if previous is None else next_box(previous.mask, margin_px)
                if box is not None:
                    prompts[i] = Prompt(box=box)
                elif stop == "box_ends":
                    prompts[i] = c.prompt  # the official fallback: the key slice's prompt
                else:
                    ended.add(i)
            if not prompts:
                continue
            image = image_of(s)
            x = model.preprocess(image)[None].to(device)
            embedding = embedding_at(model.encode(x), 0)
            gt = np.asarray(gt_of(s), dtype=bool)
            for is_key in (True, False):
                ids = [i for i in prompts if (chains[i].key == s) == is_key]
                if not ids:
                    continue
                sel = decode_scored(
                    model,
                    embedding,
                    [prompts[i] for i in ids],
                    gt,
                    selection if is_key else propagated_selection(selection),
                    max_per_call,
                    gt_of=np.array([chains[i].obj for i in ids], dtype=np.int64),
                    keep_low=False,
                )
                for n, i in enumerate(ids):
                    out[i][s] = SliceMask(sel.masks[n], float(sel.pred_iou[n]))

    with torch.inference_mode():
        run(up, +1)
        run(down, -1)
    return out
