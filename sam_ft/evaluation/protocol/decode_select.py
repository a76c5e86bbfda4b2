"""The decode-and-select step: one image's prompts through the mask decoder, the logits
upsampled to the image's size a block at a time (the upsample budget), one of SAM's masks kept
per prompt (``eval.mask_selection``, on the host or on the device) and scored against its
ground truth.

One step for evaluation (:func:`decode_scored`, from ``run_case`` and the propagators), the
training module's validation (so the checkpoint kept is the best by the measure that is
reported) and ``predict.py`` (:func:`decode_masks`: the same masks, no ground truth needed but
for the oracle). Prompts are (x, y) original-image pixels; masks are (row, col).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from sam_ft import bitmask
from sam_ft.errors import ConfigError
from sam_ft.evaluation.metrics.overlap import (
    dice_from_counts,
    dice_iou,
    overlap_counts,
    overlap_scores,
)
from sam_ft.model.backend import SegmentBackend, first_tensor
from sam_ft.prompts.types import Prompt

UPSAMPLE_BUDGET_BYTES = 32 * 2**20
"""Bytes of float32 logits upsampled at once (:func:`decode_scored` on a CPU, Everything mode):
SAM's (S, S) intermediate and the (H, W) result of each mask. It bounds memory (a 4096 x 4096
image costs 64 MiB per mask, and one decoder call of 64 prompts x 3 masks would otherwise need
12 GiB) and keeps each block under the 32 MiB from which glibc maps and unmaps every new block:
a 512 x 512 slice then upsamples 2 prompts at a time, about 3x faster per prompt than 40 at once
(BENCHMARKS.md)."""


def prompts_per_upsample(
    original_size: tuple[int, int],
    masks_per_prompt: int = 3,
    input_size: int = 1024,
    budget: int = UPSAMPLE_BUDGET_BYTES,
) -> int:
    """Prompts whose (masks_per_prompt, S, S) and (masks_per_prompt, H, W) float32 logits fit
    ``budget`` bytes (at least 1), S = ``input_size`` (the model's)."""
    h, w = original_size
    per_prompt = 4 * max(1, masks_per_prompt) * (int(input_size) ** 2 + int(h) * int(w))
    return max(1, int(budget) // per_prompt)


DEVICE_UPSAMPLE_BUDGET_BYTES = 2 * 2**30
"""Bytes of float32 logits upsampled at once on an accelerator (:data:`UPSAMPLE_BUDGET_BYTES`
on a CPU): blocks of ~100 prompts, so the upsampling, selection and scoring run as a few large
batched kernels and the host waits for the device once per block, not once per 2 prompts."""


MASK_SELECTIONS: tuple[str, ...] = ("oracle", "predicted_iou", "single", "auto")
"""``oracle``: best of 3 by Dice vs GT (the study's); ``predicted_iou``: best of 3 by SAM's IoU
head (usable without GT); ``single``: ``multimask_output=False``, SAM's one mask; ``auto``: SAM's
own convention, 3 masks ranked by the IoU head for an ambiguous prompt (one point, no box, no
mask prompt) and the single mask for every other prompt. A model with a single mask output
(``SegmentBackend.multimask_output`` False, e.g. MedSAM) uses its one mask in every mode."""


def is_ambiguous(prompt: Prompt) -> bool:
    """One point, no box, no mask prompt: the prompts SAM decodes with 3 masks."""
    points = 0 if prompt.points is None else len(prompt.points)
    return prompt.box is None and points == 1 and prompt.mask_logits is None


def prompt_selection(mode: str, prompt: Prompt, model_multimask: bool = True) -> str:
    """The concrete selection (``oracle``, ``predicted_iou`` or ``single``) one prompt gets under
    ``eval.mask_selection == mode`` on a model with (``model_multimask``) or without 3 outputs."""
    needs_multimask(mode)
    if not model_multimask:
        return "single"
    if mode == "auto":
        return "predicted_iou" if is_ambiguous(prompt) else "single"
    return mode


def needs_multimask(mode: str) -> bool:
    """Whether ``eval.mask_selection == mode`` needs SAM called with ``multimask_output=True``
    (``auto`` does for some prompts: see :func:`prompt_selection`)."""
    if mode not in MASK_SELECTIONS:
        raise ValueError(f"mask selection must be one of {MASK_SELECTIONS}, got {mode!r}")
    return mode != "single"


def _to_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy() if x.dtype != torch.bool else x.cpu().numpy()
    return np.asarray(x)


def select_masks(
    masks: np.ndarray | torch.Tensor,
    iou_pred: np.ndarray | torch.Tensor | None,
    gt: np.ndarray | torch.Tensor | None,
    mode: str,
) -> tuple[np.ndarray, np.ndarray]:
    """Keep one of SAM's C masks per object.

    Args:
        masks: (N, C, H, W) bool masks, or float logits (binarised at > 0, SAM's threshold).
        iou_pred: (N, C) SAM IoU predictions; needed for ``predicted_iou``.
        gt: (N, H, W) bool ground truth at the masks' resolution; needed for ``oracle``.
        mode: one of ``MASK_SELECTIONS`` (``auto`` ranks 3 masks by the IoU head, as SAM does).

    Returns:
        (N, H, W) bool chosen masks and (N,) int64 chosen channel. Ties go to the lower channel.
    """
    needs_multimask(mode)
    m = _to_numpy(masks)
    if m.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) masks, got shape {m.shape}")
    m = m if m.dtype == bool else m > 0.0
    n, c = m.shape[:2]
    if c == 1:
        index = np.zeros(n, dtype=np.int64)
    elif mode == "single":
        raise ValueError(f"mask selection 'single' expects 1 mask per object, got {c}")
    elif mode in ("predicted_iou", "auto"):
        if iou_pred is None:
            raise ValueError("mask selection 'predicted_iou' needs iou_pred")
        index = _to_numpy(iou_pred).reshape(n, c).argmax(axis=1)
    else:
        if gt is None:
            raise ValueError("mask selection 'oracle' needs the ground truth")
        g = _to_numpy(gt).astype(bool)[:, None]  # (N, 1, H, W)
        inter = (m & g).sum(axis=(2, 3), dtype=np.int64)
        denom = m.sum(axis=(2, 3), dtype=np.int64) + g.sum(axis=(2, 3), dtype=np.int64)
        index = dice_from_counts(inter, denom).argmax(axis=1)
    index = index.astype(np.int64)
    return m[np.arange(n), index], index


def _select_on_device(
    binary: torch.Tensor, iou: torch.Tensor, gt: torch.Tensor | np.ndarray, mode: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`select_masks` on the masks' device (the GPU when there
    is one), and the Dice and IoU of the kept masks: (N, C, H, W) bool, (N, C) IoU predictions,
    (N, H, W) bool ground truth -> (N, H, W) chosen masks, (N,) int64 chosen channel, (N,)
    float64 Dice and IoU, all on the masks' device (nothing comes back to the host here).

    The oracle's per-channel Dice are :func:`dice_iou`'s float64 numbers, those of
    ``select_masks``, and ``argmax`` keeps the first maximum as numpy's does: the same channel,
    ties included.
    """
    n, c = binary.shape[:2]
    device = binary.device
    g = torch.as_tensor(gt).to(device=device, dtype=torch.bool)
    if c == 1:
        index = torch.zeros(n, dtype=torch.int64, device=device)
    elif mode == "single":
        raise ValueError(f"mask selection 'single' expects 1 mask per object, got {c}")
    elif mode in ("predicted_iou", "auto"):
        index = iou.detach().float().reshape(n, c).argmax(dim=1)
    else:
        inter, total = overlap_counts(binary, g[:, None])  # (N, C) each
        dice, ious = dice_iou(inter, total)
        index = dice.argmax(dim=1)
        rows = torch.arange(n, device=device)
        return binary[rows, index], index, dice[rows, index], ious[rows, index]
    chosen = binary[torch.arange(n, device=device), index]
    return (chosen, index, *overlap_scores(chosen, g))


@dataclass
class Selected:
    """What :func:`decode_scored` keeps per prompt (N prompts), on the host.

    Attributes:
        masks: (N, H, W) bool at the original size, or bit-packed (N, ceil(H * W / 8)) uint8
            (:func:`sam_ft.bitmask.pack`, packed on the device).
        index: (N,) int64 chosen channel (0 for a single output).
        pred_iou: (N,) float64 the chosen channel's predicted IoU.
        dice: (N,) float64 Dice of the kept mask against its object's ground truth.
        iou: (N,) float64 IoU (Jaccard) of the kept mask against its object's ground truth.
        low: (N, S/4, S/4) float32 low-res logits of the kept channel (fed back by click loops),
            or None when not asked for.
        dice_oracle: (N,) float64 the best Dice of the prompt's masks (``dice`` with oracle
            selection; with one mask output, that mask's).
        dice_top_iou: (N,) float64 Dice of the mask the IoU head ranks first (``dice`` with
            predicted-IoU selection): with ``dice_oracle``, what trusting the head costs.
    """

    masks: np.ndarray
    index: np.ndarray
    pred_iou: np.ndarray
    dice: np.ndarray
    iou: np.ndarray
    low: torch.Tensor | None
    dice_oracle: np.ndarray
    dice_top_iou: np.ndarray


def decode_scored(
    model: SegmentBackend,
    embedding: torch.Tensor,
    prompts: Sequence[Prompt],
    gt: np.ndarray,
    mode: str,
    max_per_call: int,
    *,
    gt_of: Sequence[int] | np.ndarray | None = None,
    packed: bool = False,
    keep_low: bool = True,
) -> Selected:
    """Decode prompts of one image in chunks, keep one mask per prompt and score it.

    Each prompt gets :func:`prompt_selection` of ``mode``: 3 masks and
    a choice among them, or the single mask output (``single``; ``auto`` for unambiguous prompts;
    always for a model without multimask output, e.g. MedSAM).

    Upsampling to the original size, thresholding, the selection and the Dice / IoU of the kept
    masks run on the model's device, as torch ops over many prompts at once (the ground truth
    goes to the device once, one mask per object); only the kept masks (bit-packed with
    ``packed``), the chosen channels and the scalars come back to the host, once per upsampling
    block. A block holds the prompts whose logits fit :data:`UPSAMPLE_BUDGET_BYTES` on a CPU
    (memory, and glibc's allocator) and
    :data:`DEVICE_UPSAMPLE_BUDGET_BYTES` on an accelerator (136 prompts of a 512 x 512 slice
    with 3 masks: a decoder call of ``eval.max_prompts_per_call`` 256 in two blocks).

    Args:
        embedding: (C, h, w) image embedding.
        prompts: N prompts, (x, y) original-image pixels.
        gt: (K, H, W) bool ground truth at the original size: one mask per prompt (K = N), or
            one per object with ``gt_of``.
        mode: one of ``MASK_SELECTIONS``.
        max_per_call: prompts per ``model.decode`` call.
        gt_of: (N,) index into ``gt`` of each prompt's object (default: prompt i -> ``gt[i]``).
        packed: return the masks bit-packed (packed on the device).
        keep_low: return the kept channels' low-res logits (:attr:`Selected.low`).
    """
    gt = np.asarray(gt, dtype=bool)
    n, size = len(prompts), tuple(gt.shape[1:])
    gt_of = np.arange(n) if gt_of is None else np.asarray(gt_of, dtype=np.int64)
    if gt_of.shape != (n,) or (n and not 0 <= gt_of.min() <= gt_of.max() < len(gt)):
        raise ValueError(
            f"{n} prompts need one ground-truth mask each (gt {gt.shape}, gt_of {gt_of.shape})"
        )
    device = first_tensor(embedding).device
    gt_dev = torch.from_numpy(np.ascontiguousarray(gt)).to(device)
    multimask_model = bool(getattr(model, "multimask_output", True))
    if packed:
        masks = np.zeros((n, bitmask.packed_bytes(size)), dtype=np.uint8)
    else:
        masks = np.zeros((n, *size), dtype=bool)
    index = np.zeros(n, dtype=np.int64)
    pred_iou = np.zeros(n, dtype=np.float64)
    dice = np.zeros(n, dtype=np.float64)
    iou = np.zeros(n, dtype=np.float64)
    dice_oracle = np.zeros(n, dtype=np.float64)
    dice_top_iou = np.zeros(n, dtype=np.float64)
    side = model.transform.low_res_size
    low_kept = torch.zeros((n, side, side)) if keep_low else None
    budget = UPSAMPLE_BUDGET_BYTES if device.type == "cpu" else DEVICE_UPSAMPLE_BUDGET_BYTES
    selections = [prompt_selection(mode, p, multimask_model) for p in prompts]
    for selection in sorted(set(selections)):
        multimask = selection != "single"
        # Equal structures share one decoder call inside model.decode: sort before chunking.
        group = sorted(
            (i for i in range(n) if selections[i] == selection), key=lambda i: prompts[i].structure
        )
        # A few prompts upsampled at a time: (N, 3, H, W) float logits of a 4096^2 image are
        # 192 MiB per prompt, so the count follows the image size and the budget.
        step = prompts_per_upsample(size, 3 if multimask else 1, model.image_size, budget)
        for start in range(0, len(group), max_per_call):
            chunk = group[start : start + max_per_call]
            low, ious = model.decode(embedding, [prompts[i] for i in chunk], size, multimask)
            for s in range(0, len(chunk), step):
                idx = chunk[s : s + step]
                sub_low, sub_iou = low[s : s + len(idx)], ious[s : s + len(idx)]
                binary = model.binarize(sub_low, size)
                g = gt_dev[torch.from_numpy(gt_of[idx]).to(device)]
                chosen, ch, d, u = _select_on_device(binary, sub_iou, g, selection)
                rows = torch.arange(len(idx), device=device)
                masks[idx] = (bitmask.pack(chosen) if packed else chosen).cpu().numpy()
                best, top = _oracle_and_top_iou(binary, sub_iou, g, d)
                # The scalars in one copy: channel (exact as float64), predicted IoU (float32,
                # exact as float64, as numpy widens it), Dice, IoU, the two selections' Dice.
                kept_iou = sub_iou[rows, ch].float().double()
                scalars = torch.stack([ch.double(), kept_iou, d, u, best, top]).cpu().numpy()
                index[idx] = scalars[0].astype(np.int64)
                pred_iou[idx], dice[idx], iou[idx] = scalars[1], scalars[2], scalars[3]
                dice_oracle[idx], dice_top_iou[idx] = scalars[4], scalars[5]
                if low_kept is not None:
                    low_kept[idx] = sub_low[rows, ch].float().cpu()
    return Selected(masks, index, pred_iou, dice, iou, low_kept, dice_oracle, dice_top_iou)


def decode_masks(
    model: SegmentBackend,
    embedding: torch.Tensor,
    prompts: Sequence[Prompt],
    size: tuple[int, int],
    mode: str,
    max_per_call: int,
    gt: np.ndarray | None = None,
) -> np.ndarray:
    """(N, H, W) bool: one mask per prompt, chosen by ``mode``, for ``predict.py``.

    :func:`decode_scored` itself (the same decoder calls in the same order, the same per-prompt
    selection, e.g. ``auto`` keeps SAM's single output for an unambiguous prompt), so the masks
    are bit for bit those evaluation scores.

    Args:
        embedding: (C, h, w) image embedding.
        prompts: N prompts, (x, y) original pixels.
        size: (H, W) of the image.
        gt: (N, H, W) bool reference masks, needed for ``oracle`` only.
    """
    if gt is None:
        if mode == "oracle":
            raise ConfigError("mask_selection=oracle needs a reference label map")
        # Scores against an empty stand-in (one mask for all prompts) are computed and dropped.
        gt, gt_of = np.zeros((1, *size), dtype=bool), np.zeros(len(prompts), dtype=np.int64)
    else:
        gt_of = None
    selected = decode_scored(
        model, embedding, prompts, gt, mode, max_per_call, gt_of=gt_of, keep_low=False
    )
    return selected.masks


def _oracle_and_top_iou(
    binary: torch.Tensor, iou: torch.Tensor, gt: torch.Tensor, kept: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) float64 Dice of the oracle's mask and of the IoU head's first choice among the
    (N, C, H, W) masks ((N, C) predictions, (N, H, W) ground truth); ``kept`` (the kept mask's
    Dice) for both when there is one mask. The channels as ``_select_on_device`` ranks them."""
    n, c = binary.shape[:2]
    if c == 1:
        return kept, kept
    inter, total = overlap_counts(binary, gt[:, None])  # (N, C) each
    per_channel, _ = dice_iou(inter, total)
    rows = torch.arange(n, device=binary.device)
    top = iou.detach().float().reshape(n, c).argmax(dim=1)
    return per_channel.max(dim=1).values, per_channel[rows, top]
