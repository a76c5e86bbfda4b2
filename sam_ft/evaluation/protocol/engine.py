"""The evaluation engine: the loop over cases that scores every model and writes the tables.

Each case is loaded one ahead in a thread (:mod:`sam_ft.evaluation.protocol.cases`), run on the
models and handed to the scoring pool (:mod:`sam_ft.evaluation.protocol.scoring_pool`), then
committed in input order once its scoring is done (:mod:`sam_ft.evaluation.protocol.tables`), so the
files are the same for any ``eval.workers``. Prompts are pure functions of (seed, case, slice,
object label, strategy, jitter), so every model sees identical prompts.

Outputs in ``out_dir`` (one row per object and prompt variant; columns in
:mod:`~sam_ft.evaluation.protocol.tables`):

- ``per_object.csv``: 2D scores per (model, task, case, slice, label, prompt, jitter) with the
  object's attributes;
- ``per_case.csv``: 3D scores per (model, task, case, label, prompt, jitter): the object's
  predictions stacked back into the case's volume (empty where the object had no kept slice),
  against the object's whole ground-truth volume (``eval.volume_gt=full``, the default: slices
  where it had <= ``data.min_object_pixels`` px count too) or only its kept slices (``kept``;
  also what a case given as a bare list of ``SliceRecord`` has);
- ``clicks.csv``: Dice after clicks 1..N (``eval.clicks > 0``);
- ``skipped.csv``: cases skipped for bad data (``case, path, reason, stage, model, task``): with
  ``data.on_error=skip`` only a ``DataError`` (unreadable or inconsistent files) skips a case;
  any other exception stops the run;
- ``progress.jsonl``: one line per finished or failed (model, task, case): the resume marker.

Rows are appended and flushed after each case, then its marker line is written; a new run in the
same ``out_dir`` drops rows of unmarked cases (killed mid-write) and skips marked ones. At the end
the CSVs are rewritten sorted by (model, task, case, slice, label, prompt, jitter), so a resumed
run ends with the same files as an uninterrupted one.

``case`` in the tables is the image id (``SliceRecord.image_id``; the case id unless several
images share a patient), the unit that is stacked in 3D; ``patient`` is the split's case id.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterable, Mapping
from concurrent.futures import Future
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from sam_ft.data.loading import CaseData
from sam_ft.data.skips import raise_or_skip
from sam_ft.errors import DataError
from sam_ft.evaluation.protocol.best_worst import OverlayPool
from sam_ft.evaluation.protocol.cases import Case, case_path, loaded_ahead
from sam_ft.evaluation.protocol.options import EvalOptions
from sam_ft.evaluation.protocol.predictions import write_case_predictions
from sam_ft.evaluation.protocol.run_case import OVERLAY_PROMPT, CaseOutput, PendingCase, start_case
from sam_ft.evaluation.protocol.scoring_pool import ScoringPool, WorkerDiedError, resolve_workers
from sam_ft.evaluation.protocol.tables import (
    CLICK_COLUMNS,
    CLICKS_CSV,
    PER_CASE_COLUMNS,
    PER_CASE_CSV,
    PER_OBJECT_COLUMNS,
    PER_OBJECT_CSV,
    PROGRESS_FILE,
    PROPAGATION_COLUMNS,
    PROPAGATION_CSV,
    SKIPPED_CSV,
    STATE_DIR,
    append_progress,
    append_rows,
    drop_unfinished,
    has_rows,
    last_markers,
    read_progress,
    read_table,
    rewrite_sorted,
    truncate_partial_line,
    write_skipped,
)
from sam_ft.evaluation.protocol.tablesort import CHUNK_ROWS, chunks, column_types
from sam_ft.evaluation.protocol.volume_case import start_volume_case
from sam_ft.model.backend import SegmentBackend
from sam_ft.reproducible import thread_independent

if TYPE_CHECKING:
    from sam_ft.evaluation.reports.summary import ReportTables

log = logging.getLogger(__name__)


@dataclass
class EvalResult:
    """What one call of the engine leaves: its folder, the models and task it scored, the
    skipped cases, the overlay items (``{"best_<model>": [...], "worst_<model>": [...]}`` for
    ``summary.write_report``) and the report's tables (``summary.ReportTables``, None without a
    report). The rows stay on disk: :meth:`table` reads this call's rows of one table in chunks
    (``per_object``, ``per_case``, ``clicks`` name them); the numbers of a run are its report's
    tables, not these rows."""

    out_dir: Path
    models: list[str]
    task: str
    skipped: pd.DataFrame
    overlays: dict[str, list] = field(default_factory=dict)
    report: ReportTables | None = None

    def table(self, name: str) -> pd.DataFrame:
        """This call's models' and task's rows of ``<name>.csv`` (the folder may hold other
        calls' rows too), read in chunks of which only those rows are kept."""
        path = self.out_dir / f"{name}.csv"
        types = column_types([path], CHUNK_ROWS)  # those of one read of the whole file
        parts = [
            chunk[chunk["model"].isin(self.models) & (chunk["task"].astype(str) == self.task)]
            for chunk in chunks(path, CHUNK_ROWS, dtype=types)
        ]
        if not parts:
            return read_table(path, TABLE_COLUMNS[name])
        return pd.concat(parts, ignore_index=True)

    @property
    def per_object(self) -> pd.DataFrame:
        return self.table("per_object")

    @property
    def per_case(self) -> pd.DataFrame:
        return self.table("per_case")

    @property
    def clicks(self) -> pd.DataFrame:
        return self.table("clicks")


