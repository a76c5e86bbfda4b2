"""The tables of one evaluation's summary, from the per-object rows: the statistics per (model,
task, prompt, jitter), the click study's NoC and curves, the display tables (prompts side by
side, jitter robustness, Spearman rho, all metrics) and their Markdown.

Inputs are the evaluation engine's tables:

- ``per_object``: one row per (model, task, case, slice, label, prompt, jitter) with
  ``dice, iou, hd95, hd95_missing, nsd`` and attribute columns
  (``area_px, aspect_ratio, boundary_complexity, contrast, modality``).
- ``per_case``: the same per (model, task, case, label, prompt, jitter), scored in 3D.
- ``clicks`` (optional): ``model, task, case, slice, label, click, dice``, click = 1..N.

``model`` is ``zero_shot`` (the baseline) or a finetuned model name. Tables are ordered by model
(zero-shot first), task, prompt strategy S1..S6 and jitter level.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from sam_ft.evaluation.protocol.order import (
    BASELINE_MODEL,
    jitter_levels_sorted,
    sort_table,
)
from sam_ft.evaluation.reports.statistics import (
    CI_SETTINGS,
    CLUSTER,
    Bootstrap,
    add_intervals,
    cluster_ids,
    exact_mean,
    exact_std,
)

PROMPT_NAMES = {
    "everything": "S1 everything",
    "point1": "S2 1 point",
    "point5": "S3 5 points",
    "point5_neg5": "S4 5+5 points",
    "box": "S5 box",
    "box_point1": "S6 box+point",
}
SUMMARY_KEYS = ["model", "task", "prompt", "jitter"]
SCORE_COLUMNS = [
    "n", "dice_mean", "dice_std", "iou_mean", "hd95_mean", "nsd_mean", "hd_mean", "asd_mean",
    "conformity_mean",
]  # fmt: skip
"""The statistics of a summary row; ``sam-ft-report``'s merged table has the same ones."""
MEAN_METRICS = ("dice", "iou", "hd95", "nsd", "hd", "asd", "conformity")
"""The columns a summary row averages (``<metric>_mean``), each with :func:`exact_mean`."""
SUMMARY_COLUMNS = [*SUMMARY_KEYS, *SCORE_COLUMNS, "hd95_missing", "distance_unit"]
"""``distance_unit``: ``mm``, or ``px`` for 2D images without a spacing (HD95 and the NSD
tolerance are then in pixels); ``mm+px`` when a group mixes both."""


