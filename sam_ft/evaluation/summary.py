"""Summary tables, Markdown and figures for one evaluation, from the per-object rows.

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

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from sam_ft.evaluation import plots
from sam_ft.evaluation.attributes import spearman_table
from sam_ft.evaluation.order import (
    BASELINE_MODEL,
    jitter_levels_sorted,
    sort_table,
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
SCORE_COLUMNS = ["n", "dice_mean", "dice_std", "iou_mean", "hd95_mean", "nsd_mean"]
"""The statistics of a summary row; ``sam-ft-report``'s merged table has the same ones."""
SUMMARY_COLUMNS = [*SUMMARY_KEYS, *SCORE_COLUMNS, "hd95_missing", "distance_unit"]
"""``distance_unit``: ``mm``, or ``px`` for 2D images without a spacing (HD95 and the NSD
tolerance are then in pixels); ``mm+px`` when a group mixes both."""
REPORT_ATTRIBUTES = ("area_px", "aspect_ratio", "boundary_complexity", "contrast")


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


def summarize(per_object: pd.DataFrame) -> pd.DataFrame:
    """Mean metrics per (model, task, prompt, jitter).

    Args:
        per_object: rows with at least ``model, task, prompt, dice, iou, hd95, nsd``; a missing
            ``jitter`` column means no jitter.

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
    if "distance_unit" not in df:
        df["distance_unit"] = "mm"
    df["distance_unit"] = df["distance_unit"].fillna("mm").astype(str)
    grouped = df.groupby(SUMMARY_KEYS, sort=False, dropna=False)
    out = grouped.agg(
        n=("dice", "size"),
        dice_mean=("dice", "mean"),
        iou_mean=("iou", "mean"),
        hd95_mean=("hd95", "mean"),
        nsd_mean=("nsd", "mean"),
        hd95_missing=("_missing", "sum"),
    )
    out["dice_std"] = grouped["dice"].std(ddof=0)
    out["distance_unit"] = grouped["distance_unit"].agg(lambda u: "+".join(sorted(set(u))))
    out = out.reset_index()
    out["hd95_missing"] = out["hd95_missing"].astype(int)
    return sort_rows(out[SUMMARY_COLUMNS])


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
            row[f"noc@{round(t * 100)}"] = float(first.mean())
        for click, mean in zip(clicks_taken, values.mean(axis=0), strict=True):
            row[f"dice@{int(click)}"] = float(mean)
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
        means = _click_matrix(group, object_keys).mean(axis=0)
        rows += [(model, int(k), float(v)) for k, v in means.items()]
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


def _signed(value: float) -> str:
    return "–" if pd.isna(value) else f"{value:+.3f}"


def _pooled(per_object: pd.DataFrame) -> pd.DataFrame:
    """Summary over the objects of all tasks together (task = ``all``)."""
    return summarize(per_object.assign(task="all"))


def prompt_table(summary: pd.DataFrame) -> pd.DataFrame:
    """Dice mean ± std per (task, prompt) at no jitter, one column per model, and the Dice
    difference of each other model minus zero-shot when both are present."""
    s = summary[summary["jitter"].astype(str) == "none"]
    models = list(dict.fromkeys(s["model"]))
    wide = s.pivot_table(index=["task", "prompt"], columns="model", values="dice_mean", sort=False)
    std = s.pivot_table(index=["task", "prompt"], columns="model", values="dice_std", sort=False)
    out = pd.DataFrame(index=wide.index)
    for m in models:
        out[f"{m} Dice"] = [
            "–" if pd.isna(a) else f"{a:.3f} ± {b:.3f}"
            for a, b in zip(wide[m], std[m], strict=True)
        ]
    if BASELINE_MODEL in models:
        for m in models:
            if m != BASELINE_MODEL:
                out[f"Δ {m} − {BASELINE_MODEL}"] = [
                    _signed(v) for v in wide[m] - wide[BASELINE_MODEL]
                ]
    out = out.reset_index()
    out["prompt"] = out["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))
    return out


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
    if "none" in levels and len(levels) > 1:
        wide[f"drop none→{levels[-1]}"] = wide["none"] - wide[levels[-1]]
    wide.columns = [f"Dice {c}" if c in levels else c for c in wide.columns]
    out = wide.reset_index()
    out["prompt"] = out["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))
    return out


def _spearman_wide(spearman: pd.DataFrame) -> pd.DataFrame:
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


def _no_jitter(df: pd.DataFrame) -> pd.DataFrame:
    return df[df["jitter"].astype(str) == "none"] if "jitter" in df else df


def _bar_table(pooled: pd.DataFrame) -> pd.DataFrame:
    t = pooled[pooled["jitter"].astype(str) == "none"].copy()
    t["prompt"] = t["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))
    return t


def write_report(
    out_dir: str | Path,
    per_object: pd.DataFrame,
    per_case: pd.DataFrame | None = None,
    clicks: pd.DataFrame | None = None,
    overlays: Mapping[str, Sequence[plots.OverlayItem]] | Sequence[plots.OverlayItem] | None = None,
    title: str = "Evaluation summary",
) -> dict[str, Path]:
    """Write the summary tables, ``summary.md`` and the figures of one evaluation.

    Args:
        out_dir: the evaluation folder (created if needed); figures go to ``out_dir/plots``.
        per_object: per-object rows (see the module docstring).
        per_case: per-case (3D) rows, or None.
        clicks: per-click rows for the interactive study, or None.
        overlays: overlay items for :func:`plots.plot_overlay_grid`, one grid
            (``plots/overlays.png``) or a mapping name -> items (``plots/overlays_<name>.png``,
            e.g. ``{"best": ..., "worst": ...}``).
        title: heading of ``summary.md``.

    Returns:
        name -> path of every file written: ``summary_csv``, ``summary_md``, ``spearman_csv``,
        ``plot_dice_per_prompt``, ``plot_dice_vs_jitter``, ``plot_attributes``, and when given
        ``summary_case_csv``, ``noc_csv``, ``plot_dice_vs_clicks``, ``plot_overlays[_<name>]``.
    """
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    tables = _write_tables(out_dir, per_object, per_case, clicks, paths)
    _write_figures(plot_dir, per_object, tables["pooled"], clicks, overlays, paths)
    lines = _markdown(out_dir, title, per_object, tables, paths)
    paths["summary_md"] = out_dir / "summary.md"
    paths["summary_md"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def _write_tables(
    out_dir: Path,
    per_object: pd.DataFrame,
    per_case: pd.DataFrame | None,
    clicks: pd.DataFrame | None,
    paths: dict[str, Path],
) -> dict[str, pd.DataFrame | None]:
    """The summary CSVs (paths added to ``paths``); -> the tables, and the pooled rows."""
    summary = summarize(per_object)
    paths["summary_csv"] = out_dir / "summary.csv"
    summary.to_csv(paths["summary_csv"], index=False)
    pooled = _pooled(per_object)

    case_summary = None
    if per_case is not None and not per_case.empty:
        case_summary = summarize(per_case)
        paths["summary_case_csv"] = out_dir / "summary_case.csv"
        case_summary.to_csv(paths["summary_case_csv"], index=False)

    # Correlations within one (model, prompt) at no jitter: pooling prompts would mix
    # differences between prompts into the attribute effect.
    spearman = spearman_table(
        _no_jitter(per_object), "dice", REPORT_ATTRIBUTES, by=["model", "prompt"]
    )
    spearman = sort_rows(spearman)
    paths["spearman_csv"] = out_dir / "spearman.csv"
    spearman.to_csv(paths["spearman_csv"], index=False)

    noc_table = None
    if clicks is not None and not clicks.empty:
        noc_table = noc(clicks)
        paths["noc_csv"] = out_dir / "noc.csv"
        noc_table.to_csv(paths["noc_csv"], index=False)
    return {
        "summary": summary,
        "pooled": pooled,
        "case_summary": case_summary,
        "spearman": spearman,
        "noc": noc_table,
    }


def _write_figures(
    plot_dir: Path,
    per_object: pd.DataFrame,
    pooled: pd.DataFrame,
    clicks: pd.DataFrame | None,
    overlays: Mapping[str, Sequence[plots.OverlayItem]] | Sequence[plots.OverlayItem] | None,
    paths: dict[str, Path],
) -> None:
    """The summary's figures in ``plot_dir`` (paths added to ``paths``)."""
    paths["plot_dice_per_prompt"] = plots.plot_grouped_bars(
        _bar_table(pooled),
        plot_dir / "dice_per_prompt.png",
        title="Dice per prompt strategy (no jitter, all tasks pooled)",
    )
    pooled_jitter = pooled[
        pooled.groupby(["model", "prompt"])["jitter"].transform(
            lambda j: (j.astype(str) != "none").any()
        )
    ]
    paths["plot_dice_vs_jitter"] = plots.plot_dice_vs_jitter(
        pooled_jitter, plot_dir / "dice_vs_jitter.png", jitter_levels_sorted(pooled["jitter"])
    )
    scatter_rows = _no_jitter(per_object)
    prompts = set(scatter_rows["prompt"].astype(str))
    scatter_prompt = (
        "box" if "box" in prompts else next(iter(sort_rows(scatter_rows)["prompt"]), "")
    )
    paths["plot_attributes"] = plots.plot_attribute_scatter(
        scatter_rows[scatter_rows["prompt"].astype(str) == scatter_prompt],
        REPORT_ATTRIBUTES,
        plot_dir / "dice_vs_attributes.png",
        title=f"Dice vs object attributes ({PROMPT_NAMES.get(scatter_prompt, scatter_prompt)})",
    )
    if clicks is not None and not clicks.empty:
        paths["plot_dice_vs_clicks"] = plots.plot_dice_vs_clicks(
            click_curves(clicks), plot_dir / "dice_vs_clicks.png"
        )
    if overlays is not None:
        grids = overlays if isinstance(overlays, Mapping) else {"": overlays}
        for name, items in grids.items():
            key = f"plot_overlays_{name}" if name else "plot_overlays"
            file = f"overlays_{name}.png" if name else "overlays.png"
            paths[key] = plots.plot_overlay_grid(plot_dir / file, items)


