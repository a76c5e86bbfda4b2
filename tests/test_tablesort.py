"""Streamed tables (issue #28): the external merge sort writes the bytes of the whole-table pandas
path (``sort_table(read_table(...)).to_csv``), for one table, merged shares and the resume filter,
over many sorted runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sam_ft.evaluation.protocol.order import sort_table
from sam_ft.evaluation.protocol.tables import PER_OBJECT_COLUMNS, drop_unfinished, read_table
from sam_ft.evaluation.protocol.tablesort import write_sorted


def _rows(seed: int, n: int) -> pd.DataFrame:
    """Rows in the engine's columns with what makes CSV round trips hard: ids with leading
    zeros, jitter levels whose text order is not their order, an unknown prompt, NaN in int
    and bool columns in some rows only, repeated keys (the sort must be stable)."""
    rng = np.random.default_rng(seed)
    df = pd.DataFrame(
        {
            "model": rng.choice(["zero_shot", "lora", "full"], n),
            "task": rng.choice(["liver", "brain"], n),
            "case": rng.choice(["007", "010", "7", "a_1"], n),
            "slice": rng.integers(0, 4, n),
            "label": rng.integers(1, 3, n),
            "name": "organ, left",  # a comma: quoted by pandas
            "prompt": rng.choice(["box", "point1", "everything", "mine"], n),
            "jitter": rng.choice(["none", "5-10", "10-20", "0-5"], n),
            "dice": rng.random(n) / 3,
            "hd95": np.where(rng.random(n) < 0.2, np.nan, rng.random(n) * 40),
            "hd95_missing": rng.random(n) < 0.2,
            "mask_index": rng.integers(-1, 3, n),
            "pred_iou": rng.random(n).astype(np.float32).astype(float),
        }
    )
    return df.reindex(columns=[c for c in PER_OBJECT_COLUMNS if c in df] + ["extra"])


def _append(path: Path, parts: list[pd.DataFrame]) -> None:
    """As the engine appends: one ``to_csv`` per case, each with its own dtypes."""
    for i, part in enumerate(parts):
        part = part.copy()
        if i == 1:  # this case has a missing int: its slice column is written as floats
            part["slice"] = part["slice"].astype(object)
            part.loc[part.index[0], "slice"] = None
        if i == 2:  # and this one lacks every HD95 (an all-NaN chunk)
            part["hd95"] = np.nan
            part["hd95_missing"] = None
        part.to_csv(path, mode="a", header=not path.exists(), index=False)


def _whole(paths: list[Path]) -> bytes:
    parts = [read_table(p, PER_OBJECT_COLUMNS) for p in paths]
    return sort_table(pd.concat(parts, ignore_index=True)).to_csv(index=False).encode()


@pytest.mark.parametrize("chunk_rows", [7, 64, 10_000])
def test_sorted_table_has_the_bytes_of_the_whole_table_path(tmp_path, chunk_rows):
    path = tmp_path / "per_object.csv"
    _append(path, [_rows(s, 40) for s in range(5)])
    want = _whole([path])
    stale = tmp_path / ".per_object.csv.runs-999999999-abc"  # a killed writer's runs
    stale.mkdir()
    (stale / "run000000.pkl").write_bytes(b"x")
    assert write_sorted([path], path, chunk_rows=chunk_rows) == 200
    assert path.read_bytes() == want
    assert b",,," in want and b"007" in want and b"1.0," in want  # NaN, ids, int->float kept
    assert not list(tmp_path.glob(".*"))  # the runs are removed


def test_merged_shares_equal_the_concatenated_sort(tmp_path):
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"share{k}.csv")
        _append(paths[-1], [_rows(10 * k + s, 30) for s in range(3)])
    want = _whole(paths)
    assert write_sorted(paths, tmp_path / "merged.csv", chunk_rows=11) == 270
    assert (tmp_path / "merged.csv").read_bytes() == want


def test_resume_filter_streams_and_keeps_an_untouched_file(tmp_path):
    path = tmp_path / "per_object.csv"
    _append(path, [_rows(s, 25) for s in range(4)])
    table = read_table(path, PER_OBJECT_COLUMNS)
    keys = {tuple(k) for k in table[["model", "task", "case"]].astype(str).to_numpy()}
    before = path.read_bytes()
    drop_unfinished(path, list(table.columns), keys)  # every case finished: nothing to do
    assert path.read_bytes() == before
    done = {k for k in keys if k[2] != "007"}
    drop_unfinished(path, list(table.columns), done)
    kept = table[table["case"] != "007"].reset_index(drop=True)
    assert path.read_bytes() == kept.to_csv(index=False).encode()