TABLE_COLUMNS = {
    "per_object": PER_OBJECT_COLUMNS,
    "per_case": PER_CASE_COLUMNS,
    "clicks": CLICK_COLUMNS,
}


class _Run:
    """One call of the engine: the resume state read from ``out_dir``, the progress bar, and
    the steps of the loop (start a case, commit a case, skip a bad one, finish)."""

    def __init__(
        self,
        models: Mapping[str, SegmentBackend],
        *,
        task_name: str,
        opts: EvalOptions,
        out_dir: str | Path,
        seed: int,
    ) -> None:
        self.models, self.task_name, self.opts, self.seed = models, task_name, opts, seed
        self.workers = resolve_workers(opts.workers)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.paths = {
            "per_object": (self.out / PER_OBJECT_CSV, PER_OBJECT_COLUMNS),
            "per_case": (self.out / PER_CASE_CSV, PER_CASE_COLUMNS),
            "clicks": (self.out / CLICKS_CSV, CLICK_COLUMNS),
            # eval.mode=propagate only (no rows, no file, in the slices mode).
            "propagation": (self.out / PROPAGATION_CSV, PROPAGATION_COLUMNS),
        }
        self.progress_path = self.out / PROGRESS_FILE
        truncate_partial_line(self.progress_path)
        self.entries = read_progress(self.progress_path)
        markers = last_markers(self.entries).items()
        self.done = {k for k, e in markers if e["status"] == "done"}
        for path, columns in self.paths.values():
            drop_unfinished(path, columns, self.done)
        self.pools = {
            name: OverlayPool(self.out / STATE_DIR / f"overlays_{name}_{task_name}.npz", k)
            for name, k in ((name, opts.overlays) for name in models)
        }
        self.bar: Any = None
        self.box_dice: list[float] = []
        self.counts = {"ok": 0, "failed": 0}
        self.first_error: list[str] = []

    def open_bar(self, cases: Iterable[Case]) -> None:
        from tqdm.auto import tqdm

        total = len(cases) if hasattr(cases, "__len__") else None  # type: ignore[arg-type]
        self.bar = tqdm(total=total, unit="case", desc=f"eval {self.task_name}")

    def slice_progress(self, key: str):
        """The bar's note on the case being decoded (``demo_003: slice 5/12``): a case can take
        minutes (Everything mode, large volumes), and the case count alone looks hung."""
        bar = self.bar

        def note(done: int, total: int) -> None:
            if bar is not None:
                bar.set_postfix_str(f"{key}: slice {done}/{total}", refresh=True)

        return note

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def _mark(self, entry: dict) -> None:
        append_progress(self.progress_path, entry)
        self.entries.append(entry)

    def skip(self, key: str, names: Iterable[str], e: DataError) -> None:
        # Only bad input (unreadable or inconsistent files) is skipped: any other exception
        # is a bug and stops the run, whatever data.on_error says. The engine's record is its
        # progress markers (-> skipped.csv with the stage and model), hence no SkipLog here.
        raise_or_skip(self.opts.on_error, key, e, None)
        log.warning("case %s failed and is skipped: %s", key, e.reason)
        self.first_error.append(f"{key}: {e.reason}")
        self.counts["failed"] += 1
        for name in names:
            entry = {"model": name, "task": self.task_name, "case": key}
            self._mark({**entry, "status": "skipped", "path": str(e.path), "reason": e.reason})

    def commit(self, case: PendingCase, in_flight: Iterable[PendingCase]) -> None:
        """Write one case's rows and markers once its scoring jobs are done."""
        try:
            results = case.outputs()
        except DataError as e:
            self.skip(case.key, case.models, e)
        except BrokenProcessPool as e:
            # The pool cannot tell which job its dead worker held: every case whose results
            # are lost is named, the first in input order first.
            lost = [c.key for c in in_flight if c is not case and not c.done_ok()]
            raise WorkerDiedError(
                f"a scoring worker process (eval.workers={self.workers}) died: the results "
                f"of case {case.key} ({case.path or 'in memory'})"
                + (f" and of the cases in flight with it {lost}" if lost else "")
                + " are lost. The cases before it are saved; rerun in the same out_dir to resume."
            ) from e
        else:
            for name, res in results.items():
                _commit_case(
                    name, self.task_name, case.key, res, self.paths, self.opts, case.case_data,
                    self.out,
                )  # fmt: skip
                self.pools[name].offer(res.overlay)
                entry = {"model": name, "task": self.task_name, "case": case.key}
                self._mark({**entry, "status": "done"})
                self.box_dice.extend(
                    r["dice"]
                    for r in res.per_object
                    if (r["prompt"], r["jitter"]) == OVERLAY_PROMPT
                )
            self.counts["ok"] += 1
        self.tick()
        if self.bar is not None and self.box_dice:
            self.bar.set_postfix(dice_box=f"{np.mean(self.box_dice):.3f}")

    def start(
        self, item: Case, key: str, loaded: Future | None, pool: ScoringPool
    ) -> PendingCase | None:
        """Load and start one case on the models that have not finished it; None when there is
        nothing to do (all finished, or skipped for bad data)."""
        todo = {n: m for n, m in self.models.items() if (n, self.task_name, key) not in self.done}
        if not todo:
            self.tick()
            return None
        path = case_path(item)
        try:
            records, case_data = loaded.result()
            path = case_data.image_path if case_data is not None else path
            start = start_volume_case if self.opts.mode == "propagate" else start_case
            return start(
                todo, records, case_data, self.opts, self.seed, key, pool, str(path),
                progress=self.slice_progress(key),
            )  # fmt: skip
        except DataError as e:
            self.skip(key, todo, e)
            self.tick()
            return None

    def loop(self, cases: Iterable[Case]) -> None:
        """Every case through the models and the pool, committed in input order."""
        # Cases whose scoring is in the pool, in input order: committed in that order, so the
        # files are the same for any eval.workers. A few cases ahead keep the workers fed while
        # the main process encodes the next one; more would only hold memory: at most
        # workers + 1 cases and eval.queue_mb MiB of them (a case larger than that alone).
        pending: deque[PendingCase] = deque()
        max_pending = self.workers + 1
        budget = None if self.opts.queue_mb is None else self.opts.queue_mb * 2**20
        held = [0]  # bytes of the pending cases

        def over() -> bool:
            return len(pending) > max_pending or (budget is not None and held[0] > budget)

        def commit_first() -> None:
            # Out of the queue before its commit: a commit cut short (a stop signal between two
            # models' markers) is never written twice; a resume redoes its unmarked part.
            case = pending.popleft()
            held[0] -= case.nbytes()
            self.commit(case, [case, *pending])

        def finished(key: str) -> bool:
            return all((n, self.task_name, key) in self.done for n in self.models)

        # thread_independent: the same bits on any core count (sam_ft/reproducible.py).
        with torch.inference_mode(), thread_independent(), ScoringPool(self.workers) as pool:
            try:
                for item, key, loaded in loaded_ahead(cases, finished):
                    case = self.start(item, key, loaded, pool)
                    if case is not None:
                        pending.append(case)
                        held[0] += case.nbytes()
                    while pending and (pending[0].done() or over()):
                        commit_first()
            except BaseException:
                # A bug (or a stop) in a later case keeps the results of the earlier ones,
                # as the serial path always did: finish and write what is in flight.
                while pending:
                    try:
                        commit_first()
                    except BaseException:  # the first error is the one raised
                        break
                raise
            while pending:
                commit_first()

    def finish(self) -> EvalResult:
        """Rewrite the tables in canonical order (streamed, never held whole). Returns this
        call's result (its rows stay in the files)."""
        for path, cols in self.paths.values():
            rewrite_sorted(path, cols)
        skipped = write_skipped(self.out / SKIPPED_CSV, self.entries)
        if self.counts["failed"] and not self.counts["ok"] and not self.done:
            raise RuntimeError(
                f"all {self.counts['failed']} cases failed; first: {self.first_error[0]}"
            )
        overlays: dict[str, list] = {}
        for name, pool in self.pools.items():
            best, worst = pool.grids()
            if best:
                overlays[f"best_{name}"], overlays[f"worst_{name}"] = best, worst
        result = EvalResult(self.out, list(self.models), self.task_name, skipped, overlays)
        warn_if_everything_kept_nothing(result, self.opts)
        return result


