"""The evaluation engine: the study's prompt strategies, jitter, metrics and click curve per case.

For every slice the image encoder runs once; every prompt of the slice (objects x strategies x
jitter levels) then goes through ``model.decode`` in chunks of ``eval.max_prompts_per_call``, and
Everything mode (S1) reuses the same embedding. Prompts are pure functions of (seed, case,
slice, object label, strategy, jitter), so every model sees identical prompts. The CPU work
around the model (prompts of the next slices, 2D and 3D metrics, attributes, rows) runs in a
pool of ``eval.workers`` processes (:mod:`sam_ft.evaluation.pipeline`), the next case loads in a
thread, and cases are committed in input order, so the files are the same for any worker count.

Outputs in ``out_dir`` (one row per object and prompt variant; see ``PER_OBJECT_COLUMNS`` etc.):

- ``per_object.csv``: 2D scores per (model, task, case, slice, label, prompt, jitter) with the
  object's attributes;
- ``per_case.csv``: 3D scores per (model, task, case, label, prompt, jitter): the object's
  predictions stacked back into the case's volume (empty where the object had no kept slice),
  against the object's whole ground-truth volume (``eval.volume_gt=full``, the default: slices
  where it had <= ``data.min_object_pixels`` px count too) or only its kept slices (``kept``;
  also what a case given as a bare list of ``SliceRecord`` has);
- ``clicks.csv``: Dice after clicks 1..N (``eval.clicks > 0``);
- ``skipped.csv``: cases skipped for bad data (``case, path, reason, stage, model, task``): with
  ``eval.on_error=skip`` only a ``DataError`` (unreadable or inconsistent files) skips a case;
  any other exception stops the run;
- ``progress.jsonl``: one line per finished or failed (model, task, case): the resume marker.

Rows are appended and flushed after each case, then its marker line is written; a new run in the
same ``out_dir`` drops rows of unmarked cases (killed mid-write) and skips marked ones. At the end
the CSVs are rewritten sorted by (model, task, case, slice, label, prompt, jitter), so a resumed
run ends with the same files as an uninterrupted one.

``case`` in the tables is the image id (``SliceRecord.image_id``; the case id unless several
images share a patient), the unit that is stacked in 3D; ``patient`` is the split's case id.
Coordinates: prompts (x, y) = (column, row); masks (row, col); volumes (slice, row, col).
"""

from __future__ import annotations

import json
import logging
import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from sam_ft.atomic import atomic_write, atomic_write_text
from sam_ft.data.types import SliceRecord
from sam_ft.errors import ConfigError, DataError
from sam_ft.evaluation.everything import EverythingConfig, everything_predictions
from sam_ft.evaluation.metrics import NSD_METHODS
from sam_ft.evaluation.pipeline import (
    ATTRIBUTE_COLUMNS,
    CaseJob,
    ModelSlice,
    PromptJob,
    ScoringPool,
    SliceJob,
    WorkerDiedError,
    make_prompts,
    pack_masks,
    resolve_workers,
    score_case,
    score_slice,
)
from sam_ft.evaluation.predictions import CasePredictions, write_case_predictions
from sam_ft.evaluation.report import jitter_rank
from sam_ft.evaluation.selection import decode_scored, overlap_scores
from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.clicks import add_click, next_click
from sam_ft.prompts.jitter import JitterRange, jitter_levels, jitter_name
from sam_ft.prompts.strategies import (
    MASK_SELECTIONS,
    POINT_SAMPLINGS,
    STRATEGIES,
    make_eval_prompt,
)
from sam_ft.prompts.types import Prompt

log = logging.getLogger(__name__)

BASELINE_MODEL = "zero_shot"
PROMPTS_AHEAD = 2
"""Slices of a case whose prompts are made ahead, in the pool, while one is decoded."""
OVERLAY_PROMPT = ("box", "none")
"""(prompt, jitter) of the rows shown in the best/worst overlays and the progress bar's Dice."""

