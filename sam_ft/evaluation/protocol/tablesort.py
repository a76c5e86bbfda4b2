"""The engine's tables sorted, merged and filtered without holding them: an external merge sort.

A table of a 100k-slice task is millions of rows (GiBs as a DataFrame), so the steps that used
to load it whole (the final sort, the resume filter, the merge of shards) stream it instead, in
chunks of ``chunk_rows`` rows, and hold at most one chunk plus one batch per sorted run:

1. *types*: one pass over the inputs finds each column's type as one ``read_csv`` of the whole
   table infers it (int, float when any value is a float or missing, bool, text), so that
2. *runs*: each chunk, read with those types, is written back as CSV lines exactly as pandas
   writes the whole table, sorted stably by :func:`row_key` (the order of
   :func:`~sam_ft.evaluation.protocol.order.sort_table`) and stored in a temporary run file;
3. *merge*: ``heapq.merge`` of the runs (stable: equal keys keep the input order) into the target,
   written atomically. The runs live in ``.<target>.runs-<pid>-*/`` beside it; a killed writer's
   are removed by the next one.

The bytes are those of ``sort_table(read_table(...)).to_csv(index=False)`` (tests compare both;
BENCHMARKS.md "Streamed tables" gives the time and peak memory of each). Text fields never hold a
line break (ids, names); a table that has one is refused.
"""

from __future__ import annotations

import heapq
import os
import pickle
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sam_ft.atomic import atomic_write
from sam_ft.evaluation.protocol.order import BASELINE_MODEL, PROMPT_ORDER, SORT_KEYS, jitter_key

STRING_COLUMNS = (
    "model", "task", "case", "name", "prompt", "jitter", "modality", "patient", "distance_unit",
)  # fmt: skip
"""Always text (a case id ``007`` stays ``007``)."""
CHUNK_ROWS = 50_000
"""Rows per chunk (one sorted run): ~50 MB at most for ``per_object.csv`` (BENCHMARKS.md)."""
BATCH = 1_000
"""Rows read back at a time from each run during the merge."""


def csv_options(present: Iterable[str]) -> dict:
    """``read_csv`` options of every table read: text columns as text, only an empty field is
    missing, floats read back exactly (the default parser may change the last digit)."""
    present = set(present)
    return {
        "dtype": {c: str for c in STRING_COLUMNS if c in present},
        "keep_default_na": False,
        "na_values": [""],
        "float_precision": "round_trip",
    }


def header(path: Path) -> list[str]:
    """The column names of a CSV file (empty for a missing or empty file)."""
    if not path.exists() or path.stat().st_size == 0:
        return []
    return list(pd.read_csv(path, nrows=0).columns)


def chunks(path: Path, chunk_rows: int, dtype: dict | None = None) -> Iterator[pd.DataFrame]:
    """The rows of one table, ``chunk_rows`` at a time (none for a file without rows)."""
    names = header(path)
    if not names:
        return
    options = csv_options(names)
    options["dtype"] = {**options["dtype"], **(dtype or {})}
    with pd.read_csv(path, chunksize=chunk_rows, **options) as reader:
        yield from reader


def _kind(column: str, values: pd.Series) -> str:
    if column in STRING_COLUMNS:
        return "text"
    if values.isna().all():
        return "missing"  # read as float: a missing value anywhere makes ints floats
    if pd.api.types.is_bool_dtype(values):
        return "bool"
    if pd.api.types.is_integer_dtype(values):
        return "int"
    return "float" if pd.api.types.is_float_dtype(values) else "text"


_DTYPES = {"int": "int64", "float": "float64", "bool": "bool", "text": str}


def column_types(paths: Sequence[Path], chunk_rows: int) -> dict[str, object]:
    """Each column's dtype as one ``read_csv`` of all ``paths`` together infers it."""
    kinds: dict[str, set[str]] = {}
    for path in paths:
        for chunk in chunks(path, chunk_rows):
            for column in chunk:
                kinds.setdefault(column, set()).add(_kind(column, chunk[column]))
    out = {}
    for column, found in kinds.items():
        if found <= {"int"}:
            out[column] = _DTYPES["int"]
        elif found <= {"int", "float", "missing"}:
            out[column] = _DTYPES["float"]
        elif found == {"bool"}:
            out[column] = _DTYPES["bool"]
        else:  # text, or bool with missing values: pandas keeps the text
            out[column] = _DTYPES["text"]
    return out


def _ranked(values: pd.Series, order: Sequence[str]) -> list[tuple]:
    """:func:`~sam_ft.evaluation.protocol.order.rank_by_order` as a sort key: known values in
    ``order``, then the others alphabetically."""
    known = {v: i for i, v in enumerate(order)}
    return [(known.get(v, len(order)), v) for v in values.astype(str).tolist()]


def _natural(values: pd.Series) -> list[tuple]:
    """A column's own values (numbers numerically, text as text), missing ones last."""
    missing = values.isna().tolist()
    plain = values.tolist()
    return [(1, 0) if m else (0, v) for m, v in zip(missing, plain, strict=True)]