def warn_if_everything_kept_nothing(result: EvalResult, opts: EvalOptions) -> None:
    """S1's Dice is 0 for an object when the generator kept no mask on its slice (``mask_index``
    -1): say how often, per model, and which thresholds dropped them, so a 0.000 in the summary
    is not read as a bug or a model that found the object and missed it. Counted over this
    call's rows of ``per_object.csv``, read in chunks."""
    empty: dict[str, int] = {}
    total: dict[str, int] = {}
    for chunk in chunks(result.out_dir / PER_OBJECT_CSV, CHUNK_ROWS):
        s1 = chunk[
            (chunk["prompt"] == "everything")
            & chunk["model"].isin(result.models)
            & (chunk["task"].astype(str) == result.task)
        ]
        for model, rows in s1.groupby("model", sort=False):
            total[model] = total.get(model, 0) + len(rows)
            empty[model] = empty.get(model, 0) + int((rows["mask_index"] < 0).sum())
    for model in total:
        if empty[model]:
            e = opts.everything
            log.warning(
                "S1 everything, %s: the generator kept no mask for %d of %d objects (their Dice "
                "is 0): no grid prompt passed pred_iou_thresh=%s / stability_score_thresh=%s "
                "(SAM's defaults; eval.everything.* sets them)",
                model, empty[model], total[model], e.pred_iou_thresh, e.stability_score_thresh,
            )  # fmt: skip