PER_OBJECT_COLUMNS = [
    "model", "task", "case", "slice", "label", "name", "prompt", "jitter",
    "dice", "iou", "hd95", "hd95_missing", "nsd", "empty_pred", "mask_index", "pred_iou",
    *ATTRIBUTE_COLUMNS, "modality", "patient", "distance_unit",
]  # fmt: skip
PER_CASE_COLUMNS = [
    "model", "task", "case", "label", "name", "prompt", "jitter",
    "dice", "iou", "hd95", "hd95_missing", "nsd", "empty_pred", "num_slices", "patient",
    "distance_unit",
]  # fmt: skip
CLICK_COLUMNS = ["model", "task", "case", "slice", "label", "click", "dice"]
SKIPPED_COLUMNS = ["case", "path", "reason", "stage", "model", "task"]
_STRING_COLUMNS = (
    "model", "task", "case", "name", "prompt", "jitter", "modality", "patient", "distance_unit",
)  # fmt: skip

PER_OBJECT_CSV = "per_object.csv"
PER_CASE_CSV = "per_case.csv"
CLICKS_CSV = "clicks.csv"
SKIPPED_CSV = "skipped.csv"
PROGRESS_FILE = "progress.jsonl"
STATE_DIR = ".eval_state"


# --------------------------------------------------------------------------------------------
# Configuration and inputs


@dataclass(frozen=True)
class EvalOptions:
    """The ``eval`` config, checked. ``variants`` are the (prompt, jitter) pairs decoded per
    object, in table order; ``everything`` is evaluated without jitter only."""

    prompts: tuple[str, ...]
    levels: tuple[JitterRange | None, ...]
    mask_selection: str
    point_sampling: str
    nsd_tolerance_mm: float
    nsd_method: str
    clicks: int
    save_predictions: bool
    max_prompts_per_call: int
    overlays: int
    volume_gt: str
    on_error: str
    everything: EverythingConfig
    workers: int = 0

    @property
    def variants(self) -> list[tuple[str, JitterRange | None]]:
        return [(p, j) for p in self.prompts if p != "everything" for j in self.levels]


def eval_options(cfg: Mapping[str, Any] | None) -> EvalOptions:
    """Merge ``cfg`` (the ``eval`` config; a DictConfig is accepted) over the defaults of
    ``conf/eval/default.yaml`` (:func:`~sam_ft.config.group_defaults`) and check.

    Raises:
        ConfigError: an unknown key or an invalid value, naming the option.
    """
    if cfg is not None and not isinstance(cfg, dict):
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        except ValueError:
            cfg = dict(cfg)
    from sam_ft.config import group_defaults

    defaults = group_defaults("eval")
    merged = {**defaults, **(cfg or {})}
    unknown = sorted(set(merged) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown eval option(s) {unknown}; known: {sorted(defaults)}")
    prompts = tuple(merged["prompts"] or ())
    bad = [p for p in prompts if p not in STRATEGIES]
    if bad or not prompts:
        raise ConfigError(f"eval.prompts must be a non-empty subset of {STRATEGIES}, got {bad}")
    if merged["mask_selection"] not in MASK_SELECTIONS:
        raise ConfigError(f"eval.mask_selection must be one of {MASK_SELECTIONS}")
    if merged["point_sampling"] not in POINT_SAMPLINGS:
        raise ConfigError(f"eval.point_sampling must be one of {POINT_SAMPLINGS}")
    if merged["nsd_method"] not in NSD_METHODS:
        raise ConfigError(f"eval.nsd_method must be one of {NSD_METHODS}")
    if merged["volume_gt"] not in ("kept", "full"):
        raise ConfigError("eval.volume_gt must be 'kept' or 'full'")
    if merged["on_error"] not in ("skip", "raise"):
        raise ConfigError("eval.on_error must be 'skip' or 'raise'")
    workers = merged["workers"]
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)):
        raise ConfigError(f"eval.workers must be an integer >= 0 or null, got {workers!r}")
    if workers is not None and workers < 0:
        raise ConfigError(f"eval.workers must be >= 0 or null (the cores left), got {workers}")
    if int(merged["max_prompts_per_call"]) < 1 or int(merged["clicks"]) < 0:
        raise ConfigError("eval.max_prompts_per_call must be >= 1 and eval.clicks >= 0")
    try:
        levels = tuple(jitter_levels(merged["jitter_px"]))
        everything = EverythingConfig.from_eval_cfg(merged)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"eval.jitter_px / eval.everything: {e}") from e
    return EvalOptions(
        prompts=tuple(p for p in STRATEGIES if p in prompts),
        levels=levels,
        mask_selection=str(merged["mask_selection"]),
        point_sampling=str(merged["point_sampling"]),
        nsd_tolerance_mm=float(merged["nsd_tolerance_mm"]),
        nsd_method=str(merged["nsd_method"]),
        clicks=int(merged["clicks"]),
        save_predictions=bool(merged["save_predictions"]),
        max_prompts_per_call=int(merged["max_prompts_per_call"]),
        overlays=int(merged["overlays"]),
        volume_gt=str(merged["volume_gt"]),
        on_error=str(merged["on_error"]),
        everything=everything,
        workers=resolve_workers(workers),
    )


