"""Decode one image's prompts and keep one mask per prompt, as ``eval.mask_selection`` says.

Shared by the evaluation engine and the training module's validation, so the checkpoint kept is
the best by the measure that is reported. Prompts are (x, y) original-image pixels; masks are
(row, col).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from sam_ft.evaluation.everything import prompts_per_upsample
from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.strategies import prompt_selection
from sam_ft.prompts.types import Prompt


def pack_bits(masks: torch.Tensor) -> torch.Tensor:
    """(N, H, W) bool -> (N, ceil(H * W / 8)) uint8 on the masks' device: ``np.packbits(mask,
    axis=None)`` per mask (row-major, first pixel in the highest bit), 8x less to copy back."""
    n = masks.shape[0]
    flat = masks.reshape(n, -1)
    pad = -flat.shape[1] % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    weights = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8, device=masks.device)
    return (flat.reshape(n, -1, 8).to(torch.uint8) * weights).sum(dim=-1, dtype=torch.uint8)


def _select_on_device(
    binary: torch.Tensor, iou: torch.Tensor, gt: np.ndarray, mode: str
) -> tuple[torch.Tensor, np.ndarray]:
    """:func:`~sam_ft.prompts.strategies.select_masks` with the masks left where they are (the
    GPU when there is one): (N, C, H, W) bool, (N, C) IoU predictions, (N, H, W) bool ground
    truth -> (N, H, W) chosen masks on the masks' device and the (N,) int64 chosen channel.

    Only the (N, C) overlap counts come back to the host, where the Dice and its argmax are the
    same float64 numbers as ``select_masks``'s, so both pick the same channel, ties included.
    """
    n, c = binary.shape[:2]
    if c == 1:
        index = np.zeros(n, dtype=np.int64)
    elif mode == "single":
        raise ValueError(f"mask selection 'single' expects 1 mask per object, got {c}")
    elif mode in ("predicted_iou", "auto"):
        index = iou.detach().float().cpu().numpy().reshape(n, c).argmax(axis=1)
    else:
        g = torch.from_numpy(np.ascontiguousarray(gt, dtype=bool)).to(binary.device)[:, None]
        inter = (binary & g).sum(dim=(2, 3)).cpu().numpy().astype(np.int64)
        denom = (binary.sum(dim=(2, 3)) + g.sum(dim=(2, 3))).cpu().numpy().astype(np.int64)
        with np.errstate(invalid="ignore", divide="ignore"):
            dice = np.where(denom > 0, 2.0 * inter / denom, 1.0)
        index = dice.argmax(axis=1)
    index = index.astype(np.int64)
    chosen = binary[torch.arange(n, device=binary.device), torch.as_tensor(index).to(binary.device)]
    return chosen, index


def decode_select(
    model: TrainableSam,
    embedding: torch.Tensor,
    prompts: Sequence[Prompt],
    gt: np.ndarray,
    mode: str,
    max_per_call: int,
    *,
    packed: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """Decode prompts of one image in chunks and keep one mask per prompt.

    Each prompt gets :func:`~sam_ft.prompts.strategies.prompt_selection` of ``mode``: 3 masks and
    a choice among them, or the single mask output (``single``; ``auto`` for unambiguous prompts;
    always for a model without multimask output, e.g. MedSAM).

    Args:
        embedding: (C, h, w) image embedding.
        prompts: N prompts, (x, y) original-image pixels.
        gt: (N, H, W) bool ground truth of each prompt's object (for ``oracle``).
        mode: one of ``MASK_SELECTIONS``.
        max_per_call: prompts per ``model.decode`` call.

        packed: return the masks bit-packed, (N, ceil(H * W / 8)) uint8 as
            ``np.packbits(mask, axis=None)`` per mask (packed on the device).

    Upsampling, thresholding and the selection run on the model's device; only the kept masks
    come back to the host (packed, with ``packed``).

    Returns:
        masks (N, H, W) bool at the original size, chosen channel (N,) (0 for a single output),
        its predicted IoU (N,), and its low-res logits (N, S/4, S/4) (fed back by click loops).
    """
    n, size = len(prompts), tuple(gt.shape[1:])
    threshold = float(model.sam.mask_threshold)
    multimask_model = bool(getattr(model, "multimask_output", True))
    if packed:
        masks = np.zeros((n, -(-size[0] * size[1] // 8)), dtype=np.uint8)
    else:
        masks = np.zeros((n, *size), dtype=bool)
    index = np.zeros(n, dtype=np.int64)
    iou = np.zeros(n, dtype=np.float64)
    side = model.transform.low_res_size
    low_kept = torch.zeros((n, side, side))
    selections = [prompt_selection(mode, p, multimask_model) for p in prompts]
    for selection in sorted(set(selections)):
        multimask = selection != "single"
        # Equal structures share one decoder call inside model.decode: sort before chunking.
        group = sorted(
            (i for i in range(n) if selections[i] == selection), key=lambda i: prompts[i].structure
        )
        # A few prompts upsampled at a time: (N, 3, H, W) float logits of a 4096^2 image are
        # 192 MiB per prompt, so the count follows the image size (UPSAMPLE_BUDGET_BYTES), and
        # blocks under 32 MiB also upsample ~3x faster per prompt (glibc maps larger ones afresh).
        step = prompts_per_upsample(size, 3 if multimask else 1, model.image_size)
        for start in range(0, len(group), max_per_call):
            chunk = group[start : start + max_per_call]
            low, ious = model.decode(embedding, [prompts[i] for i in chunk], size, multimask)
            for s in range(0, len(chunk), step):
                idx = chunk[s : s + step]
                sub_low, sub_iou = low[s : s + len(idx)], ious[s : s + len(idx)]
                binary = model.postprocess(sub_low, size) > threshold
                chosen, ch = _select_on_device(binary, sub_iou, gt[idx], selection)
                masks[idx] = (pack_bits(chosen) if packed else chosen).cpu().numpy()
                index[idx] = ch
                iou[idx] = sub_iou.float().cpu().numpy()[np.arange(len(idx)), ch]
                low_kept[idx] = sub_low[torch.arange(len(idx)), torch.as_tensor(ch)].float().cpu()
    return masks, index, iou, low_kept
