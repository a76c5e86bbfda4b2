"""Inference over cases: bootstrap confidence intervals, paired comparisons, Holm's correction.

The unit is the case (a volume, or a 2D image), never the object: the objects of one case are
scored on the same image and are correlated. A mean over objects (the summary's) is written as
the ratio ``sum over cases of the case's object sum / sum over cases of its object count``, and
its CI resamples cases with ``scipy.stats.bootstrap`` (``paired=True`` over the per-case sums
and counts, so both come from the same resampled cases); with one object per case it is the
ordinary bootstrap of the mean. A case is ``task/case`` (case ids of different tasks may repeat).

A paired comparison (B vs A on the same objects) takes the objects both scored; its mean
difference is the mean over those objects (the difference of the two means), its CI is the same
case bootstrap, and its p-value is ``scipy.stats.wilcoxon`` over the per-case mean differences.
Cases scored on one side only are left out, and named.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
from scipy import stats

from sam_ft.errors import ConfigError
from sam_ft.evaluation.protocol.order import BASELINE_MODEL, sort_table

CLUSTER = "_cluster"
"""Column of the case a row belongs to (``task/case``), kept when rows are pooled over tasks."""
METHODS = ("BCa", "percentile", "basic")
CI_SETTINGS = ("ci_method", "ci_level", "ci_resamples", "ci_seed")
"""The columns of :meth:`Bootstrap.columns`."""
BATCH = 500
"""Resamples per vectorised call: bounds memory to BATCH x cases floats (also the jackknife of
BCa); a fixed part of the method, as the seed."""


@dataclass(frozen=True)
class Bootstrap:
    """``eval.bootstrap``: ``scipy.stats.bootstrap`` settings of every CI."""

    resamples: int
    seed: int
    method: str
    confidence: float

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any], name: str = "eval.bootstrap") -> Bootstrap:
        """Checked settings from a mapping with exactly these four keys."""
        keys = {"resamples", "seed", "method", "confidence"}
        if set(cfg) != keys:
            raise ConfigError(f"{name} needs exactly the keys {sorted(keys)}, got {sorted(cfg)}")
        try:
            resamples, seed = int(cfg["resamples"]), int(cfg["seed"])
            out = cls(resamples, seed, str(cfg["method"]), float(cfg["confidence"]))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{name}: {err}") from None
        if out.resamples < 100:
            raise ConfigError(f"{name}.resamples must be >= 100, got {out.resamples}")
        if out.method not in METHODS:
            raise ConfigError(f"{name}.method must be one of {METHODS}, got {out.method!r}")
        if not 0.5 <= out.confidence < 1:
            raise ConfigError(f"{name}.confidence must be in [0.5, 1), got {out.confidence}")
        return out

    def columns(self) -> dict[str, Any]:
        """The settings as the table columns that state them beside the CIs (``ci_*``)."""
        return {
            "ci_method": self.method,
            "ci_level": self.confidence,
            "ci_resamples": self.resamples,
            "ci_seed": self.seed,
        }

    def describe(self) -> str:
        """One line for the tables: what the CIs are."""
        return (
            f"{round(self.confidence * 100)}% CI: scipy.stats.bootstrap over cases "
            f"({self.method}, {self.resamples} resamples, seed {self.seed})"
        )


def exact_mean(values: Any) -> float:
    """The mean of the non-NaN ``values`` (numbers, or text read as numbers) as
    ``math.fsum(values) / count``: the sum is correctly rounded, so the mean is the same float
    for any order or grouping of the rows (one table or its partitions, one process or shards);
    NaN when there is none."""
    v = _numbers(values)
    return math.fsum(v.tolist()) / len(v) if len(v) else float("nan")


def exact_std(values: Any) -> float:
    """The population standard deviation (ddof=0) of the non-NaN ``values`` around
    :func:`exact_mean`, its squared deviations summed with ``math.fsum``."""
    v = _numbers(values)
    if not len(v):
        return float("nan")
    mean = math.fsum(v.tolist()) / len(v)
    return math.sqrt(math.fsum(((v - mean) ** 2).tolist()) / len(v))


def _numbers(values: Any) -> np.ndarray:
    """The values as floats (text parsed, unparsable as NaN), NaN left out."""
    if isinstance(values, np.ndarray) and values.dtype.kind == "f":
        v = values.astype(float, copy=False)
    else:
        v = pd.to_numeric(pd.Series(values), errors="coerce").to_numpy(float)
    return v[~np.isnan(v)]


def ratio_of_sums(sums: np.ndarray, counts: np.ndarray, axis: int = -1) -> np.ndarray:
    """The mean over objects of the given cases: sum of sums / sum of counts (vectorised)."""
    return np.sum(sums, axis=axis) / np.sum(counts, axis=axis)


def bootstrap_ci(sums: np.ndarray, counts: np.ndarray, opts: Bootstrap) -> tuple[float, float]:
    """CI of :func:`ratio_of_sums` resampling cases: (n,) per-case sums and object counts.

    Two cases are needed (NaN otherwise); when every case has the same mean, every resample has
    it too and the CI is that value (scipy's BCa would give NaN for such degenerate data).
    """
    sums, counts = np.asarray(sums, float), np.asarray(counts, float)
    if len(sums) < 2:
        return float("nan"), float("nan")
    means = sums / counts
    if np.all(means == means[0]):
        return float(means[0]), float(means[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.DegenerateDataWarning)
        res = stats.bootstrap(
            (sums, counts),
            ratio_of_sums,
            n_resamples=opts.resamples,
            batch=BATCH,
            vectorized=True,
            paired=True,
            confidence_level=opts.confidence,
            method=opts.method,
            rng=np.random.default_rng(opts.seed),
        )
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def cluster_ids(rows: pd.DataFrame) -> pd.Series:
    """Each row's case, ``task/case`` (its :data:`CLUSTER` column when rows were pooled)."""
    if CLUSTER in rows:
        return rows[CLUSTER].astype(str)
    task = rows["task"].astype(str) if "task" in rows else ""
    return task + "/" + rows["case"].astype(str)


def case_totals(values: pd.Series, clusters: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """Per case (sorted by id: the same arrays whatever the row order, so shards and DDP give
    the statistics of one process): the sum and the count of its non-NaN ``values``; cases
    without any value are left out."""
    v = pd.to_numeric(values, errors="coerce").to_numpy(float)
    c = clusters.astype(str).to_numpy()
    ok = ~np.isnan(v)
    # Sorted by case then value: float sums do not depend on the order rows arrived in.
    order = np.lexsort((v[ok], c[ok]))
    v, c = v[ok][order], c[ok][order]
    names, start, counts = np.unique(c, return_index=True, return_counts=True)
    return np.add.reduceat(v, start) if len(v) else v, counts.astype(float)


def mean_ci(values: pd.Series, clusters: pd.Series, opts: Bootstrap) -> tuple[float, float]:
    """CI of the mean over objects of ``values`` (NaN skipped), resampling cases."""
    return bootstrap_ci(*case_totals(values, clusters), opts)


def add_intervals(
    summary: pd.DataFrame, rows: pd.DataFrame, keys: Sequence[str], opts: Bootstrap
) -> pd.DataFrame:
    """``summary`` (one row per ``keys`` group of ``rows``) with ``n_cases`` and, for every
    ``<metric>_mean`` column whose ``<metric>`` is a column of ``rows``,
    ``<metric>_ci_low`` and ``<metric>_ci_high`` appended (NaN values of a metric skipped), then
    the bootstrap settings (:meth:`Bootstrap.columns`)."""
    keys = list(keys)
    metrics = [c[: -len("_mean")] for c in summary if c.endswith("_mean") and c[:-5] in rows]
    rows = rows.assign(**{CLUSTER: cluster_ids(rows)})
    found: dict[tuple, dict[str, float]] = {}
    for key, group in rows.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        row = {"n_cases": group[CLUSTER].nunique()}
        for m in metrics:
            row[f"{m}_ci_low"], row[f"{m}_ci_high"] = mean_ci(group[m], group[CLUSTER], opts)
        found[tuple(map(str, key))] = row
    index = [tuple(map(str, k)) for k in summary[keys].itertuples(index=False)]
    extra = pd.DataFrame([found[k] for k in index], index=summary.index)
    out = summary.copy()
    for column in extra:
        out[column] = extra[column].astype(int if column == "n_cases" else float)
    for column, value in opts.columns().items():
        out[column] = value
    return out


def wilcoxon_p(differences: np.ndarray) -> float:
    """Two-sided ``scipy.stats.wilcoxon`` p-value of per-case differences (its defaults: zero
    differences dropped); NaN when no difference is non-zero."""
    d = np.asarray(differences, float)
    if not np.any(d != 0):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # small samples: scipy notes its exact/normal switch
        return float(stats.wilcoxon(d).pvalue)


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values over one family (NaN entries are not tests)."""
    p = np.asarray(p_values, float)
    out = np.full(p.shape, np.nan)
    tested = np.flatnonzero(~np.isnan(p))
    m = len(tested)
    order = tested[np.argsort(p[tested], kind="stable")]
    running = 0.0
    for i, k in enumerate(order):
        running = max(running, min(1.0, (m - i) * p[k]))
        out[k] = running
    return out


PAIRED_COLUMNS = [
    "n_cases", "n_objects", "mean_a", "mean_b", "delta", "delta_ci_low", "delta_ci_high",
    "p_value", "left_out",
]  # fmt: skip


def paired(a: pd.DataFrame, b: pd.DataFrame, on: Sequence[str], metric: str, opts: Bootstrap):
    """B vs A on the objects both scored (joined on ``on``, which identifies an object within
    a side): a dict of :data:`PAIRED_COLUMNS` (``left_out``: the cases of only one side, ``;``
    separated)."""
    on = list(on)
    left = a.assign(**{CLUSTER: cluster_ids(a)})[[*on, CLUSTER, metric]]
    right = b.assign(**{CLUSTER: cluster_ids(b)})[[*on, CLUSTER, metric]]
    pairs = left.merge(right, on=[*on, CLUSTER], suffixes=("_a", "_b"))
    va = pd.to_numeric(pairs[f"{metric}_a"], errors="coerce")
    vb = pd.to_numeric(pairs[f"{metric}_b"], errors="coerce")
    ok = va.notna() & vb.notna()
    clusters = pairs.loc[ok, CLUSTER]
    sums, counts = case_totals(vb[ok] - va[ok], clusters)
    low, high = bootstrap_ci(sums, counts, opts)
    paired_cases = set(clusters)
    left_out = sorted((set(left[CLUSTER]) | set(right[CLUSTER])) - paired_cases)
    n = int(ok.sum())
    return {
        "n_cases": len(paired_cases),
        "n_objects": n,
        "mean_a": exact_mean(va[ok]),
        "mean_b": exact_mean(vb[ok]),
        "delta": exact_mean(vb[ok] - va[ok]),
        "delta_ci_low": low,
        "delta_ci_high": high,
        "p_value": wilcoxon_p(sums / counts) if n else float("nan"),
        "left_out": ";".join(left_out),
    }


OBJECT_KEYS = ["task", "case", "slice", "label"]
"""What identifies an object within one (model, prompt, jitter) of ``per_object.csv``."""


def comparison_table(rows: pd.DataFrame, opts: Bootstrap, metric: str = "dice") -> pd.DataFrame:
    """The paired comparisons of one evaluation (``comparisons.csv``), per task:

    - ``family="model"``: each finetuned model (B) vs zero-shot (A), per prompt and jitter;
    - ``family="prompt"``: each prompt (B) vs the box (A), per model and jitter.

    Columns ``family, model, task, prompt, jitter, a, b`` then :data:`PAIRED_COLUMNS` and
    ``p_holm``: Holm's correction over the comparisons of one family (one table of
    ``summary.md``). ``rows``: per-object rows (``model, task, case, slice, label, prompt,
    jitter`` and ``metric``).
    """
    return finish_comparisons(comparison_rows(rows, opts, metric), opts, metric)


COMPARISON_KEYS = ["family", "model", "task", "prompt", "jitter", "a", "b"]


def comparison_rows(rows: pd.DataFrame, opts: Bootstrap, metric: str = "dice") -> list[dict]:
    """The records of :func:`comparison_table` found in ``rows`` (each comparison needs only
    its two groups: the rows of a pair of partitions give its records), before Holm's
    correction."""
    rows = rows.assign(jitter=rows["jitter"].astype(str) if "jitter" in rows else "none")
    on = [k for k in OBJECT_KEYS if k in rows]
    out = []
    groups = dict(list(rows.groupby(["model", "task", "prompt", "jitter"], sort=False)))
    for (model, task, prompt, jitter), b in groups.items():
        base = groups.get((BASELINE_MODEL, task, prompt, jitter))
        if model != BASELINE_MODEL and base is not None:
            result = paired(base, b, on, metric, opts)
            out.append(("model", model, task, prompt, jitter, BASELINE_MODEL, model, result))
        box = groups.get((model, task, "box", jitter))
        if prompt != "box" and box is not None:
            result = paired(box, b, on, metric, opts)
            out.append(("prompt", model, task, prompt, jitter, "box", prompt, result))
    return [dict(zip(COMPARISON_KEYS, r[:-1], strict=True)) | r[-1] for r in out]


def finish_comparisons(records: list[dict], opts: Bootstrap, metric: str = "dice") -> pd.DataFrame:
    """:func:`comparison_table` from its records: Holm's correction within each family, the
    metric and the bootstrap settings, in table order."""
    table = pd.DataFrame(records, columns=[*COMPARISON_KEYS, *PAIRED_COLUMNS])
    table["p_holm"] = np.nan
    for _, family in table.groupby("family", sort=False):
        table.loc[family.index, "p_holm"] = holm(family["p_value"])
    table["metric"] = metric
    table = table.assign(**opts.columns())
    return sort_table(table, by=("family", "model", "task", "prompt", "jitter"))