@dataclass
class LazyCase:
    """A case loaded only when evaluated, so loading errors are caught and recorded per case
    and finished cases are skipped on resume without being read.

    Attributes:
        case: the image id the loaded case will have (``CaseFiles.image_id``).
        load: returns a ``CaseData`` or a list of ``SliceRecord``; may raise ``DataError``.
        path: the case's file, shown in ``skipped.csv`` when the error names none.
    """

    case: str
    load: Callable[[], Any]
    path: str = ""


def lazy_cases(
    files: Iterable[Any], task: Mapping[str, Any], data: Mapping[str, Any] | None = None
) -> list[LazyCase]:
    """``CaseFiles`` (from ``sam_ft.data.folder.find_cases``) -> :class:`LazyCase` via
    ``sam_ft.data.loading.load_case``."""
    from functools import partial

    from sam_ft.data.loading import load_case

    return [LazyCase(f.image_id, partial(load_case, f, task, data), f.image) for f in files]


@dataclass
class EvalResult:
    """Rows of the evaluated models (all cases, resumed ones included) and the overlay items
    (``{"best_<model>": [...], "worst_<model>": [...]}`` for ``report.write_report``)."""

    per_object: pd.DataFrame
    per_case: pd.DataFrame
    clicks: pd.DataFrame
    skipped: pd.DataFrame
    overlays: dict[str, list] = field(default_factory=dict)
    report: dict[str, Path] = field(default_factory=dict)


def _case_key(item: Any) -> str:
    if isinstance(item, LazyCase):
        return str(item.case)
    if hasattr(item, "slices"):
        return str(getattr(item, "image_id", "") or item.case)
    records = list(item)
    if not records:
        raise ValueError("a case given as a list of SliceRecord must hold at least one slice")
    return str(records[0].image_id)


def _materialize(item: Any) -> tuple[list[SliceRecord], Any]:
    """-> (slice records, the CaseData or None)."""
    if isinstance(item, LazyCase):
        item = item.load()
    if hasattr(item, "slices"):
        return list(item.slices), item
    return list(item), None


def _loaded_ahead(
    cases: Iterable[Any], finished: Callable[[str], bool]
) -> Iterator[tuple[Any, str, Future | None]]:
    """(item, case key, future of ``_materialize(item)``) per case, the next unfinished case
    loading in a thread while the caller evaluates this one (one case ahead: bounded memory).
    The future is None for a finished case (never loaded); its ``result()`` raises what loading
    raised, so a bad case fails where it is evaluated, as if loaded there."""
    with ThreadPoolExecutor(1, thread_name_prefix="eval-load") as loader:
        previous = None
        for item in cases:
            key = _case_key(item)
            loaded = None if finished(key) else loader.submit(_materialize, item)
            if previous is not None:
                yield previous
            previous = (item, key, loaded)
        if previous is not None:
            yield previous


# --------------------------------------------------------------------------------------------
# One slice


def _device(model: TrainableSam) -> torch.device:
    return next(model.parameters()).device


