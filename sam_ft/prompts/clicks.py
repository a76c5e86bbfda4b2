"""Corrective clicks for iterative (interactive) training and evaluation.

A click is ``(x, y, label)``: (x, y) = (column, row) in the frame of the masks it was computed from,
label 1 = positive (add the region), 0 = negative (remove it). Masks are (H, W) arrays indexed
(row, col). During training the masks are usually SAM's low-resolution (e.g. 256 x 256) logits and
targets; :func:`low_res_to_original` maps such a click back to original-image pixels, which is the
frame a :class:`Prompt` uses.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy import ndimage

from sam_ft.prompts.types import Prompt

Click = tuple[int, int, int]


def _interior_point(region: np.ndarray, rng: np.random.Generator | None) -> tuple[int, int]:
    """(row, col) of the pixel of ``region`` farthest from its boundary.

    The image border counts as boundary (the region is padded with background first, as RITM
    does), so clicks avoid the image edge. Ties: the first in row-major order, or a random one
    when ``rng`` is given. Work is limited to the region's bounding box.
    """
    sl = ndimage.find_objects(region.astype(np.int8))[0]
    crop = np.pad(region[sl], 1)
    dist = ndimage.distance_transform_edt(crop)[1:-1, 1:-1]
    best = np.flatnonzero(dist == dist.max())
    i = best[0] if rng is None else best[rng.integers(len(best))]
    r, c = np.unravel_index(i, dist.shape)
    return int(r + sl[0].start), int(c + sl[1].start)


def _largest_component(error: np.ndarray) -> tuple[np.ndarray | None, int]:
    """Largest 8-connected component of a bool map and its size (None, 0 when empty)."""
    if not error.any():
        return None, 0
    labels, n = ndimage.label(error, structure=np.ones((3, 3), dtype=bool))
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    k = int(sizes.argmax())
    return labels == k, int(sizes[k])


def next_click(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    rng: np.random.Generator | None = None,
) -> Click | None:
    """Click that corrects the largest error of ``pred`` against ``gt``.

    Error regions are FN = gt & ~pred and FP = pred & ~gt. The largest 8-connected component of
    either (FN wins a tie) is clicked at its pixel farthest from its boundary (distance transform,
    as RITM and SAM's simulation do): label 1 in a FN region, 0 in a FP region.

    With no error the click is positive, at the point of ``gt`` farthest from its boundary, so an
    iterative loop always has a click to add; it is ``None`` only when gt and pred are both empty.

    Args:
        pred: (H, W) bool predicted mask (or logits; > 0 is foreground).
        gt: (H, W) bool ground truth in the same frame.
        rng: breaks ties among equally deep pixels at random; ``None`` takes the first.

    Returns:
        ``(x, y, label)`` ints in the masks' frame, or ``None``.
    """
    p = _as_bool(pred)
    g = _as_bool(gt)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"pred and gt must be (H, W) of one size, got {p.shape} and {g.shape}")
    fn, n_fn = _largest_component(g & ~p)
    fp, n_fp = _largest_component(p & ~g)
    if n_fn == 0 and n_fp == 0:
        if not g.any():
            return None
        region, label = g, 1
    elif n_fn >= n_fp:
        region, label = fn, 1
    else:
        region, label = fp, 0
    r, c = _interior_point(region, rng)
    return c, r, label


def next_clicks(
    pred: np.ndarray | torch.Tensor,
    gt: np.ndarray | torch.Tensor,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """:func:`next_click` for a batch: (N, H, W) pred and gt -> (N, 3) int64 ``[x, y, label]``.

    Rows where no click exists (both masks empty) are ``[-1, -1, -1]``. Each object costs one
    labelling and one distance transform on the error's bounding box: about a millisecond at
    256 x 256, so it is cheap enough to run on low-resolution masks every training step.
    """
    p = _as_bool(pred)
    g = _as_bool(gt)
    out = np.full((len(p), 3), -1, dtype=np.int64)
    for i in range(len(p)):
        click = next_click(p[i], g[i], rng)
        if click is not None:
            out[i] = click
    return out


def _as_bool(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return (x > 0).numpy() if x.dtype != torch.bool else x.numpy()
    x = np.asarray(x)
    return x if x.dtype == bool else x > 0


def low_res_to_original(
    xy: np.ndarray,
    low_res_size: int,
    image_size: int,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
) -> np.ndarray:
    """Map (P, 2) (x, y) pixels of SAM's low-resolution logits to original-image pixels.

    A low-res pixel covers ``stride = image_size / low_res_size`` model-input pixels, whose centre
    is input pixel ``(x + 0.5) * stride - 0.5``. That is divided by the scale
    ``SamTransform.apply_coords`` multiplies by (``input_size`` is the unpadded (h, w) from
    ``SamTransform.input_size``), so the two maps are inverse, then clipped to the image.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    stride = image_size / low_res_size
    in_xy = (xy + 0.5) * stride - 0.5
    h, w = original_size
    in_h, in_w = input_size
    orig = in_xy * np.array([w / in_w, h / in_h])
    return np.clip(orig, 0.0, [w - 1.0, h - 1.0])


def add_click(
    prompt: Prompt,
    click: Click | np.ndarray | None,
    mask_logits: np.ndarray | torch.Tensor | None,
) -> Prompt:
    """New prompt = ``prompt`` + one click + the previous low-resolution logits.

    Args:
        prompt: current prompt (box and/or points), original-image (x, y) pixels.
        click: ``(x, y, label)`` in ORIGINAL-image pixels (see :func:`low_res_to_original`), or
            ``None`` / a row of -1 to add no point (only the mask is fed back).
        mask_logits: (S/4, S/4) low-resolution logits of the previous prediction (for multimask
            output, those of the mask kept); stored as float32 numpy, or ``None`` to drop it.

    Returns:
        A new Prompt; the input is not modified.
    """
    points, labels = prompt.points, prompt.point_labels
    if click is not None and int(click[2]) >= 0:
        new_pt = np.array([[float(click[0]), float(click[1])]])
        new_lb = np.array([int(click[2])], dtype=np.int64)
        points = new_pt if points is None else np.concatenate([points, new_pt])
        labels = new_lb if labels is None else np.concatenate([labels, new_lb])
    if isinstance(mask_logits, torch.Tensor):
        mask_logits = mask_logits.detach().float().cpu().numpy()
    if mask_logits is not None:
        mask_logits = np.asarray(mask_logits, dtype=np.float32)
        if mask_logits.ndim == 3 and mask_logits.shape[0] == 1:
            mask_logits = mask_logits[0]
        if mask_logits.ndim != 2:
            raise ValueError(f"mask_logits must be (S/4, S/4), got shape {mask_logits.shape}")
    return Prompt(
        box=None if prompt.box is None else prompt.box.copy(),
        points=None if points is None else points.copy(),
        point_labels=None if labels is None else labels.copy(),
        mask_logits=mask_logits,
    )
