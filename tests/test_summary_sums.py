"""The summaries' means (issue #28): one correctly rounded sum per mean (``math.fsum``), so a
mean is the same float whatever the rows' order or grouping, as partitions, shards and ranks
deliver them; the references are computed here with ``math.fsum`` over each group's values."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from sam_ft.evaluation.reports.calibration import calibration_table
from sam_ft.evaluation.reports.statistics import Bootstrap, comparison_table
from sam_ft.evaluation.reports.summary_tables import pooled_summary, summarize

BOOT = Bootstrap(resamples=100, seed=3, method="percentile", confidence=0.9)


def _rows(seed: int = 0) -> pd.DataFrame:
    """Two models x two tasks x two prompts on the same objects; values of mixed magnitude,
    whose float sum depends on the order it is taken in."""
    rng = np.random.default_rng(seed)
    rows = []
    for task in ("liver", "kidney"):
        for c in range(6):
            for label in (1, 2, 3):
                for model in ("zero_shot", "finetuned"):
                    for prompt in ("box", "point1"):
                        dice = float(rng.uniform(0, 1) * 10.0 ** -rng.integers(0, 9))
                        rows.append(
                            {"model": model, "task": task, "case": f"c{c}", "slice": 2,
                             "label": label, "prompt": prompt, "jitter": "none", "dice": dice,
                             "iou": dice / (2 - dice), "hd95": float(rng.uniform(0, 30)),
                             "nsd": float(rng.uniform(0, 1)), "pred_iou": float(rng.uniform()),
                             "distance_unit": "mm"}
                        )  # fmt: skip
    return pd.DataFrame(rows)


def _mean(values) -> float:
    values = [float(v) for v in values if not math.isnan(float(v))]
    return math.fsum(values) / len(values)


def test_summary_means_are_fsum_means_in_any_row_order():
    rows = _rows()
    summary = summarize(rows)
    for r in summary.itertuples(index=False):
        group = rows[
            (rows["model"] == r.model) & (rows["task"] == r.task) & (rows["prompt"] == r.prompt)
        ]
        assert r.n == len(group)
        for metric in ("dice", "iou", "hd95", "nsd"):
            assert getattr(r, f"{metric}_mean") == _mean(group[metric])
        mean = _mean(group["dice"])
        std = math.sqrt(math.fsum((v - mean) ** 2 for v in group["dice"]) / len(group))
        assert r.dice_std == std
    for seed in (1, 2, 3):
        shuffled = rows.sample(frac=1.0, random_state=seed)
        pd.testing.assert_frame_equal(summarize(shuffled), summary)
        pd.testing.assert_frame_equal(pooled_summary(shuffled), pooled_summary(rows))
    pooled = pooled_summary(rows)
    for r in pooled.itertuples(index=False):
        group = rows[(rows["model"] == r.model) & (rows["prompt"] == r.prompt)]
        assert r.task == "all" and r.dice_mean == _mean(group["dice"])


def test_paired_and_calibration_means_are_fsum_means():
    rows = _rows(1)
    table = comparison_table(rows, BOOT)
    for r in table.itertuples(index=False):
        key = ["task", "case", "slice", "label"]
        # model family: zero-shot (a) vs the model, one prompt; prompt family: the box (a) vs
        # the prompt, one model.
        model_a, prompt_a = (r.a, r.prompt) if r.family == "model" else (r.model, r.a)
        a = rows[(rows["model"] == model_a) & (rows["prompt"] == prompt_a)]
        b = rows[(rows["model"] == r.model) & (rows["prompt"] == r.prompt)]
        a, b = a[a["task"] == r.task], b[b["task"] == r.task]
        pairs = a.merge(b, on=key, suffixes=("_a", "_b"))
        assert r.mean_a == _mean(pairs["dice_a"]) and r.mean_b == _mean(pairs["dice_b"])
        assert r.delta == _mean(pairs["dice_b"] - pairs["dice_a"])
    calibration = calibration_table(rows, BOOT)
    for r in calibration.itertuples(index=False):
        g = rows[(rows["model"] == r.model) & (rows["prompt"] == r.prompt)]
        assert r.pred_iou_mean == _mean(g["pred_iou"]) and r.iou_mean == _mean(g["iou"])
        assert r.mace == _mean((g["pred_iou"] - g["iou"]).abs())
    shuffled = rows.sample(frac=1.0, random_state=5)
    pd.testing.assert_frame_equal(comparison_table(shuffled, BOOT), table)
    pd.testing.assert_frame_equal(calibration_table(shuffled, BOOT), calibration)