def _decode_slice(
    model: TrainableSam,
    rec: SliceRecord,
    embedding: torch.Tensor,
    opts: EvalOptions,
    prompts: list[Prompt],
    *,
    store: CasePredictions,
) -> tuple[list[tuple[str, str]], ModelSlice]:
    """The model's part of one slice: every object under every prompt variant (``prompts``, K x
    V object-major, from :func:`~sam_ft.evaluation.pipeline.make_prompts`), decoded.

    Stores each prediction in ``store`` under (label, prompt, jitter name) for 3D stacking.
    Returns the (prompt, jitter name) of each prediction column and the predictions, bit-packed,
    with their Dice and IoU (computed on the model's device, with the selection) for
    :func:`~sam_ft.evaluation.pipeline.score_slice` (the other metrics, in the pool).
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
    if "everything" in opts.prompts:
        matched, match_index, _ = everything_predictions(model, embedding, gt, opts.everything)
        # Everything mode's masks are on the host already (run-length codes): scored here.
        d, u = overlap_scores(torch.from_numpy(matched), torch.from_numpy(gt))
        packed = np.concatenate([pack_masks(matched[:, None]), packed], axis=1)
        mask_index = np.concatenate([match_index[:, None], mask_index], axis=1)
        pred_iou = np.concatenate([np.full((k, 1), np.nan), pred_iou], axis=1)
        dice = np.concatenate([d.numpy()[:, None], dice], axis=1)
        iou = np.concatenate([u.numpy()[:, None], iou], axis=1)
        names = [("everything", "none"), *names]
    # The overlay prompt's index within an object's prompts.
    overlay_prompt = variants.index(("box", None)) if ("box", None) in variants else -1
    boxes = [prompts[i * v + overlay_prompt].box if overlay_prompt >= 0 else None for i in range(k)]
    for i in range(k):
        for j, (prompt, jit) in enumerate(names):
            store.add_packed((labels[i], prompt, jit), rec.slice_index, packed[i, j])
    return names, ModelSlice(packed, mask_index, pred_iou, dice, iou, boxes)


def _click_curve(
    model: TrainableSam,
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


def _case_geometry(records: list[SliceRecord], case_data: Any) -> tuple[bool, int, tuple]:
    """(is 3D, number of slices, (slice, row, col) spacing in mm) of a case."""
    if case_data is not None and hasattr(case_data, "volume_shape"):
        is_3d = bool(case_data.is_3d)
        return is_3d, int(case_data.volume_shape[0]), tuple(map(float, case_data.spacing))
    first = records[0]
    is_3d = first.slice_index >= 0
    n = max(int(first.num_slices), max(r.slice_index for r in records) + 1) if is_3d else 1
    return is_3d, n, (float(first.slice_spacing), *map(float, first.spacing))


def _case_job(
    records: list[SliceRecord],
    case_data: Any,
    stores: Mapping[str, CasePredictions],
    opts: EvalOptions,
    case_key: str,
) -> CaseJob:
    """The per-case (3D) scoring job: each object's ground truth and the models' predictions."""
    is_3d, num_slices, spacing = _case_geometry(records, case_data)
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
            gt[label] = pack_masks(gt_vol)
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
    case_data: Any,
    store: CasePredictions,
    opts: EvalOptions,
    case_key: str,
) -> list[dict]:
    """3D (or, for a 2D image, 2D) scores of each (object, prompt, jitter) over the case, in
    this process (:func:`~sam_ft.evaluation.pipeline.score_case` of the case's job)."""
    return score_case(_case_job(records, case_data, {"m": store}, opts, case_key))["m"]


@dataclass
class _CaseOutput:
    per_object: list[dict]
    per_case: list[dict]
    clicks: list[dict]
    overlay: list[dict]
    store: CasePredictions
    geometry: tuple[bool, int, tuple] = (False, 1, (1.0, 1.0, 1.0))


@dataclass
class _PendingCase:
    """A case whose device work is done and whose scoring jobs are in the pool."""

    key: str
    models: list[str]
    records: list[SliceRecord]
    case_data: Any
    path: str
    stores: dict[str, CasePredictions]
    clicks: dict[str, list[dict]]
    slice_jobs: list[Future]
    case_job: Future
    geometry: tuple[bool, int, tuple]

    def done(self) -> bool:
        return self.case_job.done() and all(f.done() for f in self.slice_jobs)

    def done_ok(self) -> bool:
        """All jobs finished without an exception."""
        jobs = [*self.slice_jobs, self.case_job]
        return all(f.done() and f.exception() is None for f in jobs)

    def outputs(self) -> dict[str, _CaseOutput]:
        """Wait for the jobs; their rows in slice order (raises what a job raised)."""
        outputs = {
            name: _CaseOutput([], [], self.clicks[name], [], self.stores[name], self.geometry)
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


def _start_case(
    models: Mapping[str, TrainableSam],
    records: list[SliceRecord],
    case_data: Any,
    opts: EvalOptions,
    seed: int,
    case_key: str,
    pool: ScoringPool,
    path: str,
) -> _PendingCase:
    """All models on one case: the encoder (once per slice per model), the decoder and the click
    curves here; the scoring jobs go to ``pool``."""
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
            embedding = model.encode(x)[0]
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
    case_job = pool.submit(score_case, _case_job(records, case_data, stores, opts, case_key))
    geometry = _case_geometry(records, case_data)
    return _PendingCase(
        case_key, list(models), records, case_data, path, stores, clicks, jobs, case_job, geometry
    )


# --------------------------------------------------------------------------------------------
# Files: append, resume markers, canonical order


def _truncate_partial_line(path: Path) -> None:
    """Drop a last line without its newline (a write killed midway) so appends stay valid."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def _append_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    if not rows:
        return
    header = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        pd.DataFrame(rows, columns=columns).to_csv(f, header=header, index=False)
        f.flush()
        os.fsync(f.fileno())


def _read_csv(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=columns)
    present = pd.read_csv(path, nrows=0).columns
    return pd.read_csv(
        path,
        dtype={c: str for c in _STRING_COLUMNS if c in present},
        keep_default_na=False,
        na_values=[""],
        float_precision="round_trip",  # the default parser may change the last digit
    )


def _read_progress(path: Path) -> list[dict]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def _append_progress(path: Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _status(entries: list[dict]) -> dict[tuple[str, str, str], dict]:
    """Last marker per (model, task, case)."""
    return {(e["model"], e["task"], e["case"]): e for e in entries}


def _model_rank(models: pd.Series) -> pd.Series:
    order = [BASELINE_MODEL, *sorted(set(models.astype(str)) - {BASELINE_MODEL})]
    return models.astype(str).map({m: i for i, m in enumerate(order)})


def sort_table(df: pd.DataFrame) -> pd.DataFrame:
    """Canonical row order: model (zero-shot first), task, case, slice, label, prompt S1..S6,
    jitter (numerically, the report's ``jitter_rank``), click."""
    if df.empty:
        return df.reset_index(drop=True)
    keys = pd.DataFrame(index=df.index)
    if "model" in df:
        keys["model"] = _model_rank(df["model"])
    for c in ("task", "case", "slice", "label"):
        if c in df:
            keys[c] = df[c]
    if "prompt" in df:
        keys["prompt"] = df["prompt"].map({p: i for i, p in enumerate(STRATEGIES)})
    if "jitter" in df:
        keys["jitter"] = jitter_rank(df["jitter"])
    if "click" in df:
        keys["click"] = df["click"]
    order = keys.sort_values(list(keys.columns), kind="stable").index
    return df.loc[order].reset_index(drop=True)


def _rewrite_sorted(path: Path, columns: list[str]) -> pd.DataFrame:
    df = sort_table(_read_csv(path, columns))
    if path.exists():
        atomic_write_text(path, df.to_csv(index=False))
    return df


def _drop_unfinished(path: Path, columns: list[str], done: set[tuple[str, str, str]]) -> None:
    """Remove rows of (model, task, case) without a "done" marker (a run killed mid-case)."""
    _truncate_partial_line(path)
    df = _read_csv(path, columns)
    if df.empty:
        return
    cols = (df[c].astype(str) for c in ("model", "task", "case"))
    keys = list(zip(*cols, strict=True))
    keep = np.array([k in done for k in keys], dtype=bool)
    if not keep.all() or list(df.columns) != list(columns):
        # Also brings a table written by an older version to today's columns before appending.
        atomic_write_text(path, df[keep].reindex(columns=columns).to_csv(index=False))


def _write_skipped(path: Path, entries: list[dict]) -> pd.DataFrame:
    """``skipped.csv``: this engine's failed cases (``stage=evaluate``) after any rows another
    writer (e.g. the data loader's ``SkipLog``) left in the same file."""
    foreign = pd.DataFrame(columns=SKIPPED_COLUMNS)
    if path.exists() and path.stat().st_size > 0:
        old = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "stage" in old:
            old = old[old["stage"] != "evaluate"]
        foreign = old.reindex(columns=SKIPPED_COLUMNS, fill_value="")
    failed = [e for e in _status(entries).values() if e["status"] == "skipped"]
    mine = pd.DataFrame(
        [{**{c: e.get(c, "") for c in SKIPPED_COLUMNS}, "stage": "evaluate"} for e in failed],
        columns=SKIPPED_COLUMNS,
    )
    mine = sort_table(mine) if not mine.empty else mine
    out = pd.concat([foreign, mine], ignore_index=True)
    if not out.empty or path.exists():
        out.to_csv(path, index=False)
    return mine


# --------------------------------------------------------------------------------------------
# Best / worst overlays, persisted so that a resumed run shows the same ones


class _OverlayPool:
    """The ``k`` best and ``k`` worst objects seen so far (ties by case, slice, label)."""

    def __init__(self, path: Path, k: int) -> None:
        self.path, self.k = path, k
        self.items: dict[tuple, dict] = {}
        if k > 0 and path.exists():
            with np.load(path, allow_pickle=False) as z:
                for i, meta in enumerate(json.loads(str(z["meta"]))):
                    item = {**meta, "image": z[f"image{i}"], "gt": z[f"gt{i}"]}
                    item["pred"], item["box"] = z[f"pred{i}"], z[f"box{i}"]
                    self.items[self._key(item)] = item

    @staticmethod
    def _key(item: dict) -> tuple:
        return (item["case"], item["slice"], item["label"])

    def _ranked(self, best: bool) -> list[dict]:
        items = sorted(self.items.values(), key=self._key)
        return sorted(items, key=lambda it: -it["dice"] if best else it["dice"])[: self.k]

    def offer(self, candidates: list[dict]) -> None:
        if self.k <= 0 or not candidates:
            return
        for item in candidates:
            self.items[self._key(item)] = item
        keep = {self._key(it) for it in self._ranked(True) + self._ranked(False)}
        self.items = {key: it for key, it in self.items.items() if key in keep}
        self._save()

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        arrays, meta = {}, []
        for i, item in enumerate(self.items.values()):
            meta.append({c: item[c] for c in ("case", "slice", "label", "name", "dice")})
            arrays.update(
                {
                    f"image{i}": item["image"],
                    f"gt{i}": item["gt"],
                    f"pred{i}": item["pred"],
                    f"box{i}": np.asarray(item["box"], dtype=np.float64),
                }
            )
        atomic_write(
            self.path, lambda f: np.savez_compressed(f, meta=np.array(json.dumps(meta)), **arrays)
        )

    def grids(self) -> tuple[list, list]:
        """(best, worst) as ``plots.OverlayItem`` tuples."""

        def as_item(it: dict) -> tuple:
            title = f"{it['case']} s{it['slice']} {it['name']}: Dice {it['dice']:.3f}"
            return it["image"], it["gt"], it["pred"], {"box": it["box"]}, title

        return [as_item(i) for i in self._ranked(True)], [as_item(i) for i in self._ranked(False)]


# --------------------------------------------------------------------------------------------
# Public API


def _run(
    models: Mapping[str, TrainableSam],
    cases: Iterable[Any],
    *,
    task_name: str,
    cfg: Mapping[str, Any] | None,
    out_dir: str | Path,
    seed: int,
    progress: bool,
) -> EvalResult:
    opts = eval_options(cfg)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "per_object": (out / PER_OBJECT_CSV, PER_OBJECT_COLUMNS),
        "per_case": (out / PER_CASE_CSV, PER_CASE_COLUMNS),
        "clicks": (out / CLICKS_CSV, CLICK_COLUMNS),
    }
    progress_path = out / PROGRESS_FILE
    _truncate_partial_line(progress_path)
    entries = _read_progress(progress_path)
    done = {k for k, e in _status(entries).items() if e["status"] == "done"}
    for path, columns in paths.values():
        _drop_unfinished(path, columns, done)
    pools = {
        name: _OverlayPool(out / STATE_DIR / f"overlays_{name}_{task_name}.npz", opts.overlays)
        for name in models
    }

    training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        total = len(cases) if hasattr(cases, "__len__") else None  # type: ignore[arg-type]
        bar = tqdm(total=total, unit="case", desc=f"eval {task_name}")
    box_dice: list[float] = []
    counts = {"ok": 0, "failed": 0}
    first_error: list[str] = []

    def skip(key: str, names: Iterable[str], e: DataError) -> None:
        # Only bad input (unreadable or inconsistent files) is skipped: any other exception
        # is a bug and stops the run, whatever eval.on_error says.
        if opts.on_error == "raise":
            raise e
        log.warning("case %s failed and is skipped: %s", key, e.reason)
        first_error.append(f"{key}: {e.reason}")
        counts["failed"] += 1
        for name in names:
            entry = {"model": name, "task": task_name, "case": key}
            entry.update(status="skipped", path=str(e.path), reason=e.reason)
            _append_progress(progress_path, entry)
            entries.append(entry)

    def commit(case: _PendingCase, in_flight: Iterable[_PendingCase]) -> None:
        """Write one case's rows and markers once its scoring jobs are done."""
        try:
            results = case.outputs()
        except DataError as e:
            skip(case.key, case.models, e)
        except BrokenProcessPool as e:
            # The pool cannot tell which job its dead worker held: every case whose results
            # are lost is named, the first in input order first.
            lost = [c.key for c in in_flight if c is not case and not c.done_ok()]
            raise WorkerDiedError(
                f"a scoring worker process (eval.workers={opts.workers}) died: the results of "
                f"case {case.key} ({case.path or 'in memory'})"
                + (f" and of the cases in flight with it {lost}" if lost else "")
                + " are lost. The cases before it are saved; rerun in the same out_dir to resume."
            ) from e
        else:
            for name, res in results.items():
                _commit_case(name, task_name, case.key, res, paths, opts, case.case_data, out)
                pools[name].offer(res.overlay)
                entry = {"model": name, "task": task_name, "case": case.key, "status": "done"}
                _append_progress(progress_path, entry)
                entries.append(entry)
                box_dice.extend(
                    r["dice"]
                    for r in res.per_object
                    if (r["prompt"], r["jitter"]) == OVERLAY_PROMPT
                )
            counts["ok"] += 1
        if bar is not None:
            bar.update(1)
            if box_dice:
                bar.set_postfix(dice_box=f"{np.mean(box_dice):.3f}")

    # Cases whose scoring is in the pool, in input order: committed in that order, so the
    # files are the same for any eval.workers. A few cases ahead keep the workers fed while
    # the main process encodes the next one; more would only hold memory.
    pending: deque[_PendingCase] = deque()
    max_pending = opts.workers + 1
    try:
        with torch.inference_mode(), ScoringPool(opts.workers) as pool:
            try:

                def finished(key: str) -> bool:
                    return all((n, task_name, key) in done for n in models)

                for item, key, loaded in _loaded_ahead(cases, finished):
                    todo = {n: m for n, m in models.items() if (n, task_name, key) not in done}
                    if not todo:
                        if bar is not None:
                            bar.update(1)
                        continue
                    path = getattr(item, "path", "") or getattr(item, "image_path", "")
                    try:
                        records, case_data = loaded.result()
                        path = getattr(case_data, "image_path", path)
                        case = _start_case(
                            todo, records, case_data, opts, seed, key, pool, str(path)
                        )
                    except DataError as e:
                        skip(key, todo, e)
                        if bar is not None:
                            bar.update(1)
                    else:
                        pending.append(case)
                    while pending and (pending[0].done() or len(pending) > max_pending):
                        commit(pending[0], pending)
                        pending.popleft()
            except BaseException:
                # A bug (or a stop) in a later case keeps the results of the earlier ones,
                # as the serial path always did: finish and write what is in flight.
                while pending:
                    try:
                        commit(pending[0], pending)
                    except BaseException:  # the first error is the one raised
                        break
                    pending.popleft()
                raise
            while pending:
                commit(pending[0], pending)
                pending.popleft()
    finally:
        if bar is not None:
            bar.close()
        for name, m in models.items():
            m.train(training[name])

    tables = {name: _rewrite_sorted(path, cols) for name, (path, cols) in paths.items()}
    skipped = _write_skipped(out / SKIPPED_CSV, entries)
    if counts["failed"] and not counts["ok"] and not done:
        raise RuntimeError(f"all {counts['failed']} cases failed; first: {first_error[0]}")

    def mine(df: pd.DataFrame) -> pd.DataFrame:
        if df.empty:
            return df
        sel = df["model"].isin(list(models)) & (df["task"].astype(str) == task_name)
        return df[sel].reset_index(drop=True)

    overlays: dict[str, list] = {}
    for name, pool in pools.items():
        best, worst = pool.grids()
        if best:
            overlays[f"best_{name}"], overlays[f"worst_{name}"] = best, worst
    return EvalResult(
        per_object=mine(tables["per_object"]),
        per_case=mine(tables["per_case"]),
        clicks=mine(tables["clicks"]),
        skipped=skipped,
        overlays=overlays,
    )


def _commit_case(
    model_name: str,
    task_name: str,
    key: str,
    res: _CaseOutput,
    paths: Mapping[str, tuple[Path, list[str]]],
    opts: EvalOptions,
    case_data: Any,
    out: Path,
) -> None:
    """Append one case's rows (flushed) and its predictions; the marker is written after."""
    tag = {"model": model_name, "task": task_name}
    for table, rows in (
        ("per_object", res.per_object),
        ("per_case", res.per_case),
        ("clicks", res.clicks),
    ):
        path, columns = paths[table]
        patient = {"patient": _patient(case_data, key)} if "patient" in columns else {}
        _append_csv(path, [{**tag, **patient, **r} for r in rows], columns)
    if opts.save_predictions:
        is_3d, num_slices, spacing = res.geometry
        write_case_predictions(
            out / "predictions" / model_name,
            key,
            res.store,
            opts.prompts,
            num_slices=num_slices,
            is_3d=is_3d,
            case_data=case_data,
            spacing=spacing,
        )


def _patient(case_data: Any, key: str) -> str:
    return str(getattr(case_data, "case", key)) if case_data is not None else key


def evaluate(
    model: TrainableSam,
    cases: Iterable[Any],
    *,
    model_name: str,
    task_name: str,
    cfg: Mapping[str, Any] | None,
    out_dir: str | Path,
    seed: int,
    progress: bool = True,
) -> EvalResult:
    """Evaluate one model on the cases of one task (resumable; see the module docstring).

    Args:
        model: the model, on its device (set to eval mode here, restored afterwards).
        cases: each a ``CaseData``, a list of ``SliceRecord`` of one image, or a
            :class:`LazyCase` (loaded only when needed; loading errors are recorded per case).
        model_name: the ``model`` column, e.g. ``"zero_shot"`` or ``"finetuned"``.
        task_name: the ``task`` column.
        cfg: the ``eval`` config (keys of conf/eval/default.yaml; missing keys take its values).
        out_dir: where the CSVs go; existing results of (model, task, case) are kept.
        seed: prompt seed (same seed, same prompts for every model).
        progress: show a tqdm bar (cases/s, running mean box Dice).

    Returns:
        :class:`EvalResult` with all rows of this model and task in ``out_dir``.
    """
    return _run(
        {model_name: model},
        cases,
        task_name=task_name,
        cfg=cfg,
        out_dir=out_dir,
        seed=seed,
        progress=progress,
    )


def evaluate_and_report(
    models: Mapping[str, TrainableSam],
    cases: Iterable[Any],
    *,
    task_name: str,
    cfg: Mapping[str, Any] | None,
    out_dir: str | Path,
    seed: int,
    progress: bool = True,
    title: str = "Evaluation summary",
) -> EvalResult:
    """Evaluate several models on the same cases (each case loaded once), then write the report.

    The report (``report.write_report``: ``summary.csv`` etc., best/worst overlays per model)
    covers every row in ``out_dir``'s CSVs, so models evaluated by earlier calls in the same
    folder appear in it too.
    """
    from sam_ft.evaluation.report import write_report

    result = _run(
        dict(models),
        cases,
        task_name=task_name,
        cfg=cfg,
        out_dir=out_dir,
        seed=seed,
        progress=progress,
    )
    out = Path(out_dir)
    per_object = _read_csv(out / PER_OBJECT_CSV, PER_OBJECT_COLUMNS)
    if per_object.empty:
        return result
    per_case = _read_csv(out / PER_CASE_CSV, PER_CASE_COLUMNS)
    clicks = _read_csv(out / CLICKS_CSV, CLICK_COLUMNS)
    result.report = write_report(
        out,
        per_object,
        per_case,
        clicks if not clicks.empty else None,
        overlays=result.overlays or None,
        title=title,
    )
    return result