def row_key(chunk: pd.DataFrame, by: Sequence[str] = SORT_KEYS) -> list[tuple]:
    """One sort key per row, ordering rows as :func:`~sam_ft.evaluation.protocol.order.sort_table`
    ranks them over the whole table (the ranks there depend on the values present; these keys
    give the same order from the values alone)."""
    parts = []
    for column in (c for c in by if c in chunk):
        values = chunk[column]
        if column in ("model", "setting", "finetune"):
            parts.append(_ranked(values, (BASELINE_MODEL,)))
        elif column == "prompt":
            parts.append(_ranked(values, PROMPT_ORDER))
        elif column == "jitter":
            parts.append([(*jitter_key(v), v) for v in values.astype(str).tolist()])
        elif column in ("task", "model_size", "modality", "object"):
            parts.append(values.astype(str).tolist())
        else:
            parts.append(_natural(values))
    return list(zip(*parts, strict=True)) if parts else [()] * len(chunk)


def _lines(chunk: pd.DataFrame) -> list[str]:
    """The chunk's rows as pandas writes them in a whole table (no header), one per row."""
    text = chunk.to_csv(header=False, index=False, lineterminator="\n")
    lines = text.split("\n")[:-1]
    if len(lines) != len(chunk):
        raise ValueError("a text field holds a line break; the table cannot be streamed")
    return [line + "\n" for line in lines]


def _write_run(rows: list[tuple], folder: Path, index: int) -> Path:
    path = folder / f"run{index:06d}.pkl"
    with open(path, "wb") as f:
        for start in range(0, len(rows), BATCH):
            pickle.dump(rows[start : start + BATCH], f, protocol=pickle.HIGHEST_PROTOCOL)
    return path


def _read_run(path: Path) -> Iterator[tuple]:
    with open(path, "rb") as f:
        while True:
            try:
                yield from pickle.load(f)
            except EOFError:
                return


def _remove_stale_runs(target: Path) -> None:
    """Remove the run folders a killed writer of ``target`` left (named by its process id)."""
    for folder in target.parent.glob(f".{target.name}.runs-*"):
        try:
            os.kill(int(folder.name.rsplit(".runs-", 1)[1].split("-")[0]), 0)
        except (ValueError, IndexError, ProcessLookupError):
            shutil.rmtree(folder, ignore_errors=True)
        except PermissionError:
            pass  # a live process of another user


def write_sorted(
    inputs: Sequence[Path],
    target: Path,
    *,
    columns: Sequence[str] | None = None,
    keep: Callable[[pd.DataFrame], np.ndarray] | None = None,
    sort: bool = True,
    chunk_rows: int = CHUNK_ROWS,
) -> int:
    """Write the rows of ``inputs`` (CSV tables) into ``target``, as one DataFrame of all of
    them (``pd.concat``) sorted by :func:`~sam_ft.evaluation.protocol.order.sort_table` and written
    with ``to_csv(index=False)`` would, without holding them. ``target`` may be one of the inputs.

    Args:
        columns: the output's columns (missing ones empty, as ``reindex``); None: the inputs'
            columns in order of appearance.
        keep: a row filter, ``chunk -> bool array``, applied before sorting.
        sort: False keeps the input order (a filter only).
        chunk_rows: rows per chunk and sorted run.

    Returns:
        the number of rows written.
    """
    inputs = [Path(p) for p in inputs]
    names = list(columns) if columns is not None else []
    if columns is None:
        for path in inputs:
            names += [c for c in header(path) if c not in names]
    types = column_types(inputs, chunk_rows)
    _remove_stale_runs(target)
    prefix = f".{target.name}.runs-{os.getpid()}-"
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=prefix) as tmp:
        runs, count = [], 0
        for path in inputs:
            dtype = {c: t for c, t in types.items() if c in header(path)}
            for chunk in chunks(path, chunk_rows, dtype):
                if keep is not None:
                    chunk = chunk[keep(chunk)]
                if chunk.empty:
                    continue
                chunk = chunk.reindex(columns=names)
                lines = _lines(chunk)
                keys = row_key(chunk) if sort else [()] * len(lines)
                rows = sorted(zip(keys, lines, strict=True), key=lambda r: r[0])
                runs.append(_write_run(rows, Path(tmp), len(runs)))
                count += len(rows)
        head = pd.DataFrame(columns=names).to_csv(index=False, lineterminator="\n")

        def write(f) -> None:
            f.write(head.encode())
            merged = heapq.merge(*(_read_run(r) for r in runs), key=lambda r: r[0])
            buffer: list[str] = []
            for _, line in merged:
                buffer.append(line)
                if len(buffer) >= BATCH:
                    f.write("".join(buffer).encode())
                    buffer.clear()
            f.write("".join(buffer).encode())

        atomic_write(target, write)
    return count
