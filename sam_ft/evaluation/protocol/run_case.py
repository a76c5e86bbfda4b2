"""One case on the models: slices decoded here, their scoring (2D, 3D, attributes) in the pool.

For every slice the image encoder runs once per model; every prompt of the slice (objects x
strategies x jitter levels) then goes through ``model.decode`` in chunks of
``eval.max_prompts_per_call``, and Everything mode (S1) reuses the same embedding. The CPU work
around the model (prompts of the next slices, 2D and 3D metrics, attributes, rows) is submitted
to a :class:`~sam_ft.evaluation.protocol.scoring_pool.ScoringPool`; a :class:`PendingCase` holds its
futures. Coordinates: prompts (x, y) = (column, row); masks (row, col); volumes (slice, row, col).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
import torch

from sam_ft import bitmask
from sam_ft.data.loading import CaseData
from sam_ft.data.types import SliceRecord
from sam_ft.errors import DataError
from sam_ft.evaluation.metrics.overlap import overlap_scores
from sam_ft.evaluation.protocol.decode_select import decode_scored
from sam_ft.evaluation.protocol.everything import everything_predictions
from sam_ft.evaluation.protocol.options import EvalOptions
from sam_ft.evaluation.protocol.predictions import CasePredictions
from sam_ft.evaluation.protocol.scoring_pool import (
    CaseJob,
    ModelSlice,
    PromptJob,
    ScoringPool,
    SliceJob,
    make_prompts,
    score_case,
    score_slice,
)
from sam_ft.evaluation.protocol.timing import encoder_clock
from sam_ft.model.backend import SegmentBackend, embedding_at
from sam_ft.prompts.clicks import add_click, next_click
from sam_ft.prompts.jitter import jitter_name
from sam_ft.prompts.strategies import make_eval_prompt
from sam_ft.prompts.types import Prompt

PROMPTS_AHEAD = 2
"""Slices of a case whose prompts are made ahead, in the pool, while one is decoded."""
OVERLAY_PROMPT = ("box", "none")
"""(prompt, jitter) of the rows shown in the best/worst overlays and the progress bar's Dice."""


def _device(model: SegmentBackend) -> torch.device:
    return next(model.parameters()).device