def sort_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Sort by model (zero-shot first), task, prompt S1..S6, jitter (numerically) where present."""
    return sort_table(df, by=("model", "task", "prompt", "jitter"))


def _missing_hd95(df: pd.DataFrame) -> pd.Series:
    """Bool per row: HD95 missing. CSV round trips may give strings; NaN HD95 also counts."""
    missing = df["hd95"].isna() if "hd95" in df else pd.Series(False, index=df.index)
    if "hd95_missing" in df:
        flag = df["hd95_missing"].map(lambda v: str(v).strip().lower() in ("true", "1", "1.0"))
        missing = missing | flag
    return missing


def summarize(per_object: pd.DataFrame, bootstrap: Bootstrap | None = None) -> pd.DataFrame:
    """Mean metrics per (model, task, prompt, jitter).

    Args:
        per_object: rows with at least ``model, task, prompt, dice, iou, hd95, nsd``; a missing
            ``jitter`` column means no jitter.
        bootstrap: when given, ``n_cases`` and the CI of every mean (``<metric>_ci_low``,
            ``<metric>_ci_high``, :func:`~sam_ft.evaluation.reports.statistics.add_intervals`) are
            appended.

    Returns:
        DataFrame with columns ``model, task, prompt, jitter, n, dice_mean, dice_std, iou_mean,
        hd95_mean, nsd_mean, hd95_missing, distance_unit``: ``dice_std`` is the population std
        (ddof=0, so one object gives 0), ``hd95_mean`` skips missing HD95 values and
        ``hd95_missing`` counts them; ``distance_unit`` is ``mm``, ``px`` or ``mm+px``.
    """
    df = per_object.copy()
    if "jitter" not in df:
        df["jitter"] = "none"
    df["hd95"] = pd.to_numeric(df["hd95"], errors="coerce")
    df["_missing"] = _missing_hd95(df)
    df.loc[df["_missing"], "hd95"] = np.nan
    _official_metric_columns(df)
    if "distance_unit" not in df:
        df["distance_unit"] = "mm"
    df["distance_unit"] = df["distance_unit"].fillna("mm").astype(str)
    grouped = df.groupby(SUMMARY_KEYS, sort=False, dropna=False)
    out = grouped.agg(n=("dice", "size"), hd95_missing=("_missing", "sum"))
    # One correctly rounded sum per mean: the same float whatever the rows' order or grouping
    # (pandas' own mean changes its summation with the number of groups and rows).
    members = _members(grouped.ngroup().to_numpy())
    for metric in MEAN_METRICS:
        values = pd.to_numeric(df[metric], errors="coerce").to_numpy(float)
        out[f"{metric}_mean"] = [exact_mean(values[rows]) for rows in members]
    dice = pd.to_numeric(df["dice"], errors="coerce").to_numpy(float)
    out["dice_std"] = [exact_std(dice[rows]) for rows in members]
    out["distance_unit"] = grouped["distance_unit"].agg(lambda u: "+".join(sorted(set(u))))
    out = out.reset_index()
    out["hd95_missing"] = out["hd95_missing"].astype(int)
    out = sort_rows(out[SUMMARY_COLUMNS])
    return out if bootstrap is None else add_intervals(out, df, SUMMARY_KEYS, bootstrap)


def _members(codes: np.ndarray) -> list[np.ndarray]:
    """The row positions of each group, by group number (``GroupBy.ngroup``'s, the order of
    the groupby's results)."""
    order = np.argsort(codes, kind="stable")
    bounds = np.flatnonzero(np.diff(codes[order])) + 1
    return np.split(order, bounds) if len(order) else []


def _official_metric_columns(df: pd.DataFrame) -> None:
    """HD, ASD and conformity (the official ``cal_matric.py``'s) as numbers, in place: HD and
    ASD missing where HD95 is (one mask empty); NaN columns for tables written without them."""
    for column in ("hd", "asd", "conformity"):
        df[column] = pd.to_numeric(df[column], errors="coerce") if column in df else np.nan
    df.loc[df["_missing"], ["hd", "asd"]] = np.nan


LABEL_KEYS = ["label", "name"]
LABEL_ORDER = ("model", "task", "label", "prompt", "jitter")
"""The row order of :func:`summarize_by_label`."""


def summarize_by_label(
    per_object: pd.DataFrame, bootstrap: Bootstrap | None = None
) -> pd.DataFrame:
    """:func:`summarize` per label value (target), as the official code reports each target
    (e.g. liver and tumour) on its own; ``summarize`` pools the objects of a task.

    Returns:
        :data:`SUMMARY_COLUMNS` with ``label`` and ``name`` after ``task`` (and the CIs of
        ``bootstrap``, over the cases of each target), sorted by model, task, label, prompt and
        jitter.
    """
    frames = []
    df = per_object.copy()
    if "name" not in df:
        df["name"] = ""
    for (label, name), rows in df.groupby(LABEL_KEYS, sort=False, dropna=False):
        part = summarize(rows, bootstrap)
        part.insert(2, "label", label)
        part.insert(3, "name", name)
        frames.append(part)
    if not frames:
        return pd.DataFrame(columns=[*SUMMARY_KEYS[:2], *LABEL_KEYS, *SUMMARY_COLUMNS[2:]])
    out = pd.concat(frames, ignore_index=True)
    return sort_table(out, by=LABEL_ORDER)


def _click_matrix(group: pd.DataFrame, object_keys: list[str]) -> pd.DataFrame:
    """Objects x clicks Dice; an object that stopped early keeps its last Dice afterwards."""
    matrix = group.pivot_table(index=object_keys, columns="click", values="dice", aggfunc="mean")
    return matrix.sort_index(axis=1).ffill(axis=1)


def noc(clicks: pd.DataFrame, thresholds: Sequence[float] = (0.85, 0.90)) -> pd.DataFrame:
    """Number of clicks to reach a Dice threshold (NoC@85, NoC@90) and Dice after each click.

    For each object, NoC@t is the first click whose Dice is >= t, or N (the last click) when it is
    never reached; the table gives the mean over objects, per (model, task).

    Args:
        clicks: ``model, task, case, slice, label, click, dice`` rows, click = 1..N.
        thresholds: Dice thresholds in [0, 1].

    Returns:
        DataFrame ``model, task, n, noc@85, noc@90, dice@1 .. dice@N`` (n = objects).
    """
    object_keys = [c for c in ("case", "slice", "label") if c in clicks]
    rows = []
    for (model, task), group in clicks.groupby(["model", "task"], sort=False):
        matrix = _click_matrix(group, object_keys)
        clicks_taken = matrix.columns.to_numpy()
        values = matrix.to_numpy(float)
        row: dict = {"model": model, "task": task, "n": len(matrix)}
        for t in thresholds:
            reached = values >= t
            first = np.where(
                reached.any(axis=1), clicks_taken[reached.argmax(axis=1)], clicks_taken.max()
            )
            row[f"noc@{round(t * 100)}"] = exact_mean(first)
        for click, column in zip(clicks_taken, values.T, strict=True):
            # NaN stays NaN (a click no object reached), as numpy's mean gave.
            row[f"dice@{int(click)}"] = math.fsum(column.tolist()) / len(column)
        rows.append(row)
    out = pd.DataFrame(rows)
    if out.empty:
        return out
    dice_cols = sorted((c for c in out if c.startswith("dice@")), key=lambda c: int(c[5:]))
    return sort_rows(out[[c for c in out if not c.startswith("dice@")] + dice_cols])


def click_curves(clicks: pd.DataFrame) -> pd.DataFrame:
    """Mean Dice after each click per model, over the objects of all tasks: ``model, click,
    dice_mean``."""
    object_keys = [c for c in ("task", "case", "slice", "label") if c in clicks]
    rows = []
    for model, group in clicks.groupby("model", sort=False):
        matrix = _click_matrix(group, object_keys)
        rows += [(model, int(k), exact_mean(matrix[k])) for k in matrix.columns]
    return sort_rows(pd.DataFrame(rows, columns=["model", "click", "dice_mean"]))


def _fmt(value, digits: int) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return "–" if np.isnan(value) else f"{value:.{digits}f}"
    return str(value).replace("|", "\\|")


def to_markdown(df: pd.DataFrame, digits: int = 3) -> str:
    """A GitHub Markdown table; floats with ``digits`` decimals, NaN as an en dash."""
    if df.empty:
        return "_(no rows)_\n"
    header = "| " + " | ".join(str(c) for c in df.columns) + " |"
    rule = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(_fmt(v, digits) for v in row) + " |" for row in df.itertuples(False)]
    return "\n".join([header, rule, *body]) + "\n"