def _commit_case(
    model_name: str,
    task_name: str,
    key: str,
    res: CaseOutput,
    paths: Mapping[str, tuple[Path, list[str]]],
    opts: EvalOptions,
    case_data: CaseData | None,
    out: Path,
) -> None:
    """Append one case's rows (flushed) and its predictions; the marker is written after."""
    tag = {"model": model_name, "task": task_name}
    for table, rows in (
        ("per_object", res.per_object),
        ("per_case", res.per_case),
        ("clicks", res.clicks),
        ("propagation", res.propagation),
    ):
        path, columns = paths[table]
        patient = {"patient": _patient(case_data, key)} if "patient" in columns else {}
        append_rows(path, [{**tag, **patient, **r} for r in rows], columns)
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


def _patient(case_data: CaseData | None, key: str) -> str:
    """The ``patient`` column: the split's case id (the image id ``key`` without a CaseData)."""
    return str(case_data.case) if case_data is not None else key


def evaluate_models(
    models: Mapping[str, SegmentBackend],
    cases: Iterable[Case],
    *,
    task_name: str,
    options: EvalOptions,
    out_dir: str | Path,
    seed: int,
    progress: bool = True,
    report: bool = True,
    title: str = "Evaluation summary",
) -> EvalResult:
    """Evaluate models on the cases of one task (each case loaded once; resumable, see the
    module docstring), then write the summary.

    Args:
        models: ``{name: model}``, each on its device (set to eval mode here, restored
            afterwards); the name is the ``model`` column, e.g. ``"zero_shot"``.
        cases: each a ``CaseData``, a list of ``SliceRecord`` of one image, or a
            :class:`~sam_ft.evaluation.protocol.cases.LazyCase` (loaded only when needed; loading
            errors are recorded per case).
        task_name: the ``task`` column.
        options: the ``eval`` group, checked (``options.eval_options``).
        out_dir: where the CSVs go; existing results of (model, task, case) are kept.
        seed: prompt seed (same seed, same prompts for every model).
        progress: show a tqdm bar (cases/s, running mean box Dice).
        report: write the summary (``summary.write_report``: ``summary.csv`` etc., best/worst
            overlays per model). It covers every row in ``out_dir``'s CSVs, so models evaluated
            by earlier calls in the same folder appear in it too.
        title: the summary's title.

    Returns:
        :class:`EvalResult` of these models and task in ``out_dir`` (its ``report``: the
        summary's tables).
    """
    models = dict(models)
    run = _Run(models, task_name=task_name, opts=options, out_dir=out_dir, seed=seed)
    training = {name: m.training for name, m in models.items()}
    for m in models.values():
        m.eval()
    if progress:
        run.open_bar(cases)
    try:
        run.loop(cases)
    finally:
        if run.bar is not None:
            run.bar.close()
        for name, m in models.items():
            m.train(training[name])
    result = run.finish()
    per_object = run.out / PER_OBJECT_CSV
    if report and has_rows(per_object):
        from sam_ft.evaluation.reports.summary import write_report

        per_case = read_table(run.out / PER_CASE_CSV, PER_CASE_COLUMNS)
        clicks = read_table(run.out / CLICKS_CSV, CLICK_COLUMNS)
        result.report = write_report(
            run.out,
            per_object,
            per_case,
            clicks if not clicks.empty else None,
            overlays=result.overlays or None,
            title=title,
            options=run.opts,
            seed=seed,
        )
    return result
