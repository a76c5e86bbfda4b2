"""One case in ``eval.mode=propagate``: every object prompted on its key slice(s), its masks
propagated through the whole volume (:mod:`sam_ft.evaluation.protocol.propagation`), scored like
``eval.mode=slices`` scores its masks.

The engine treats the result as any case
(:class:`~sam_ft.evaluation.protocol.run_case.PendingCase`):

- ``per_object.csv``: on each kept slice of each object, the propagated mask scored as the
  slices mode scores a prompted one (2D Dice, HD95, NSD, attributes), so the two modes pair
  object for object (``mask_index`` -1: the propagation never reached the slice);
- ``per_case.csv``: 3D Dice / NSD / HD95 of the propagated volume against the object's whole
  label volume (empty slices counted), by the same scoring job as the slices mode;
- ``propagation.csv`` (``tables.PROPAGATION_COLUMNS``): one row per slice where the object or its
  prediction is: the key slice it was propagated from, the signed distance to it, whether the
  slice is inside the object's z extent, the pixel counts and the 2D Dice. Over-propagation
  (predicted slices outside the extent) and missed slices (the object there, nothing predicted)
  are counted from it (:mod:`sam_ft.evaluation.reports.propagation`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from sam_ft import bitmask
from sam_ft.data.loading import CaseData
from sam_ft.data.types import SliceRecord
from sam_ft.errors import DataError
from sam_ft.evaluation.metrics.overlap import overlap_scores
from sam_ft.evaluation.protocol.options import EvalOptions
from sam_ft.evaluation.protocol.predictions import CasePredictions
from sam_ft.evaluation.protocol.propagation import (
    Chain,
    Propagated,
    SliceMask,
    chain_ranges,
    key_slices,
    propagate_boxes,
)
from sam_ft.evaluation.protocol.propagation_memory import propagate_memory
from sam_ft.evaluation.protocol.run_case import PendingCase, _case_job, case_geometry, distance_unit
from sam_ft.evaluation.protocol.scoring_pool import (
    ModelSlice,
    ScoringPool,
    SliceJob,
    score_case,
    score_slice,
)
from sam_ft.model.backend import SegmentBackend
from sam_ft.prompts.jitter import jitter_name
from sam_ft.prompts.strategies import make_eval_prompt

PROPAGATORS: dict[str, Callable[..., Propagated]] = {
    "box": propagate_boxes,
    "memory": propagate_memory,
}
"""``eval.propagate.prompt`` -> its propagator: (the model, slice images, ground truth, chains,
keywords) -> :data:`~sam_ft.evaluation.protocol.propagation.Propagated`."""


def _objects(records: list[SliceRecord]) -> tuple[list[int], dict[int, str], dict]:
    """The case's objects with at least one kept slice: labels ascending, names, and
    {label: {slice: (H, W) bool kept mask}} (the masks the key slices are prompted on)."""
    names: dict[int, str] = {}
    kept: dict[int, dict[int, np.ndarray]] = {}
    for rec in records:
        for lab, name, mask in zip(rec.labels, rec.names, rec.masks, strict=True):
            names.setdefault(int(lab), name)
            kept.setdefault(int(lab), {})[int(rec.slice_index)] = np.asarray(mask, dtype=bool)
    return sorted(kept), names, kept


def _gt_volume(case_data: CaseData, label: int, kept: dict[int, np.ndarray], opts) -> np.ndarray:
    """(S, H, W) bool ground truth the volume is scored against (``eval.volume_gt``)."""
    if opts.volume_gt == "full":
        return np.asarray(case_data.gt_volume(label), dtype=bool)
    vol = np.zeros(case_data.volume_shape, dtype=bool)
    for s, mask in kept.items():
        vol[s] = mask
    return vol


def _chains(
    labels: list[int],
    kept: dict,
    gts: list[np.ndarray],
    opts: EvalOptions,
    seed: int,
    case_key: str,
) -> list[Chain]:
    """Every object x prompt variant x key slice, prompted as ``eval.mode=slices`` prompts
    that slice (same seed, same prompt)."""
    p = opts.propagate
    num_slices = len(gts[0]) if gts else 0
    chains = []
    for i, label in enumerate(labels):
        # The extent is the scored ground truth's; keys are slices whose object was kept.
        areas = gts[i].reshape(num_slices, -1).sum(axis=1)
        promptable = np.isin(np.arange(num_slices), list(kept[label]))
        keys = key_slices(areas, p.key, p.keys, promptable)
        filled = np.flatnonzero(areas)
        extent = (int(min(filled[0], keys[0])), int(max(filled[-1], keys[-1])))
        ranges = chain_ranges(keys, num_slices, extent, p.stop)
        for j, (strategy, jitter) in enumerate(opts.variants):
            for key, (low, high) in zip(keys, ranges, strict=True):
                prompt = make_eval_prompt(
                    kept[label][key], strategy, jitter, seed=seed, case=case_key,
                    slice_index=key, label=label, sampling=opts.point_sampling,
                )  # fmt: skip
                chains.append(Chain(i, j, key, prompt, low, high))
    return chains


def _merged(chains: list[Chain], out: dict[int, dict[int, SliceMask]], i: int, j: int):
    """{slice: (SliceMask, key slice)} of object ``i`` under variant ``j`` (its chains cover
    disjoint slices)."""
    merged = {}
    for c_id, c in enumerate(chains):
        if c.obj == i and c.variant == j:
            merged.update({s: (m, c.key) for s, m in out[c_id].items()})
    return merged


def _propagation_rows(
    case_key: str, label: int, name: str, prompt: str, jit: str, gt: np.ndarray,
    merged: dict, keys: list[int],
) -> list[dict]:  # fmt: skip
    """The ``propagation.csv`` rows of one object and variant (module docstring)."""
    gt_px = gt.reshape(len(gt), -1).sum(axis=1)
    filled = np.flatnonzero(gt_px)
    z0, z1 = int(filled[0]), int(filled[-1])
    rows = []
    for s in sorted(set(filled.tolist()) | {s for s, (m, _) in merged.items() if m.mask.any()}):
        mask = merged[s][0].mask if s in merged else None
        pred_px = int(mask.sum()) if mask is not None else 0
        inter = int((mask & gt[s]).sum()) if mask is not None else 0
        key = merged[s][1] if s in merged else min(keys, key=lambda k: (abs(k - s), k))
        rows.append(
            {
                "case": case_key, "slice": int(s), "label": label, "name": name,
                "prompt": prompt, "jitter": jit, "key_slice": int(key),
                "distance": int(s - key), "is_key": bool(s == key),
                "in_extent": bool(z0 <= s <= z1), "gt_px": int(gt_px[s]), "pred_px": pred_px,
                "dice": 2.0 * inter / (int(gt_px[s]) + pred_px),
            }
        )  # fmt: skip
    return rows


def _slice_job(
    rec: SliceRecord,
    labels: list[int],
    names: list[tuple[str, str]],
    results: Mapping[str, dict[tuple[int, int], dict]],
    opts: EvalOptions,
    case_key: str,
) -> SliceJob:
    """The per-object scoring job of one kept slice: each object's propagated mask per variant
    (empty where the propagation did not reach it)."""
    gt = np.asarray(rec.masks, dtype=bool)
    k, v, size = len(gt), len(names), rec.original_size
    objs = [labels.index(int(lab)) for lab in rec.labels]
    decoded = {}
    for model, merged in results.items():
        preds = np.zeros((k, v, *size), dtype=bool)
        index = np.full((k, v), -1, dtype=np.int64)
        pred_iou = np.full((k, v), np.nan)
        for a, obj in enumerate(objs):
            for j in range(v):
                hit = merged[(obj, j)].get(int(rec.slice_index))
                if hit is not None:
                    preds[a, j], index[a, j], pred_iou[a, j] = hit[0].mask, 0, hit[0].pred_iou
        d, u = overlap_scores(torch.from_numpy(preds), torch.from_numpy(gt[:, None]))
        packed = bitmask.pack(preds)
        nan = np.full((k, v), np.nan)
        decoded[model] = ModelSlice(packed, index, pred_iou, d.numpy(), u.numpy(), [], nan, nan)
    return SliceJob(
        case=case_key, slice_index=int(rec.slice_index), labels=[int(x) for x in rec.labels],
        names=list(rec.names), columns=names, gt=gt,
        grey=rec.raw if rec.raw is not None else rec.image[..., 0], spacing=rec.spacing,
        modality=rec.modality, distance_unit=distance_unit(rec), models=decoded,
        nsd_tolerance_mm=opts.nsd_tolerance_mm, nsd_method=opts.nsd_method, overlay_col=-1,
    )  # fmt: skip


def start_volume_case(
    models: Mapping[str, SegmentBackend],
    records: list[SliceRecord],
    case_data: CaseData | None,
    opts: EvalOptions,
    seed: int,
    case_key: str,
    pool: ScoringPool,
    path: str,
    progress: Callable[[int, int], None] | None = None,
) -> PendingCase:
    """All models on one volume in ``eval.mode=propagate``; the scoring jobs go to ``pool``.
    ``progress(done, total)`` is called after each slice a model's propagation passes."""
    if not records:
        raise DataError(case_key, "case has no slice with an object")
    images = None if case_data is None else case_data.extra.get("images")
    if case_data is None or not case_data.is_3d or images is None:
        raise DataError(
            path or case_key,
            "eval.mode=propagate needs a 3D volume loaded with every slice's image "
            "(load_case(..., keep_images=True)); a 2D image has nothing to propagate to",
        )
    labels, names_of, kept = _objects(records)
    gts = [_gt_volume(case_data, label, kept[label], opts) for label in labels]
    chains = _chains(labels, kept, gts, opts, seed, case_key)
    variants = [(s, jitter_name(j)) for s, j in opts.variants]
    shape = case_data.volume_shape[1:]
    stores = {name: CasePredictions(shape) for name in models}
    results: dict[str, dict[tuple[int, int], dict]] = {}
    propagation: dict[str, list[dict]] = {}
    for name, model in models.items():
        out = PROPAGATORS[opts.propagate.prompt](
            model, images.__getitem__, lambda s: np.stack([g[s] for g in gts]), chains,
            stop=opts.propagate.stop, margin_px=opts.propagate.margin_px,
            selection=opts.mask_selection, max_per_call=opts.max_prompts_per_call,
            num_slices=len(images), progress=progress,
        )  # fmt: skip
        merged = {
            (i, j): _merged(chains, out, i, j)
            for i in range(len(labels))
            for j in range(len(variants))
        }
        results[name], propagation[name] = merged, []
        for (i, j), slices in merged.items():
            key = (labels[i], *variants[j])
            for s, (m, _) in sorted(slices.items()):
                if m.mask.any():
                    stores[name].add(key, s, m.mask)
            keys = sorted({c.key for c in chains if c.obj == i and c.variant == j})
            propagation[name] += _propagation_rows(
                case_key, labels[i], names_of[labels[i]], *variants[j], gts[i], slices, keys
            )
    jobs = [
        pool.submit(score_slice, _slice_job(rec, labels, variants, results, opts, case_key))
        for rec in records
    ]
    case_job = pool.submit(score_case, _case_job(records, case_data, stores, opts, case_key))
    return PendingCase(
        case_key, list(models), records, case_data, path, stores,
        {name: [] for name in models}, jobs, case_job, case_geometry(records, case_data),
        propagation,
    )  # fmt: skip