def _markdown(
    out_dir: Path,
    title: str,
    per_object: pd.DataFrame,
    tables: dict[str, pd.DataFrame | None],
    paths: dict[str, Path],
) -> list[str]:
    """The lines of ``summary.md``: the tables of :func:`_write_tables` and the figures."""
    summary, pooled = tables["summary"], tables["pooled"]
    case_summary, spearman, noc_table = tables["case_summary"], tables["spearman"], tables["noc"]
    assert summary is not None and pooled is not None and spearman is not None
    tasks = list(dict.fromkeys(summary["task"]))
    models = ", ".join(map(str, dict.fromkeys(summary["model"])))
    lines = [
        f"# {title}",
        "",
        f"{len(per_object)} scored objects; models: {models}; tasks: {', '.join(map(str, tasks))}."
        " Dice is mean ± std over objects (2D slices); task `all` pools the objects of all tasks.",
        "",
        *skipped_lines(out_dir),
        "## Dice per prompt strategy (no jitter)",
        "",
    ]
    table_source = summary if len(tasks) == 1 else pd.concat([summary, pooled])
    lines += [to_markdown(prompt_table(table_source)), ""]
    unit = _unit(summary)
    lines += ["## All metrics (no jitter)", "", f"HD95 in {_unit_words(unit)}, averaged where it "]
    lines[-1] += "exists; `hd95 missing` counts objects with an empty prediction or ground truth."
    lines += ["", to_markdown(_metrics_view(_no_jitter(summary))), ""]
    jitter = jitter_table(summary)
    if not jitter.empty:
        lines += ["## Robustness to prompt jitter (Dice)", "", to_markdown(jitter), ""]
    if case_summary is not None:
        lines += [
            "## Per case (3D, no jitter)",
            "",
            to_markdown(_metrics_view(_no_jitter(case_summary))),
            "",
        ]
    lines += [
        "## Dice vs object attributes (Spearman rho, no jitter)",
        "",
        "`*` marks p < 0.05.",
        "",
        to_markdown(_spearman_wide(spearman)),
        "",
    ]
    if noc_table is not None:
        lines += ["## Interactive clicks", "", "NoC@t: clicks to reach Dice t (N if never).", ""]
        lines += [to_markdown(noc_table), ""]
    lines += ["## Figures", ""]
    for key, path in paths.items():
        if key.startswith("plot_"):
            lines.append(f"![{key[5:]}]({path.relative_to(out_dir).as_posix()})")
    return lines


