"""Aggregation levels of a multi-task study, each labelled: a mean over objects pooled across
tasks (micro) lets the largest data set dominate; the mean of task means (macro) gives each task
one vote; the mean of case means gives each case one vote.

Every level's CI resamples cases (``scipy.stats.bootstrap``,
:mod:`sam_ft.evaluation.reports.statistics`); the macro CI recomputes each task's mean from the
resampled cases of that task (a task absent from a resample is left out of that resample's mean).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

from sam_ft.evaluation.protocol.order import sort_table
from sam_ft.evaluation.reports.statistics import (
    BATCH,
    Bootstrap,
    bootstrap_ci,
    case_totals,
    cluster_ids,
)

LEVELS = {
    "object": "object (micro: pooled over every object)",
    "case": "case (mean of case means)",
    "task": "task (macro: mean of task means)",
}


def _per_case(rows: pd.DataFrame, metric: str) -> pd.DataFrame:
    """One row per case: its task, the sum and count of its non-NaN ``metric`` values."""
    clusters = cluster_ids(rows)
    sums, counts = case_totals(rows[metric], clusters)
    task_of = rows.assign(_c=clusters).drop_duplicates("_c").set_index("_c")["task"]
    names = np.unique(clusters[pd.to_numeric(rows[metric], errors="coerce").notna()])
    return pd.DataFrame(
        {"task": task_of.reindex(names).astype(str).to_numpy(), "sum": sums, "count": counts}
    )


def macro_ci(tasks: np.ndarray, sums: np.ndarray, counts: np.ndarray, opts: Bootstrap):
    """CI of the mean of task means, resampling cases: (n,) task index, sum, count per case."""
    k = int(tasks.max()) + 1 if len(tasks) else 0
    if len(sums) < 2 or k == 0:
        return float("nan"), float("nan")

    def statistic(t, s, c, axis=-1):
        means = []
        for task in range(k):
            hit = t == task
            with np.errstate(invalid="ignore", divide="ignore"):
                means.append(np.sum(s * hit, axis=axis) / np.sum(c * hit, axis=axis))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a task missing from a resample
            return np.nanmean(np.stack(means), axis=0)

    case_means = sums / counts
    if np.all(case_means == case_means[0]):
        return float(case_means[0]), float(case_means[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            (tasks.astype(float), sums, counts), statistic, n_resamples=opts.resamples,
            batch=BATCH, vectorized=True, paired=True, confidence_level=opts.confidence,
            method=opts.method, rng=np.random.default_rng(opts.seed),
        )  # fmt: skip
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def aggregation_levels(
    rows: pd.DataFrame, by: Sequence[str], opts: Bootstrap, metric: str = "dice"
) -> pd.DataFrame:
    """Per ``by`` group, the mean of ``metric`` at each level of :data:`LEVELS` across tasks:
    ``[*by], level, n`` (objects, cases or tasks), ``tasks, <metric>_mean, <metric>_ci_low,
    <metric>_ci_high``."""
    out = []
    for key, group in rows.groupby(list(by), sort=False, dropna=False):
        key = dict(zip(by, key if isinstance(key, tuple) else (key,), strict=True))
        cases = _per_case(group, metric)
        if cases.empty:
            continue
        tasks = cases["task"].to_numpy()
        names, index = np.unique(tasks, return_inverse=True)
        sums, counts = cases["sum"].to_numpy(), cases["count"].to_numpy()
        means = sums / counts
        task_means = [sums[index == t].sum() / counts[index == t].sum() for t in range(len(names))]
        values = {
            "object": (
                sums.sum() / counts.sum(),
                int(counts.sum()),
                bootstrap_ci(sums, counts, opts),
            ),
            "case": (means.mean(), len(means), bootstrap_ci(means, np.ones_like(means), opts)),
            "task": (float(np.mean(task_means)), len(names), macro_ci(index, sums, counts, opts)),
        }
        for level, (mean, n, (low, high)) in values.items():
            out.append({**key, "level": LEVELS[level], "n": n, "tasks": len(names),
                        f"{metric}_mean": float(mean), f"{metric}_ci_low": low,
                        f"{metric}_ci_high": high})  # fmt: skip
    columns = [
        *by,
        "level",
        "n",
        "tasks",
        f"{metric}_mean",
        f"{metric}_ci_low",
        f"{metric}_ci_high",
    ]
    table = pd.DataFrame(out, columns=columns).assign(**opts.columns())
    return sort_table(table, by=("model_size", "setting", "prompt"))


def with_case_level(
    table: pd.DataFrame,
    rows: pd.DataFrame,
    by: Sequence[str],
    opts: Bootstrap,
    metric: str = "dice",
) -> pd.DataFrame:
    """``table`` (one row per ``by`` group of ``rows``, e.g. per task) with the mean of case
    means of ``metric`` and its CI: ``case_<metric>_mean``, ``case_<metric>_ci_low``,
    ``case_<metric>_ci_high``."""
    found = {}
    for key, group in rows.groupby(list(by), sort=False, dropna=False):
        cases = _per_case(group, metric)
        means = (cases["sum"] / cases["count"]).to_numpy()
        ci = bootstrap_ci(means, np.ones_like(means), opts)
        found[tuple(map(str, key if isinstance(key, tuple) else (key,)))] = (means.mean(), *ci)
    index = [tuple(map(str, k)) for k in table[list(by)].itertuples(index=False)]
    values = np.array([found.get(k, (np.nan,) * 3) for k in index], float).reshape(-1, 3)
    return table.assign(
        **{f"case_{metric}_mean": values[:, 0], f"case_{metric}_ci_low": values[:, 1],
           f"case_{metric}_ci_high": values[:, 2]}
    )  # fmt: skip