def _decode_slice(
    model: SegmentBackend,
    rec: SliceRecord,
    embedding: torch.Tensor,
    opts: EvalOptions,
    prompts: list[Prompt],
    *,
    store: CasePredictions,
) -> tuple[list[tuple[str, str]], ModelSlice]:
    """The model's part of one slice: every object under every prompt variant (``prompts``, K x
    V object-major, from :func:`~sam_ft.evaluation.protocol.scoring_pool.make_prompts`), decoded.

    Stores each prediction in ``store`` under (label, prompt, jitter name) for 3D stacking.
    Returns the (prompt, jitter name) of each prediction column and the predictions, bit-packed,
    with their Dice and IoU (computed on the model's device, with the selection) for
    :func:`~sam_ft.evaluation.protocol.scoring_pool.score_slice` (the other metrics, in the pool).
    """
    gt = np.asarray(rec.masks, dtype=bool)
    k, size = len(gt), rec.original_size
    labels = [int(v) for v in rec.labels]
    variants = opts.variants
    v = len(variants)
    names = [(s, jitter_name(j)) for s, j in variants]
    # (K, V, ceil(H * W / 8)): the masks come back from the device bit-packed.
    packed = np.zeros((k, v, -(-size[0] * size[1] // 8)), dtype=np.uint8)
    mask_index = np.full((k, v), -1, dtype=np.int64)
    pred_iou = np.full((k, v), np.nan)
    dice, iou = np.full((k, v), np.nan), np.full((k, v), np.nan)
    oracle, top_iou = np.full((k, v), np.nan), np.full((k, v), np.nan)
    if prompts:
        sel = decode_scored(
            model,
            embedding,
            prompts,
            gt,  # to the device once per object; prompt i * V + j is object i's
            opts.mask_selection,
            opts.max_prompts_per_call,
            gt_of=np.repeat(np.arange(k), v),
            packed=True,
            keep_low=False,
        )
        packed[:] = sel.masks.reshape(k, v, -1)
        mask_index[:] = sel.index.reshape(k, v)
        pred_iou[:] = sel.pred_iou.reshape(k, v)
        dice[:], iou[:] = sel.dice.reshape(k, v), sel.iou.reshape(k, v)
        oracle[:], top_iou[:] = sel.dice_oracle.reshape(k, v), sel.dice_top_iou.reshape(k, v)
    if "everything" in opts.prompts:
        matched, match_index, _ = everything_predictions(model, embedding, gt, opts.generator)
        # Everything mode's masks are on the host already (run-length codes): scored here.
        d, u = overlap_scores(torch.from_numpy(matched), torch.from_numpy(gt))
        packed = np.concatenate([bitmask.pack(matched[:, None]), packed], axis=1)
        mask_index = np.concatenate([match_index[:, None], mask_index], axis=1)
        pred_iou = np.concatenate([np.full((k, 1), np.nan), pred_iou], axis=1)
        dice = np.concatenate([d.numpy()[:, None], dice], axis=1)
        iou = np.concatenate([u.numpy()[:, None], iou], axis=1)
        oracle = np.concatenate([np.full((k, 1), np.nan), oracle], axis=1)
        top_iou = np.concatenate([np.full((k, 1), np.nan), top_iou], axis=1)
        names = [("everything", "none"), *names]
    # The overlay prompt's index within an object's prompts.
    overlay_prompt = variants.index(("box", None)) if ("box", None) in variants else -1
    boxes = [prompts[i * v + overlay_prompt].box if overlay_prompt >= 0 else None for i in range(k)]
    for i in range(k):
        for j, (prompt, jit) in enumerate(names):
            store.add_packed((labels[i], prompt, jit), rec.slice_index, packed[i, j])
    return names, ModelSlice(packed, mask_index, pred_iou, dice, iou, boxes, oracle, top_iou)


def _click_curve(
    model: SegmentBackend,
    rec: SliceRecord,
    embedding: torch.Tensor,
    opts: EvalOptions,
    seed: int,
    case_key: str,
) -> list[dict]:
    """Dice after clicks 1..N for every object of one slice (SAM-style interactive loop).

    Click 1 is point1's prompt (the centroid-rule point), with ``eval.mask_selection``. Each next
    click comes from :func:`next_click` on the current prediction vs the ground truth at the
    original resolution; the new prompt holds all clicks so far plus the previous low-res logits
    of the kept mask, decoded with one output mask as SAM does once a mask prompt is given.
    """
    gt = np.asarray(rec.masks, dtype=bool)
    labels = [int(v) for v in rec.labels]
    prompts = [
        make_eval_prompt(
            gt[i],
            "point1",
            None,
            seed=seed,
            case=case_key,
            slice_index=rec.slice_index,
            label=lab,
            sampling=opts.point_sampling,
        )
        for i, lab in enumerate(labels)
    ]
    # Each round's Dice comes from the device with the masks (decode_scored).
    sel = decode_scored(
        model, embedding, prompts, gt, opts.mask_selection, opts.max_prompts_per_call
    )
    rows = []
    for click in range(1, opts.clicks + 1):
        if click > 1:
            assert sel.low is not None
            prompts = [
                add_click(p, next_click(sel.masks[i], gt[i]), sel.low[i])
                for i, p in enumerate(prompts)
            ]
            sel = decode_scored(model, embedding, prompts, gt, "single", opts.max_prompts_per_call)
        for i, d in enumerate(sel.dice):
            rows.append(
                {
                    "case": case_key,
                    "slice": int(rec.slice_index),
                    "label": labels[i],
                    "click": click,
                    "dice": float(d),
                }
            )
    return rows


# --------------------------------------------------------------------------------------------
# One case


def distance_unit(rec: SliceRecord) -> str:
    """Unit of a slice's HD95 and NSD tolerance: ``px`` for a 2D image file without a physical
    spacing (PNG, JPEG, TIFF: slice index -1 and spacing (1, 1)), else ``mm``."""
    return "px" if rec.slice_index < 0 and tuple(rec.spacing) == (1.0, 1.0) else "mm"


def case_geometry(
    records: list[SliceRecord], case_data: CaseData | None
) -> tuple[bool, int, tuple]:
    """(is 3D, number of slices, (slice, row, col) spacing in mm) of a case."""
    if case_data is not None:
        is_3d = bool(case_data.is_3d)
        return is_3d, int(case_data.volume_shape[0]), tuple(map(float, case_data.spacing))
    first = records[0]
    is_3d = first.slice_index >= 0
    n = max(int(first.num_slices), max(r.slice_index for r in records) + 1) if is_3d else 1
    return is_3d, n, (float(first.slice_spacing), *map(float, first.spacing))


def _case_job(
    records: list[SliceRecord],
    case_data: CaseData | None,
    stores: Mapping[str, CasePredictions],
    opts: EvalOptions,
    case_key: str,
) -> CaseJob:
    """The per-case (3D) scoring job: each object's ground truth and the models' predictions."""
    is_3d, num_slices, spacing = case_geometry(records, case_data)
    shape = records[0].original_size
    names: dict[int, str] = {}
    kept: dict[int, dict[int, np.ndarray]] = {}
    for rec in records:
        for lab, name, mask in zip(rec.labels, rec.names, rec.masks, strict=True):
            names.setdefault(int(lab), name)
            kept.setdefault(int(lab), {})[int(rec.slice_index)] = np.asarray(mask, dtype=bool)
    gt: dict[int, np.ndarray] = {}
    slice_of: dict[int, int] = {}
    for label in sorted(kept):
        if is_3d:
            if opts.volume_gt == "full" and case_data is not None:
                gt_vol = np.asarray(case_data.gt_volume(label), dtype=bool)
            else:
                gt_vol = np.zeros((num_slices, *shape), dtype=bool)
                for s, mask in kept[label].items():
                    gt_vol[s] = mask
            gt[label] = bitmask.pack(gt_vol)
            gt_shape: tuple[int, ...] = gt_vol.shape
        else:
            slice_of[label] = next(iter(kept[label]))
            gt[label] = kept[label][slice_of[label]]
    return CaseJob(
        case=case_key,
        is_3d=is_3d,
        spacing=spacing,
        labels=sorted(kept),
        names=names,
        num_slices={label: len(kept[label]) for label in kept},
        gt=gt,
        gt_shape=gt_shape if is_3d and kept else (num_slices, *shape),
        slice_of=slice_of,
        distance_unit="mm" if is_3d else distance_unit(records[0]),
        stores=dict(stores),
        nsd_tolerance_mm=opts.nsd_tolerance_mm,
        nsd_method=opts.nsd_method,
    )


def _per_case_rows(
    records: list[SliceRecord],
    case_data: CaseData | None,
    store: CasePredictions,
    opts: EvalOptions,
    case_key: str,
) -> list[dict]:
    """3D (or, for a 2D image, 2D) scores of each (object, prompt, jitter) over the case, in
    this process (:func:`~sam_ft.evaluation.protocol.scoring_pool.score_case` of the case's job)."""
    return score_case(_case_job(records, case_data, {"m": store}, opts, case_key))["m"]


@dataclass
class CaseOutput:
    per_object: list[dict]
    per_case: list[dict]
    clicks: list[dict]
    overlay: list[dict]
    store: CasePredictions
    geometry: tuple[bool, int, tuple] = (False, 1, (1.0, 1.0, 1.0))
    propagation: list[dict] = field(default_factory=list)


@dataclass
class PendingCase:
    """A case whose device work is done and whose scoring jobs are in the pool."""

    key: str
    models: list[str]
    records: list[SliceRecord]
    case_data: CaseData | None
    path: str
    stores: dict[str, CasePredictions]
    clicks: dict[str, list[dict]]
    slice_jobs: list[Future]
    case_job: Future
    geometry: tuple[bool, int, tuple]
    propagation: dict[str, list[dict]] = field(default_factory=dict)

    def done(self) -> bool:
        return self.case_job.done() and all(f.done() for f in self.slice_jobs)

    def nbytes(self) -> int:
        """The memory this case holds until it is committed: its slices' arrays, its label
        volume and its packed predictions (the jobs' copies live in the workers)."""
        arrays = [a for r in self.records for a in (r.image, r.masks, r.labels, r.raw)]
        if self.case_data is not None:
            arrays.append(self.case_data.label_volume)
        held = sum(int(getattr(a, "nbytes", 0)) for a in arrays if a is not None)
        return held + sum(store.nbytes() for store in self.stores.values())

    def done_ok(self) -> bool:
        """All jobs finished without an exception."""
        jobs = [*self.slice_jobs, self.case_job]
        return all(f.done() and f.exception() is None for f in jobs)

    def outputs(self) -> dict[str, CaseOutput]:
        """Wait for the jobs; their rows in slice order (raises what a job raised)."""
        outputs = {
            name: CaseOutput(
                [],
                [],
                self.clicks[name],
                [],
                self.stores[name],
                self.geometry,
                self.propagation.get(name, []),
            )  # fmt: skip
            for name in self.models
        }
        images = {int(r.slice_index): r.image for r in self.records}
        for fut in self.slice_jobs:
            for name, (rows, overlay) in fut.result().items():
                outputs[name].per_object += rows
                outputs[name].overlay += [{**o, "image": images[o["slice"]]} for o in overlay]
        for name, rows in self.case_job.result().items():
            outputs[name].per_case = rows
        return outputs


def start_case(
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
    """All models on one case: the encoder (once per slice per model), the decoder and the click
    curves here; the scoring jobs go to ``pool``. ``progress(done, total)`` is called after each
    slice is decoded."""
    if not records:
        raise DataError(case_key, "case has no slice with an object")
    if len({r.image_id for r in records}) > 1:
        raise ValueError(f"case {case_key}: slices come from several images; pass one per case")
    shape = records[0].original_size
    stores = {name: CasePredictions(shape) for name in models}
    clicks: dict[str, list[dict]] = {name: [] for name in models}
    jobs = []

    def ask(rec: SliceRecord) -> Future:
        job = PromptJob(
            case=case_key,
            slice_index=int(rec.slice_index),
            labels=[int(v) for v in rec.labels],
            gt=np.asarray(rec.masks, dtype=bool),
            variants=opts.variants,
            seed=seed,
            sampling=opts.point_sampling,
        )
        return pool.submit(make_prompts, job)

    # The prompts of the next slices are made in the pool while this process decodes.
    ahead = deque(ask(rec) for rec in records[:PROMPTS_AHEAD])
    for n, rec in enumerate(records):
        if np.asarray(rec.masks).shape[1:] != rec.original_size or rec.original_size != shape:
            raise DataError(case_key, f"slice {rec.slice_index}: mask/image sizes differ")
        if n + PROMPTS_AHEAD < len(records):
            ahead.append(ask(records[n + PROMPTS_AHEAD]))
        prompts = ahead.popleft().result()
        decoded: dict[str, ModelSlice] = {}
        columns: list[tuple[str, str]] = []
        for name, model in models.items():
            x = model.preprocess(rec.image)[None].to(_device(model))
            with encoder_clock(model, x.device):
                embedding = embedding_at(model.encode(x), 0)
            columns, decoded[name] = _decode_slice(
                model, rec, embedding, opts, prompts, store=stores[name]
            )
            if opts.clicks:
                clicks[name] += _click_curve(model, rec, embedding, opts, seed, case_key)
        job = SliceJob(
            case=case_key,
            slice_index=int(rec.slice_index),
            labels=[int(v) for v in rec.labels],
            names=list(rec.names),
            columns=columns,
            gt=np.asarray(rec.masks, dtype=bool),
            grey=rec.raw if rec.raw is not None else rec.image[..., 0],
            spacing=rec.spacing,
            modality=rec.modality,
            distance_unit=distance_unit(rec),
            models=decoded,
            nsd_tolerance_mm=opts.nsd_tolerance_mm,
            nsd_method=opts.nsd_method,
            overlay_col=columns.index(OVERLAY_PROMPT)
            if OVERLAY_PROMPT in columns and opts.overlays > 0
            else -1,
        )
        jobs.append(pool.submit(score_slice, job))
        if progress is not None:
            progress(n + 1, len(records))
    case_job = pool.submit(score_case, _case_job(records, case_data, stores, opts, case_key))
    geometry = case_geometry(records, case_data)
    return PendingCase(
        case_key, list(models), records, case_data, path, stores, clicks, jobs, case_job, geometry
    )
