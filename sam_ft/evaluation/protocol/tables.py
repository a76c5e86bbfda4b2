"""The engine's output tables: their columns and files, appends, resume markers, the one sort.

Rows are appended and flushed after each case, then its marker line goes to ``progress.jsonl``;
a new run in the same folder drops rows of unmarked cases (killed mid-write) and skips marked
ones. At the end the CSVs are rewritten in :func:`sort_table` order, so a resumed run ends with
the same files as an uninterrupted one. The rewrite and the resume filter stream the tables
(:mod:`~sam_ft.evaluation.protocol.tablesort`): a table is never held whole for them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from sam_ft.evaluation.protocol.order import sort_table
from sam_ft.evaluation.protocol.scoring_pool import ATTRIBUTE_COLUMNS
from sam_ft.evaluation.protocol.tablesort import (
    CHUNK_ROWS,
    STRING_COLUMNS,
    chunks,
    csv_options,
    write_sorted,
)

PER_OBJECT_COLUMNS = [
    "model", "task", "case", "slice", "label", "name", "prompt", "jitter",
    "dice", "iou", "hd95", "hd95_missing", "nsd", "hd", "asd", "conformity", "empty_pred",
    "mask_index", "pred_iou",
    *ATTRIBUTE_COLUMNS, "modality", "patient", "distance_unit", "dice_oracle", "dice_top_iou",
]  # fmt: skip
PER_CASE_COLUMNS = [
    "model", "task", "case", "label", "name", "prompt", "jitter",
    "dice", "iou", "hd95", "hd95_missing", "nsd", "hd", "asd", "conformity", "empty_pred",
    "num_slices", "patient",
    "distance_unit",
]  # fmt: skip
PROPAGATION_COLUMNS = [
    "model", "task", "case", "slice", "label", "name", "prompt", "jitter",
    "key_slice", "distance", "is_key", "in_extent", "gt_px", "pred_px", "dice",
]  # fmt: skip
"""``propagation.csv`` (``eval.mode=propagate``): sam_ft.evaluation.protocol.volume_case."""
CLICK_COLUMNS = ["model", "task", "case", "slice", "label", "click", "dice"]
SKIPPED_COLUMNS = ["case", "path", "reason", "stage", "model", "task"]
_STRING_COLUMNS = STRING_COLUMNS

PER_OBJECT_CSV = "per_object.csv"
PER_CASE_CSV = "per_case.csv"
CLICKS_CSV = "clicks.csv"
PROPAGATION_CSV = "propagation.csv"
SKIPPED_CSV = "skipped.csv"
PROGRESS_FILE = "progress.jsonl"
STATE_DIR = ".eval_state"


def truncate_partial_line(path: Path) -> None:
    """Drop a last line without its newline (a write killed midway) so appends stay valid."""
    if not path.exists():
        return
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        path.write_bytes(data[: data.rfind(b"\n") + 1])


def append_rows(path: Path, rows: list[dict], columns: list[str]) -> None:
    if not rows:
        return
    header = not path.exists() or path.stat().st_size == 0
    with open(path, "a", newline="") as f:
        pd.DataFrame(rows, columns=columns).to_csv(f, header=header, index=False)
        f.flush()
        os.fsync(f.fileno())


def has_rows(path: Path) -> bool:
    """Whether a table has a row under its header (read up to its second line only)."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        f.readline()
        return bool(f.readline().strip())


def read_table(path: Path, columns: list[str]) -> pd.DataFrame:
    if not path.exists() or path.stat().st_size == 0:
        return pd.DataFrame(columns=columns)
    present = pd.read_csv(path, nrows=0).columns
    return pd.read_csv(path, **csv_options(present))


def read_progress(path: Path) -> list[dict]:
    if not path.exists():
        return []
    entries = []
    for line in path.read_text().splitlines():
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def append_progress(path: Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())


def last_markers(entries: list[dict]) -> dict[tuple[str, str, str], dict]:
    """Last marker per (model, task, case)."""
    return {(e["model"], e["task"], e["case"]): e for e in entries}


def rewrite_sorted(path: Path, columns: list[str]) -> None:
    """Rewrite ``path`` in :func:`sort_table` order, streamed (``tablesort.write_sorted``); an
    empty file gets the header of ``columns``."""
    if path.exists():
        write_sorted([path], path, columns=None if path.stat().st_size else columns)


def drop_unfinished(path: Path, columns: list[str], done: set[tuple[str, str, str]]) -> None:
    """Remove rows of (model, task, case) without a "done" marker (a run killed mid-case),
    streamed; a file with nothing to drop is left as it is."""
    truncate_partial_line(path)

    def keep(df: pd.DataFrame) -> np.ndarray:
        cols = (df[c].astype(str) for c in ("model", "task", "case"))
        return np.array([k in done for k in zip(*cols, strict=True)], dtype=bool)

    old_columns = path.exists() and path.stat().st_size and list(pd.read_csv(path, nrows=0).columns)
    if not old_columns:
        return
    # Also brings a table written by an older version to today's columns before appending.
    if old_columns != list(columns) or any(not keep(c).all() for c in chunks(path, CHUNK_ROWS)):
        write_sorted([path], path, columns=columns, keep=keep, sort=False)


def write_skipped(path: Path, entries: list[dict]) -> pd.DataFrame:
    """``skipped.csv``: this engine's failed cases (``stage=evaluate``) after any rows another
    writer (e.g. the data loader's ``SkipLog``) left in the same file."""
    foreign = pd.DataFrame(columns=SKIPPED_COLUMNS)
    if path.exists() and path.stat().st_size > 0:
        old = pd.read_csv(path, dtype=str, keep_default_na=False)
        if "stage" in old:
            old = old[old["stage"] != "evaluate"]
        foreign = old.reindex(columns=SKIPPED_COLUMNS, fill_value="")
    failed = [e for e in last_markers(entries).values() if e["status"] == "skipped"]
    mine = pd.DataFrame(
        [{**{c: e.get(c, "") for c in SKIPPED_COLUMNS}, "stage": "evaluate"} for e in failed],
        columns=SKIPPED_COLUMNS,
    )
    mine = sort_table(mine) if not mine.empty else mine
    out = pd.concat([foreign, mine], ignore_index=True)
    if not out.empty or path.exists():
        out.to_csv(path, index=False)
    return mine
