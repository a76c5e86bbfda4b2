"""The evaluation's CPU work in a pool of worker processes, off the encoder/decoder's path.

The engine's main process loads the cases, runs the encoder and the decoder, and on the model's
device the upsampling, thresholding, mask selection (the oracle's with the ground truth put on
the device) and the Dice / IoU of the kept masks
(:func:`~sam_ft.evaluation.protocol.decode_select.decode_scored`); it hands the rest to this pool:
the prompts of the slices ahead (:func:`make_prompts`), HD95, NSD, object attributes and per-object
rows of a decoded slice (:func:`score_slice`), and the 3D metrics of a case (:func:`score_case`).
The jobs carry the predicted masks bit-packed (:mod:`sam_ft.bitmask`: 8 pixels of a mask to a
byte), their Dice / IoU and the objects' ground truth, so a job is a few MB even for 512 x 512
slices.

``eval.workers`` sets the pool's size: ``null`` (default) takes this rank's cores (its node's
allocation divided among the ranks sharing it) less the main process, ``0`` scores in the main
process (the serial path: the same functions, called inline). At most ``2 x workers`` jobs are
in flight (:class:`ScoringPool` blocks the submitter), so memory stays bounded however many cases
there are; the engine commits finished cases in their input order, so the CSVs are the same for
every worker count. A worker that dies (killed, out of memory) raises :class:`WorkerDiedError`
naming the case whose results were lost.

Workers are forked from a ``forkserver`` that has imported this module (and so torch, MONAI and
SciPy) once: starting one costs milliseconds, and no worker inherits the main process's torch
thread pools (a plain ``fork`` after torch started its threads can deadlock).
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sam_ft import bitmask
from sam_ft.errors import SamFtError
from sam_ft.evaluation.metrics.attributes import object_attributes
from sam_ft.evaluation.metrics.object_metrics import batch_slice_metrics, batch_volume_metrics
from sam_ft.evaluation.metrics.overlap import conformity
from sam_ft.prompts.strategies import make_eval_prompt
from sam_ft.prompts.types import Prompt

ATTRIBUTE_COLUMNS = ["area_px", "area_mm2", "aspect_ratio", "boundary_complexity", "contrast"]
_METRICS = ("dice", "iou", "hd95", "hd", "asd", "hd95_missing", "nsd", "conformity", "empty_pred")


class WorkerDiedError(SamFtError):
    """A scoring worker process died (killed, out of memory, crashed) with a case in flight."""


def default_workers(local_ranks: int | None = 1) -> int:
    """The cores of this rank (:func:`sam_ft.cores.cores_per_rank`: its node's allocation
    divided among the ``local_ranks`` ranks sharing it), less one for the main process (0 on a
    single core)."""
    from sam_ft.cores import cores_per_rank

    return max(cores_per_rank(local_ranks or 1) - 1, 0)


def resolve_workers(value: Any) -> int:
    """``eval.workers`` -> a worker count (``None`` -> :func:`default_workers`)."""
    return default_workers() if value is None else int(value)


# --------------------------------------------------------------------------------------------
# Jobs: plain data, pickled to the workers


@dataclass
class PromptJob:
    """One slice's prompt requests: every object (``gt`` (K, H, W) bool, ``labels``) under every
    ``variants`` (strategy, jitter range or None), seeded by (seed, case, slice, label)."""

    case: str
    slice_index: int
    labels: list[int]
    gt: np.ndarray
    variants: list[tuple[str, Any]]
    seed: int
    sampling: str


def make_prompts(job: PromptJob) -> list[Prompt]:
    """The slice's K x V prompts, object-major ((x, y) pixels; a pure function of the job, so
    the same in any process)."""
    gt = np.asarray(job.gt, dtype=bool)
    return [
        make_eval_prompt(
            gt[i],
            strategy,
            jitter,
            seed=job.seed,
            case=job.case,
            slice_index=job.slice_index,
            label=job.labels[i],
            sampling=job.sampling,
        )
        for i in range(len(gt))
        for strategy, jitter in job.variants
    ]


def _cell(values: np.ndarray | None, i: int, j: int) -> float:
    return float("nan") if values is None else float(values[i, j])


@dataclass
class ModelSlice:
    """One model's predictions on one slice: ``packed`` (K, V, nbytes) masks per object and
    variant column, ``mask_index`` / ``pred_iou`` (K, V), their ``dice`` / ``iou`` (K, V)
    float64 against the object's ground truth (computed where the masks were made, on the
    model's device), and the overlay prompt's box per object ((x0, y0, x1, y1), or None without
    a box prompt)); ``dice_oracle`` / ``dice_top_iou`` (K, V): the Dice of the best of the
    prompt's masks and of the IoU head's first choice (NaN for Everything mode)."""

    packed: np.ndarray
    mask_index: np.ndarray
    pred_iou: np.ndarray
    dice: np.ndarray
    iou: np.ndarray
    boxes: list[Any] = field(default_factory=list)
    dice_oracle: np.ndarray | None = None
    dice_top_iou: np.ndarray | None = None


@dataclass
class SliceJob:
    """Everything :func:`score_slice` needs about one slice, for every model evaluated on it.

    ``columns`` are the (prompt, jitter name) of the V prediction columns; ``gt`` (K, H, W) bool;
    ``grey`` (H, W) the intensities the attributes use; ``spacing`` (row, col) in mm;
    ``overlay_col`` the column drawn in the best/worst overlays (-1: none).
    """

    case: str
    slice_index: int
    labels: list[int]
    names: list[str]
    columns: list[tuple[str, str]]
    gt: np.ndarray
    grey: np.ndarray
    spacing: tuple[float, float]
    modality: str
    distance_unit: str
    models: dict[str, ModelSlice]
    nsd_tolerance_mm: float
    nsd_method: str
    overlay_col: int = -1


def score_slice(job: SliceJob) -> dict[str, tuple[list[dict], list[dict]]]:
    """2D metrics and attributes of one slice -> {model: (per-object rows, overlay items)}.

    Dice and IoU come with the job (:class:`ModelSlice`, computed on the model's device); HD95,
    NSD and the empty-mask flags are computed here from the unpacked masks.

    Rows lack ``model``/``task``/``patient`` (the engine adds them); overlay items lack the
    ``image`` (the engine, which holds the slice, adds it).
    """
    gt = np.asarray(job.gt, dtype=bool)
    size = gt.shape[1:]
    ident = {"case": job.case, "slice": int(job.slice_index)}
    # Attributes depend on the ground truth only: computed once, shared by all models.
    attributes = [
        {a: attrs[a] for a in ATTRIBUTE_COLUMNS}
        for attrs in (object_attributes(m, job.grey, job.spacing) for m in gt)
    ]
    out: dict[str, tuple[list[dict], list[dict]]] = {}
    for name, ms in job.models.items():
        preds = bitmask.unpack(ms.packed, size)
        rows, overlay = [], []
        for i in range(len(gt)):
            scores = batch_slice_metrics(
                preds[i], gt[i], job.spacing, job.nsd_tolerance_mm, job.nsd_method
            )
            for j, (prompt, jit) in enumerate(job.columns):
                rows.append(
                    {
                        **ident,
                        "label": job.labels[i],
                        "name": job.names[i],
                        "prompt": prompt,
                        "jitter": jit,
                        # Dice and IoU from the device (ModelSlice), the same float64 numbers
                        # as batch_slice_metrics'; HD95 and NSD need the surfaces: here.
                        "dice": ms.dice[i, j].item(),
                        "iou": ms.iou[i, j].item(),
                        "hd95": scores["hd95"][j].item(),
                        "hd": scores["hd"][j].item(),
                        "asd": scores["asd"][j].item(),
                        "hd95_missing": bool(scores["hd95_missing"][j]),
                        "nsd": float(scores["nsd"][j]),
                        "conformity": float(conformity(ms.dice[i, j].item())),
                        "empty_pred": bool(scores["empty_pred"][j]),
                        "mask_index": int(ms.mask_index[i, j]),
                        "pred_iou": float(ms.pred_iou[i, j]),
                        "dice_oracle": _cell(ms.dice_oracle, i, j),
                        "dice_top_iou": _cell(ms.dice_top_iou, i, j),
                        **attributes[i],
                        "modality": job.modality,
                        "distance_unit": job.distance_unit,
                    }
                )
                if j == job.overlay_col:
                    overlay.append(
                        {
                            **ident,
                            "label": job.labels[i],
                            "name": job.names[i],
                            "dice": float(ms.dice[i, j]),
                            "gt": gt[i],
                            "pred": preds[i, j],
                            "box": ms.boxes[i],
                        }
                    )
        out[name] = (rows, overlay)
    return out


@dataclass
class CaseJob:
    """Everything :func:`score_case` needs about one case's objects.

    ``gt`` maps each label to its ground truth: (S, H, W) bool volume packed with
    :func:`sam_ft.bitmask.pack` (shape ``gt_shape``) for a 3D case, the (H, W) bool mask for a
    2D image.
    ``slice_of`` is a 2D image's slice index per label; ``stores`` are the models'
    ``CasePredictions``; ``spacing`` is (slice, row, col) in mm.
    """

    case: str
    is_3d: bool
    spacing: tuple[float, float, float]
    labels: list[int]
    names: dict[int, str]
    num_slices: dict[int, int]
    gt: dict[int, np.ndarray]
    gt_shape: tuple[int, ...]
    slice_of: dict[int, int]
    distance_unit: str
    stores: dict[str, Any]
    nsd_tolerance_mm: float
    nsd_method: str


def _slice_range(gt_vol: np.ndarray, store: Any, keys: list) -> tuple[int, int]:
    """Slices [start, stop) holding all of an object's (D, H, W) GT and its stored predictions.

    Cropping the GT and every prediction volume to these slices changes no metric (surfaces and
    distances only involve foreground, and outside the range both are background), while each
    prediction volume then holds only the slices the object spans, not the whole case.
    """
    filled = [int(s) for s in np.flatnonzero(gt_vol.reshape(len(gt_vol), -1).any(axis=1))]
    filled += [s for key in keys for s in store.slices(key)]
    if not filled:
        return 0, 0
    return min(filled), max(filled) + 1


def score_case(job: CaseJob) -> dict[str, list[dict]]:
    """3D (or, for a 2D image, 2D) scores of each (object, prompt, jitter) -> {model: rows}.

    All prompt variants of an object are scored in one batch against its ground truth, so the
    work on the ground truth alone (surface, distance map) is done once per object.
    """
    out: dict[str, list[dict]] = {}
    for name, store in job.stores.items():
        rows = []
        for label in job.labels:
            keys = [k for k in store.variants() if k[0] == label]
            if not keys:
                continue
            if job.is_3d:
                gt_vol = bitmask.unpack(job.gt[label], job.gt_shape[1:])
                start, stop = _slice_range(gt_vol, store, keys)
                # One (slices, H, W) prediction volume at a time: memory stays flat in the
                # number of variants.
                preds = (store.stack(key, stop - start, offset=start) for key in keys)
                scores = batch_volume_metrics(
                    preds, gt_vol[start:stop], job.spacing, job.nsd_tolerance_mm, job.nsd_method
                )
            else:
                # A single 2D image: a one-slice "volume" would make every voxel surface.
                s = job.slice_of[label]
                preds = np.stack([store.get(key, s) for key in keys])
                scores = batch_slice_metrics(
                    preds, job.gt[label], job.spacing[1:], job.nsd_tolerance_mm, job.nsd_method
                )
            for j, key in enumerate(keys):
                rows.append(
                    {
                        "case": job.case,
                        "label": label,
                        "name": job.names[label],
                        "prompt": key[1],
                        "jitter": key[2],
                        **{m: scores[m][j].item() for m in _METRICS},
                        "num_slices": job.num_slices[label],
                        "distance_unit": job.distance_unit,
                    }
                )
        out[name] = rows
    return out


# --------------------------------------------------------------------------------------------
# The pool


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed but not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True


def _watch_main(pid: int, period_s: float = 1.0) -> None:
    # A worker blocks on its job queue, whose write end it holds too, so it would outlive a
    # main process killed by SIGKILL (or the OOM killer): end it when the main process ends.
    while _alive(pid):
        time.sleep(period_s)
    os._exit(1)


def _init_worker(main_pid: int) -> None:
    import torch

    # One thread per worker: the pool's size is the parallelism.
    torch.set_num_threads(1)
    threading.Thread(target=_watch_main, args=(main_pid,), daemon=True).start()


class ScoringPool:
    """Runs scoring jobs in ``workers`` processes (inline when 0), at most ``max_in_flight``
    unfinished at a time: :meth:`submit` blocks until one finishes.

    Use as a context manager; results are read from the returned futures in any order.
    """

    def __init__(self, workers: int, max_in_flight: int | None = None) -> None:
        if workers < 0:
            raise ValueError(f"eval.workers must be >= 0 or null, got {workers}")
        self.workers = workers
        self.max_in_flight = max_in_flight or 2 * max(workers, 1)
        self._in_flight: list[Future] = []
        self._executor: ProcessPoolExecutor | None = None
        if workers > 0:
            ctx = multiprocessing.get_context("forkserver")
            ctx.set_forkserver_preload([__name__])
            self._executor = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=ctx,
                initializer=_init_worker,
                initargs=(os.getpid(),),
            )

    def submit(self, fn: Callable[[Any], Any], job: Any) -> Future:
        """Run ``fn(job)`` (a module-level function, picklable ``job``)."""
        if self._executor is None:
            fut: Future = Future()
            try:
                fut.set_result(fn(job))
            except Exception as e:  # delivered through the future, as from a worker
                fut.set_exception(e)
            return fut
        self._in_flight = [f for f in self._in_flight if not f.done()]
        while len(self._in_flight) >= self.max_in_flight:
            wait(self._in_flight, return_when=FIRST_COMPLETED)
            self._in_flight = [f for f in self._in_flight if not f.done()]
        try:
            fut = self._executor.submit(fn, job)
        except BrokenProcessPool as e:
            # A worker died earlier: this job is lost too, reported where its case is committed.
            fut = Future()
            fut.set_exception(e)
            return fut
        self._in_flight.append(fut)
        return fut

    def close(self, cancel: bool = False) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=cancel)
            self._executor = None

    def __enter__(self) -> ScoringPool:
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(cancel=exc_type is not None)