def to_text(df: pd.DataFrame, digits: int = 3) -> str:
    """The same table as plain fixed-width text, for logs and terminals: no Markdown pipes, and
    never wrapped (a wrapped Markdown row in a SLURM log is unreadable)."""
    if df.empty:
        return "(no rows)\n"
    cells = [[str(c) for c in df.columns]]
    cells += [[_fmt(v, digits) for v in row] for row in df.itertuples(False)]
    widths = [max(len(r[i]) for r in cells) for i in range(len(df.columns))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines) + "\n"


def _signed(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:+.3f}"


def pooled_summary(per_object: pd.DataFrame, bootstrap: Bootstrap | None = None) -> pd.DataFrame:
    """Summary over the objects of all tasks together (task = ``all``; CIs resample the
    cases of every task)."""
    return summarize(per_object.assign(**{CLUSTER: cluster_ids(per_object)}, task="all"), bootstrap)


def with_ci(mean: float, low: float, high: float) -> str:
    """``0.812 [0.790, 0.834]``; the mean alone when its CI is NaN (fewer than 2 cases)."""
    if pd.isna(mean):
        return "–"
    if pd.isna(low) or pd.isna(high):
        return f"{mean:.3f}"
    return f"{mean:.3f} [{low:.3f}, {high:.3f}]"


def ci_cells(table: pd.DataFrame, metric: str) -> list[str]:
    """``<metric>_mean`` with its CI as text cells (the mean alone where no CI was computed)."""
    mean = table[f"{metric}_mean"]
    low = table.get(f"{metric}_ci_low", pd.Series(np.nan, index=table.index))
    high = table.get(f"{metric}_ci_high", pd.Series(np.nan, index=table.index))
    return [with_ci(*v) for v in zip(mean, low, high, strict=True)]


