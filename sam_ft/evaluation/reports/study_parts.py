"""The study's rows streamed into partitions, so that ``sam-ft-report`` never holds all of them.

Every table of :mod:`sam_ft.evaluation.reports.study` is a set of groups, each inside one (model
size, setting, prompt) at no jitter, and every comparison joins two of them. So the object rows of
all runs are read in chunks (only the columns the study uses) and appended to one temporary file per
(model size, setting, prompt, jitter or not); each table is then computed one partition (or one pair
of partitions) at a time with the functions of ``study`` and the pieces are put together in the
tables' own order. The result is the same bytes as ``study_tables(load_study(...))`` (a test
compares them), with at most one chunk or two partitions in memory: the largest (model size,
setting, prompt) slice of the no-jitter rows, about 1/(sizes x settings x prompts) of the study. A
zero-shot run found in several runs counts once: duplicates are dropped within a partition
(``study.ROW_KEYS`` hold its keys).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from sam_ft.errors import SamFtError
from sam_ft.evaluation.protocol.order import BASELINE_MODEL, sort_table
from sam_ft.evaluation.reports.levels import aggregation_levels, with_case_level
from sam_ft.evaluation.reports.partition_files import append_rows, read_rows
from sam_ft.evaluation.reports.statistics import Bootstrap

CHUNK_ROWS = 20_000
"""Rows read at a time from one ``per_object.csv`` (~5 MB of the columns read)."""
USED = ("model", "task", "case", "slice", "label", "name", "prompt", "jitter", "modality")
"""The columns of ``per_object.csv`` the study reads, besides its scores."""
Key = tuple[str, str, str, bool]  # model size, setting, prompt, no jitter


@dataclass
class StudyParts:
    """The partitions of one study in a folder, and what ``study.md`` counts over all rows."""

    folder: Path
    files: dict[Key, Path] = field(default_factory=dict)
    runs: set = field(default_factory=set)
    tasks: set = field(default_factory=set)
    modalities: set = field(default_factory=set)
    objects: set = field(default_factory=set)
    rows: int = 0

    def add(self, chunk: pd.DataFrame) -> None:
        keys = ["model_size", "setting", "prompt", "_plain"]
        chunk = chunk.assign(_plain=chunk["jitter"].astype(str) == "none")
        for key, part in chunk.groupby(keys, sort=False, dropna=False):
            key = (str(key[0]), str(key[1]), str(key[2]), bool(key[3]))
            path = self.files.setdefault(key, self.folder / f"part{len(self.files):05d}.pkl")
            append_rows(path, part.drop(columns="_plain"))

    def load(self, key: Key) -> pd.DataFrame:
        """One partition's rows in the order they were read, duplicates dropped."""
        from sam_ft.evaluation.reports.study import ROW_KEYS

        rows = read_rows(self.files[key])
        return rows.drop_duplicates(subset=ROW_KEYS, keep="first").reset_index(drop=True)

    def plain(self) -> Iterator[tuple[Key, pd.DataFrame]]:
        """Each no-jitter partition, in the order first read; counts every partition's rows."""
        for key in list(self.files):
            rows = self.load(key)
            self.rows += len(rows)
            for name, column in (("runs", "run"), ("tasks", "task"), ("modalities", "modality")):
                getattr(self, name).update(rows[column].dropna().unique())
            self.objects.update(rows["object"].dropna().unique())
            if key[3]:
                yield key, rows


def read_parts(dirs: Sequence[str | Path], folder: Path) -> StudyParts:
    """The object rows of every run under ``dirs`` (as ``study.load_study`` labels them),
    partitioned into ``folder``."""
    from sam_ft.evaluation.reports.study import find_per_object, label_rows, run_config

    parts = StudyParts(Path(folder))
    found = find_per_object(dirs)
    if not found:
        raise SamFtError(f"no per_object.csv under {', '.join(map(str, dirs))}")
    for path, root in found:
        present = set(pd.read_csv(path, nrows=0).columns)
        wanted = [c for c in present if c in USED or c in ("dice", "iou", "hd95", "nsd")]
        dtype = {c: str for c in ("model", "task", "name", "jitter") if c in present}
        run, info = os.path.relpath(path.parent, root.parent), run_config(path, root)
        with pd.read_csv(path, dtype=dtype, usecols=wanted, chunksize=CHUNK_ROWS) as reader:
            for chunk in reader:
                parts.add(label_rows(chunk, info, run))
    return parts


def _order(df: pd.DataFrame) -> pd.DataFrame:
    from sam_ft.evaluation.reports.study import _order

    return _order(df) if not df.empty else df


def study_tables_streamed(
    parts: StudyParts, boot: Bootstrap
) -> tuple[dict[str, pd.DataFrame], pd.DataFrame]:
    """``study.study_tables`` one partition at a time (see the module docstring), and
    ``by_prompt``: the pooled Dice per (model size, setting, prompt) for the figure."""
    from sam_ft.evaluation.reports.study import _paired, _with_holm, pooled

    base = ["model_size", "setting"]
    task_keys = [*base, "modality", "task", "prompt"]
    pieces: dict[str, list[pd.DataFrame]] = {
        k: [] for k in ("task", "modality", "object", "levels", "by_prompt")
    }
    for _, rows in parts.plain():
        pieces["task"].append(with_case_level(pooled(rows, task_keys, boot), rows, task_keys, boot))
        pieces["modality"].append(pooled(rows, [*base, "modality", "prompt"], boot))
        pieces["object"].append(pooled(rows, [*base, "modality", "object", "prompt"], boot))
        pieces["levels"].append(aggregation_levels(rows, [*base, "prompt"], boot))
        pieces["by_prompt"].append(pooled(rows, [*base, "prompt"]))
    if not pieces["task"]:
        raise SamFtError("the study has no rows without jitter (jitter=none)")
    tables = {k: _order(pd.concat(pieces[k], ignore_index=True)) for k in ("task", "modality")}
    tables["object"] = _order(pd.concat(pieces["object"], ignore_index=True))
    levels = pd.concat(pieces["levels"], ignore_index=True)
    tables["levels"] = sort_table(levels, by=("model_size", "setting", "prompt"))
    by_prompt = _order(pd.concat(pieces["by_prompt"], ignore_index=True))

    plain = [k for k in parts.files if k[3]]
    sizes = sorted({k[0] for k in parts.files})
    settings = sorted({k[1] for k in parts.files} - {BASELINE_MODEL})

    def compare(column: str, a: str, b: str, by: list[str]) -> pd.DataFrame:
        at = 0 if column == "model_size" else 1
        found = []
        for key in [k for k in plain if k[at] == b]:
            other = (a, *key[1:]) if at == 0 else (key[0], a, *key[2:])
            if other not in parts.files:
                continue
            rows = pd.concat([parts.load(other), parts.load(key)], ignore_index=True)
            found.append(_paired(rows, column, a, b, by, boot))
        found = [f for f in found if not f.empty]
        table = _order(pd.concat(found, ignore_index=True)) if found else pd.DataFrame()
        return table.assign(comparison=f"{b} vs {a}")

    tables["models"] = _with_holm(
        [
            compare("model_size", a, b, ["setting", "prompt"])
            for i, a in enumerate(sizes)
            for b in sizes[i + 1 :]
        ]
    )
    tables["finetune"] = _with_holm(
        [compare("setting", BASELINE_MODEL, s, ["model_size", "prompt"]) for s in settings]
    )
    return tables, by_prompt