def _unit(summary: pd.DataFrame) -> str:
    """The one distance unit of a summary's rows, or ``""`` when they differ."""
    units = set(summary["distance_unit"].astype(str)) if "distance_unit" in summary else {"mm"}
    return units.pop() if len(units) == 1 else ""


def _unit_words(unit: str) -> str:
    if unit == "px":
        return "pixels (2D images without a spacing)"
    return "mm" if unit == "mm" else "the unit of each row's `distance_unit` (mm, or px for 2D)"


def read_skipped(out_dir: str | Path) -> pd.DataFrame:
    """The cases skipped for bad data (``<out_dir>/skipped.csv``; empty when there is none)."""
    path = Path(out_dir) / "skipped.csv"
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame(columns=["case", "path", "reason"])
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def skipped_lines(out_dir: str | Path) -> list[str]:
    """Markdown lines stating how many cases were skipped and why (also when none was)."""
    skipped = read_skipped(out_dir)
    if skipped.empty:
        return ["No case was skipped.", ""]
    cases = skipped.drop_duplicates(subset=["case"])
    columns = [c for c in ("case", "stage", "path", "reason") if c in cases]
    return [
        f"**{len(cases)} case(s) skipped** for bad data, not scored (`skipped.csv`):",
        "",
        to_markdown(cases[columns].reset_index(drop=True)),
        "",
    ]


def _metrics_view(summary: pd.DataFrame) -> pd.DataFrame:
    unit = _unit(summary)
    # One unit: in the header; mixed (2D images and volumes): the column stays beside the value.
    drop = ["jitter", "distance_unit"] if unit and "distance_unit" in summary else ["jitter"]
    view = summary.drop(columns=drop).rename(
        columns={
            "dice_mean": "Dice",
            "dice_std": "Dice std",
            "iou_mean": "IoU",
            "hd95_mean": f"HD95 ({unit})" if unit else "HD95",
            "nsd_mean": "NSD",
            "hd95_missing": "hd95 missing",
        }
    )
    view["prompt"] = view["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))
    return view
