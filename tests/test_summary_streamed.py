"""The summary streamed (issue #28): ``write_report`` reads ``per_object.csv`` in chunks into
partitions on disk and computes each table one partition (or pair) at a time; its files are the
bytes of the tables computed from the whole table, and its peak memory stays far below the
table's size."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest

from sam_ft.evaluation.metrics.attributes import spearman_table
from sam_ft.evaluation.protocol.options import eval_options
from sam_ft.evaluation.protocol.tables import PER_OBJECT_COLUMNS, read_table
from sam_ft.evaluation.reports import summary_parts
from sam_ft.evaluation.reports.calibration import calibration_table
from sam_ft.evaluation.reports.statistics import CLUSTER, cluster_ids, comparison_table
from sam_ft.evaluation.reports.summary import REPORT_ATTRIBUTES, write_report
from sam_ft.evaluation.reports.summary_tables import (
    no_jitter,
    pooled_summary,
    sort_rows,
    summarize,
    summarize_by_label,
)

OPTIONS = {"bootstrap": {"resamples": 100, "seed": 5, "method": "percentile", "confidence": 0.9}}
MODELS = ("zero_shot", "finetuned", "lora")
PROMPTS = ("point1", "box")


def _table(
    path, cases: int, slices: int, tasks=("liver", "kidney"), prompts=PROMPTS, seed: int = 0
) -> pd.DataFrame:
    """A ``per_object.csv`` of the engine's columns in its row order: every model, task, case,
    slice, label (2), prompt and jitter level (``none``, ``0-10``); some HD95 missing, one model
    missing a case, 2D images in pixels beside volumes in mm."""
    rng = np.random.default_rng(seed)
    keys = pd.MultiIndex.from_product(
        [list(MODELS), list(tasks), [f"c{c:04d}" for c in range(cases)], range(slices), [1, 2],
         list(prompts), ["none", "0-10"]],
        names=["model", "task", "case", "slice", "label", "prompt", "jitter"],
    ).to_frame(index=False)  # fmt: skip
    keys = keys[~((keys["model"] == "lora") & (keys["case"] == "c0001"))].reset_index(drop=True)
    n = len(keys)
    dice = rng.random(n)
    missing = rng.random(n) < 0.1
    df = keys.assign(
        name=np.where(keys["label"] == 1, "organ", "lesion"), dice=dice, iou=dice / (2 - dice),
        hd95=np.where(missing, np.nan, rng.random(n) * 20), hd95_missing=missing,
        nsd=rng.random(n), hd=rng.random(n) * 30, asd=rng.random(n), conformity=rng.random(n),
        empty_pred=False, mask_index=np.where(rng.random(n) < 0.05, -1, 1),
        pred_iou=rng.random(n), area_px=rng.integers(10, 500, n), aspect_ratio=rng.random(n) + 1,
        boundary_complexity=rng.random(n) + 1, contrast=rng.random(n), modality="CT",
        patient=keys["case"], distance_unit=np.where(keys["task"] == "kidney", "px", "mm"),
        dice_oracle=dice + 0.05, dice_top_iou=dice,
    ).reindex(columns=PER_OBJECT_COLUMNS)  # fmt: skip
    df.to_csv(path, index=False)
    return df


# 7: chunks cut groups everywhere, one partition per batch, comparisons pair by pair; 100: a
# few partitions per batch; 50_000 (the default): the whole table in one batch.
@pytest.mark.parametrize("chunk_rows", [7, 100, 50_000])
def test_streamed_report_has_the_bytes_of_the_whole_table(tmp_path, monkeypatch, chunk_rows):
    path = tmp_path / "per_object.csv"
    _table(path, cases=3, slices=1)
    options = eval_options(OPTIONS)
    monkeypatch.setattr(summary_parts, "CHUNK_ROWS", chunk_rows)
    streamed = write_report(tmp_path / "streamed", path, options=options, seed=1)
    assert not list((tmp_path / "streamed").glob(".summary-parts-*"))  # removed after use

    # The tables from the whole table, as one DataFrame, with the functions that compute them.
    rows = read_table(path, PER_OBJECT_COLUMNS)
    boot = options.bootstrap
    pooled = rows.assign(**{CLUSTER: cluster_ids(rows)}, task="all")
    whole = {
        "summary.csv": summarize(rows, boot),
        "summary_label.csv": summarize_by_label(rows, boot),
        "comparisons.csv": pd.concat(
            [comparison_table(rows, boot), comparison_table(pooled, boot)]
        ),
        "calibration.csv": calibration_table(rows, boot),
        "spearman.csv": sort_rows(
            spearman_table(no_jitter(rows), "dice", REPORT_ATTRIBUTES, by=["model", "prompt"])
        ),
    }
    for name, table in whole.items():
        assert (tmp_path / "streamed" / name).read_text() == table.to_csv(index=False), name
    pd.testing.assert_frame_equal(streamed.pooled, pooled_summary(rows, boot))
    # Both families (2 models x 2 prompts, 3 models x 1 prompt), each jitter, tasks and pooled.
    assert len(streamed.comparisons) == (2 * 2 + 3) * 2 * 3

    md = (tmp_path / "streamed" / "summary.md").read_text()
    objects = 2 * 3 * 1 * 2  # tasks x cases x slices x labels
    assert f"{objects} objects in 6 case(s), each scored by 3 model(s) x 4 prompt" in md
    assert f"({len(rows)} rows)" in md


def _peak(folder, **table) -> tuple[int, int]:
    """(peak traced bytes of ``write_report`` on a generated ``per_object.csv``, the bytes
    of that table as one DataFrame)."""
    folder.mkdir()
    path = folder / "per_object.csv"
    prompts = ("everything", "point1", "box")
    size = _table(path, tasks=("liver",), prompts=prompts, **table).memory_usage(deep=True).sum()
    tracemalloc.start()
    try:
        write_report(folder / "eval", path, options=eval_options(OPTIONS), seed=1)
        return tracemalloc.get_traced_memory()[1], size
    finally:
        tracemalloc.stop()


@pytest.mark.heavy  # ~40-90 s: tracemalloc slows every allocation of the report's statistics
def test_report_memory_stays_far_below_the_table(tmp_path, monkeypatch):
    # Chunks far smaller than the table, as 50k rows are beside a task's millions.
    monkeypatch.setattr(summary_parts, "CHUNK_ROWS", 1000)
    fixed, _ = _peak(tmp_path / "small", cases=1, slices=1)
    peak, size = _peak(tmp_path / "big", cases=80, slices=15)
    # One (model, prompt, jitter) partition is 1/18 of the rows; a comparison holds two.
    grown = peak - fixed
    figures = (
        f"peak {fixed / 2**20:.1f} MiB + {grown / 2**20:.1f} MiB for a {size / 2**20:.1f} MiB table"
    )
    print(figures)  # BENCHMARKS.md "One evaluation's summary"
    assert grown < size / 4, figures


def test_report_without_unjittered_rows_has_the_empty_tables_of_the_whole_table(tmp_path):
    table = _table(tmp_path / "per_object.csv", cases=2, slices=1, tasks=("liver",))
    jittered = table[table["jitter"] != "none"].reset_index(drop=True)
    options = eval_options(OPTIONS)
    report = write_report(tmp_path / "eval", jittered, options=options)
    assert report.calibration.empty and report.spearman.empty
    whole = {
        "calibration.csv": calibration_table(jittered, options.bootstrap),
        "spearman.csv": sort_rows(
            spearman_table(no_jitter(jittered), "dice", REPORT_ATTRIBUTES, by=["model", "prompt"])
        ),
    }
    for name, expected in whole.items():
        assert (tmp_path / "eval" / name).read_text() == expected.to_csv(index=False), name
