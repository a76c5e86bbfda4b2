"""One evaluation's object rows streamed into partitions, so that ``write_report`` never holds
``per_object.csv`` whole (8.4M rows, ~5 GiB as a DataFrame, for a 100k-slice task and 2 models).

Every table of :mod:`sam_ft.evaluation.reports.summary` is a set of groups inside one (model,
prompt, jitter): the summaries (per task, per target, pooled over tasks), the calibration, the
Spearman rho and the reliability bins; each paired comparison joins two of them (a model and
zero-shot on one prompt, a prompt and the box for one model). So the rows are read in chunks and
appended to one temporary file per (model, prompt, jitter); each table is then computed by the
functions that compute it from the whole table, on whole partitions at a time (as many as fit in
one chunk, or one larger partition; each pair of partitions for the comparisons), and the pieces
are put together in the tables' own order. Every mean is a correctly rounded sum
(:func:`~sam_ft.evaluation.reports.statistics.exact_mean`) and every case total is sorted, so the
result is the same bytes as the whole-table computation (a test compares them), with at most one
chunk, or the largest partition or pair of partitions, in memory. What ``summary.md`` counts over
all rows (objects, cases, models, prompt settings, distance units) is gathered while the rows are
read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sam_ft.evaluation.protocol.order import BASELINE_MODEL
from sam_ft.evaluation.protocol.tablesort import chunks, column_types
from sam_ft.evaluation.reports.partition_files import append_rows, read_rows
from sam_ft.evaluation.reports.statistics import (
    CLUSTER,
    Bootstrap,
    cluster_ids,
    comparison_rows,
    finish_comparisons,
)

CHUNK_ROWS = 50_000
"""Rows read at a time from ``per_object.csv`` (as :mod:`~sam_ft.evaluation.protocol.tablesort`'s
chunks, ~50 MB at most)."""
Key = tuple[str, str, str]  # model, prompt, jitter
OBJECT_KEYS = ("task", "case", "slice", "label")
"""What identifies an object (``summary.md`` counts them)."""
COMPARED = ("model", *OBJECT_KEYS, "prompt", "jitter", "dice")
"""The columns a paired comparison reads (``statistics.comparison_rows``)."""


@dataclass
class SummaryParts:
    """The partitions of one evaluation's object rows in a folder, and what ``summary.md``
    counts over all of them."""

    folder: Path
    files: dict[Key, Path] = field(default_factory=dict)
    empty: pd.DataFrame | None = None
    """The rows' columns and types, without rows."""
    objects: set = field(default_factory=set)
    cases: set = field(default_factory=set)
    models: set = field(default_factory=set)
    tasks: set = field(default_factory=set)
    settings: set = field(default_factory=set)
    units: set = field(default_factory=set)
    groups: set = field(default_factory=set)
    """The distinct (model, task, prompt, jitter) of the rows."""
    rows: int = 0

    def add(self, chunk: pd.DataFrame) -> None:
        """Append one chunk's rows to their partitions and count them."""
        if self.empty is None:
            self.empty = chunk.iloc[:0]
        self.rows += len(chunk)
        keys = [c for c in OBJECT_KEYS if c in chunk]
        self.objects.update(zip(*(chunk[k].tolist() for k in keys), strict=True))
        self.cases.update(cluster_ids(chunk).tolist())
        self.models.update(chunk["model"].dropna().tolist())
        self.tasks.update(chunk["task"].dropna().tolist())
        jitter = chunk["jitter"] if "jitter" in chunk else pd.Series("none", index=chunk.index)
        model, task, prompt = (chunk[c].tolist() for c in ("model", "task", "prompt"))
        self.settings.update(zip(prompt, jitter.tolist(), strict=True))
        self.groups.update(zip(model, task, prompt, jitter.tolist(), strict=True))
        if "distance_unit" in chunk:
            self.units.update(chunk["distance_unit"].dropna().astype(str).tolist())
        by = [chunk["model"].astype(str), chunk["prompt"].astype(str), jitter.astype(str)]
        for key, part in chunk.groupby(by, sort=False, dropna=False):
            path = self.files.setdefault(key, self.folder / f"part{len(self.files):05d}.pkl")
            append_rows(path, part)

    def load(self, key: Key) -> pd.DataFrame:
        """One partition's rows, in the order they were read."""
        return read_rows(self.files[key])

    def batches(self) -> Iterator[pd.DataFrame]:
        """The rows, whole partitions at a time, as many as fit in :data:`CHUNK_ROWS` rows (a
        larger partition alone): every group of a table lies in one batch, and a small table
        is one batch (the tables' functions are then called once, as on the whole table)."""
        frames: list[pd.DataFrame] = []
        held = 0
        for part in map(self.load, list(self.files)):
            if frames and held + len(part) > CHUNK_ROWS:
                yield pd.concat(frames, ignore_index=True)
                frames, held = [], 0
            frames.append(part)
            held += len(part)
        if frames:
            yield pd.concat(frames, ignore_index=True)

    def pairs(self, columns: Sequence[str]) -> Iterator[pd.DataFrame]:
        """The rows that the paired comparisons join (only ``columns``, those they read): all
        of them when they fit in :data:`CHUNK_ROWS` rows, else each pair of partitions in turn:
        zero-shot and a model on one (prompt, jitter), the box and another prompt of one
        (model, jitter)."""

        def rows(key: Key) -> pd.DataFrame:
            part = self.load(key)
            return part[[c for c in columns if c in part]]

        if self.rows <= CHUNK_ROWS:
            yield pd.concat([rows(key) for key in self.files], ignore_index=True)
            return
        for model, prompt, jitter in list(self.files):
            key = (model, prompt, jitter)
            for other in ((BASELINE_MODEL, prompt, jitter), (model, "box", jitter)):
                if other != key and other in self.files:
                    yield pd.concat([rows(other), rows(key)], ignore_index=True)


def read_parts(per_object: pd.DataFrame | str | Path, folder: Path) -> SummaryParts:
    """The rows of ``per_object`` (a DataFrame, or a ``per_object.csv`` read in chunks with
    the column types one read of the whole file gives) partitioned into ``folder``."""
    parts = SummaryParts(Path(folder))
    if isinstance(per_object, pd.DataFrame):
        for start in range(0, max(len(per_object), 1), CHUNK_ROWS):
            parts.add(per_object.iloc[start : start + CHUNK_ROWS])
        return parts
    path = Path(per_object)
    types = column_types([path], CHUNK_ROWS)
    for chunk in chunks(path, CHUNK_ROWS, dtype=types):
        parts.add(chunk)
    return parts


def joined(pieces: list[pd.DataFrame], order: Callable[[pd.DataFrame], pd.DataFrame]):
    """The pieces of one table (each from a partition) as the whole table: concatenated and put
    in the table's order; the first (empty) piece when every piece is empty."""
    found = [p for p in pieces if not p.empty]
    if not found:
        return pieces[0]
    return order(pd.concat(found, ignore_index=True))


def comparisons_streamed(parts: SummaryParts, boot: Bootstrap, pooled: bool) -> pd.DataFrame:
    """``statistics.comparison_table`` of all rows (``pooled``: every task's rows as task
    ``all``, the cases of every task resampled), one pair of partitions at a time."""
    records = []
    for rows in parts.pairs(COMPARED):
        if pooled:
            rows = rows.assign(**{CLUSTER: cluster_ids(rows)}, task="all")
        records += comparison_rows(rows, boot)
    return finish_comparisons(records, boot)