def signed_ci(delta: float, low: float, high: float) -> str:
    """``+0.050 [+0.021, +0.080]``; the difference alone when its CI is NaN."""
    if pd.isna(delta):
        return "–"
    if pd.isna(low) or pd.isna(high):
        return f"{delta:+.3f}"
    return f"{delta:+.3f} [{low:+.3f}, {high:+.3f}]"


def _p(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:.2g}" if value >= 1e-4 else f"{value:.1e}"


def prompt_table(summary: pd.DataFrame, comparisons: pd.DataFrame | None = None) -> pd.DataFrame:
    """Dice per (task, prompt) at no jitter, one column per model (mean [CI] when the
    summary has CIs, else mean ± std), and each other model minus zero-shot: with
    ``comparisons`` (:func:`~sam_ft.evaluation.reports.statistics.comparison_table`) the paired
    difference [CI], Holm-corrected Wilcoxon p and paired cases, else the difference of the
    means."""
    s = summary[summary["jitter"].astype(str) == "none"]
    models = list(dict.fromkeys(s["model"]))
    has_ci = "dice_ci_low" in s
    s = s.assign(
        cell=ci_cells(s, "dice")
        if has_ci
        else [
            "–" if pd.isna(a) else f"{a:.3f} ± {b:.3f}"
            for a, b in zip(s["dice_mean"], s["dice_std"], strict=True)
        ]
    )
    wide = s.pivot_table(index=["task", "prompt"], columns="model", values="dice_mean", sort=False)
    cells = s.pivot(index=["task", "prompt"], columns="model", values="cell").reindex(wide.index)
    out = pd.DataFrame(index=wide.index)
    label = "Dice [CI]" if has_ci else "Dice"
    for m in models:
        out[f"{m} {label}"] = cells[m].fillna("–").to_numpy()
    others = [m for m in models if m != BASELINE_MODEL] if BASELINE_MODEL in models else []
    for m in others:
        name = f"Δ {m} − {BASELINE_MODEL}"
        if comparisons is None or comparisons.empty:
            out[name] = [_signed(v) for v in wide[m] - wide[BASELINE_MODEL]]
            continue
        c = comparisons[(comparisons["family"] == "model") & (comparisons["model"] == m)]
        c = c[c["jitter"].astype(str) == "none"].set_index(["task", "prompt"]).reindex(wide.index)
        out[f"{name} [CI]"] = [
            signed_ci(*v)
            for v in zip(c["delta"], c["delta_ci_low"], c["delta_ci_high"], strict=True)
        ]
        out[f"p (Holm) {m}"] = [_p(v) for v in c["p_holm"]]
        out[f"paired cases {m}"] = ["–" if pd.isna(n) else str(int(n)) for n in c["n_cases"]]
    out = out.reset_index()
    out["prompt"] = out["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))
    return out


def _left_out(cases: str, shown: int = 4) -> str:
    """The cases of one side only, named when few (``task/case``), else counted."""
    names = [c for c in cases.split(";") if c]
    return ", ".join(names) if len(names) <= shown else f"{len(names)} cases"


def comparisons_view(comparisons: pd.DataFrame, family: str) -> pd.DataFrame:
    """One family of :func:`~sam_ft.evaluation.reports.statistics.comparison_table` for
    ``summary.md``: B vs A, paired Δ [CI], p, Holm's p, paired cases and those left out."""
    c = comparisons[comparisons["family"] == family]
    if c.empty:
        return pd.DataFrame()
    left = [_left_out(v) for v in c["left_out"].fillna("").astype(str)]
    view = pd.DataFrame(
        {
            "model": c["model"],
            "task": c["task"],
            **(
                {"prompt": c["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))}
                if family == "model"
                else {}
            ),
            "jitter": c["jitter"],
            "B vs A": [
                f"{PROMPT_NAMES.get(b, b)} vs {PROMPT_NAMES.get(a, a)}"
                for a, b in zip(c["a"], c["b"], strict=True)
            ],
            "A": c["mean_a"],
            "B": c["mean_b"],
            "Δ [CI]": [
                signed_ci(*v)
                for v in zip(c["delta"], c["delta_ci_low"], c["delta_ci_high"], strict=True)
            ],
            "p": [_p(v) for v in c["p_value"]],
            "p (Holm)": [_p(v) for v in c["p_holm"]],
            "cases": c["n_cases"].astype(int),
            "left out": left,
        }
    )
    return view.reset_index(drop=True)


def jitter_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Dice per jitter level (columns) for each (model, task, prompt) that was jittered, and the
    drop from no jitter to the largest level."""
    jittered = summary.groupby(["model", "task", "prompt"], sort=False)["jitter"].transform(
        lambda j: (j.astype(str) != "none").any()
    )
    s = summary[jittered]
    if s.empty:
        return pd.DataFrame()
    wide = s.pivot_table(
        index=["model", "task", "prompt"], columns="jitter", values="dice_mean", sort=False
    )
    levels = jitter_levels_sorted(wide.columns)  # none first, the largest level last
    wide = wide[levels]
    if "dice_ci_low" in s:  # mean [CI] cells; the drop is computed from the means
        cells = s.assign(cell=ci_cells(s, "dice")).pivot(
            index=["model", "task", "prompt"], columns="jitter", values="cell"
        )
        wide = wide.astype(object)
        wide[levels] = cells.reindex(index=wide.index, columns=levels).fillna("–")
        means = s.pivot_table(
            index=["model", "task", "prompt"], columns="jitter", values="dice_mean", sort=False
        )
    else:
        means = wide
    if "none" in levels and len(levels) > 1:
        wide[f"drop none→{levels[-1]}"] = (means["none"] - means[levels[-1]]).astype(float)
    wide.columns = [f"Dice {c}" if c in levels else c for c in wide.columns]
    out = wide.reset_index()
    out["prompt"] = out["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))
    return out


def spearman_wide(spearman: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, prompt), one rho column per attribute (* marks p < 0.05)."""
    if spearman.empty:
        return spearman
    cell = [
        "–" if pd.isna(r) else f"{r:+.2f}{'*' if p < 0.05 else ''}"
        for r, p in zip(spearman["rho"], spearman["p_value"], strict=True)
    ]
    wide = spearman.assign(cell=cell).pivot(
        index=["model", "prompt"], columns="attribute", values="cell"
    )
    n = spearman.groupby(["model", "prompt"], sort=False)["n"].max()
    wide.insert(0, "n", n)
    out = sort_rows(wide.reset_index())
    out["prompt"] = out["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))
    return out


def no_jitter(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["jitter"].astype(str) == "none"] if "jitter" in df else df


def bar_table(pooled: pd.DataFrame) -> pd.DataFrame:
    t = pooled[pooled["jitter"].astype(str) == "none"].copy()
    t["prompt"] = t["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))
    return t


def summary_unit(summary: pd.DataFrame) -> str:
    """The one distance unit of a summary's rows, or ``""`` when they differ."""
    units = set(summary["distance_unit"].astype(str)) if "distance_unit" in summary else {"mm"}
    return units.pop() if len(units) == 1 else ""


def unit_words(unit: str) -> str:
    if unit == "px":
        return "pixels (2D images without a spacing)"
    return "mm" if unit == "mm" else "the unit of each row's `distance_unit` (mm, or px for 2D)"


def metrics_view(summary: pd.DataFrame) -> pd.DataFrame:
    unit = summary_unit(summary)
    # One unit: in the header; mixed (2D images and volumes): the column stays beside the value.
    drop = ["jitter", "distance_unit"] if unit and "distance_unit" in summary else ["jitter"]
    view = summary.drop(columns=drop).rename(
        columns={
            "dice_mean": "Dice",
            "dice_std": "Dice std",
            "iou_mean": "IoU",
            "hd95_mean": f"HD95 ({unit})" if unit else "HD95",
            "nsd_mean": "NSD",
            "hd_mean": f"HD ({unit})" if unit else "HD",
            "asd_mean": f"ASD ({unit})" if unit else "ASD",
            "conformity_mean": "conformity",
            "hd95_missing": "hd95 missing",
        }
    )
    for column in [c for c in summary if c.endswith("_ci_low")]:
        metric = column[: -len("_ci_low")]
        shown = view.columns[list(summary.drop(columns=drop).columns).index(f"{metric}_mean")]
        view[shown] = ci_cells(summary, metric)
        view = view.drop(columns=[column, f"{metric}_ci_high"])
    view = view.drop(columns=[c for c in CI_SETTINGS if c in view])  # stated above the table
    view = view.rename(columns={"n_cases": "cases"})
    view["prompt"] = view["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))
    return view
