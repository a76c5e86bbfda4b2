"""A partition's rows on disk: DataFrames appended to one file and read back in order.

The streamed reports (:mod:`~sam_ft.evaluation.reports.summary_parts` for one evaluation,
:mod:`~sam_ft.evaluation.reports.study_parts` for a study) read their tables in chunks and append
each chunk's rows of a partition to that partition's file, so only one partition is held at a
time. The files are temporary and written by this process only (pickle: DataFrames with their
dtypes, read back exactly).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pandas as pd


def append_rows(path: Path, rows: pd.DataFrame) -> None:
    """Append ``rows`` to the partition file ``path`` (created on first use)."""
    with open(path, "ab") as f:
        pickle.dump(rows, f, protocol=pickle.HIGHEST_PROTOCOL)


def read_rows(path: Path) -> pd.DataFrame:
    """Every row appended to ``path``, in the order appended."""
    frames = []
    with open(path, "rb") as f:
        while True:
            try:
                frames.append(pickle.load(f))
            except EOFError:
                break
    return pd.concat(frames, ignore_index=True)
