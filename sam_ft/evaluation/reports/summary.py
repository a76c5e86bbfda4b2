"""One evaluation's summary files: ``summary.csv`` (and ``summary_case.csv``, ``spearman.csv``,
``noc.csv``), the figures in ``plots/`` and ``summary.md``, written from the engine's tables
with :mod:`sam_ft.evaluation.reports.summary_tables`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from sam_ft.evaluation.metrics.attributes import spearman_table
from sam_ft.evaluation.protocol.order import jitter_levels_sorted
from sam_ft.evaluation.reports import plots
from sam_ft.evaluation.reports.calibration import (
    calibration_table,
    calibration_view,
    reliability_bins,
)
from sam_ft.evaluation.reports.propagation import write_propagation_report
from sam_ft.evaluation.reports.provenance import provenance, provenance_lines
from sam_ft.evaluation.reports.statistics import CLUSTER, cluster_ids, comparison_table
from sam_ft.evaluation.reports.summary_tables import (
    PROMPT_NAMES,
    bar_table,
    click_curves,
    comparisons_view,
    jitter_table,
    metrics_view,
    no_jitter,
    noc,
    object_counts,
    pooled_summary,
    prompt_table,
    sort_rows,
    spearman_wide,
    summarize,
    summarize_by_label,
    summary_unit,
    to_markdown,
    to_text,
    unit_words,
)

if TYPE_CHECKING:
    from sam_ft.evaluation.protocol.options import EvalOptions

REPORT_ATTRIBUTES = ("area_px", "aspect_ratio", "boundary_complexity", "contrast")


def write_report(
    out_dir: str | Path,
    per_object: pd.DataFrame,
    per_case: pd.DataFrame | None = None,
    clicks: pd.DataFrame | None = None,
    overlays: Mapping[str, Sequence[plots.OverlayItem]] | Sequence[plots.OverlayItem] | None = None,
    title: str = "Evaluation summary",
    options: EvalOptions | None = None,
    seed: int | None = None,
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
        options: the evaluation's options (the CIs' bootstrap settings, the provenance); None:
            the defaults of ``conf/eval/default.yaml``.
        seed: the prompt seed, for the provenance's config hash.

    Returns:
        name -> path of every file written: ``summary_csv``, ``summary_md``, ``summary_txt``
        (the headline as plain text, what the commands print), ``spearman_csv``,
        ``comparisons_csv``, ``calibration_csv``, ``provenance_json``,
        ``plot_dice_per_prompt``, ``plot_dice_vs_jitter``, ``plot_attributes``,
        ``plot_iou_reliability``, and when given ``summary_case_csv``, ``noc_csv``,
        ``plot_dice_vs_clicks``, ``plot_overlays[_<name>]``.
    """
    from sam_ft.evaluation.protocol.options import eval_options

    options = options or eval_options(None)
    out_dir = Path(out_dir)
    plot_dir = out_dir / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    tables = _write_tables(out_dir, per_object, per_case, clicks, paths, options)
    info = provenance(options, seed, per_object)
    paths["provenance_json"] = out_dir / "provenance.json"
    paths["provenance_json"].write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
    _write_figures(plot_dir, per_object, tables["pooled"], clicks, overlays, paths)
    propagation = write_propagation_report(out_dir, per_case, paths)
    tables["headline"] = headline_table(tables)
    lines = _markdown(out_dir, title, per_object, tables, paths)
    at = lines.index("## Figures")
    lines[at:at] = propagation
    lines += ["", *provenance_lines(info)]
    paths["summary_md"] = out_dir / "summary.md"
    paths["summary_md"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["summary_txt"] = out_dir / "summary.txt"
    text = summary_text(title, per_object, tables) + "All tables and figures: summary.md\n"
    paths["summary_txt"].write_text(text, encoding="utf-8")
    return paths


def _write_tables(
    out_dir: Path,
    per_object: pd.DataFrame,
    per_case: pd.DataFrame | None,
    clicks: pd.DataFrame | None,
    paths: dict[str, Path],
    options: EvalOptions,
) -> dict[str, Any]:
    """The summary CSVs (paths added to ``paths``); -> the tables, and the pooled rows."""
    boot = options.bootstrap
    summary = summarize(per_object, boot)
    paths["summary_csv"] = out_dir / "summary.csv"
    summary.to_csv(paths["summary_csv"], index=False)
    several_tasks = per_object["task"].nunique() > 1
    # Pooled rows: CIs only where summary.md shows them (several tasks); the figures need none.
    pooled = pooled_summary(per_object, boot if several_tasks else None)
    comparisons = comparison_table(per_object, boot)
    if several_tasks:
        everything = per_object.assign(**{CLUSTER: cluster_ids(per_object)}, task="all")
        comparisons = pd.concat([comparisons, comparison_table(everything, boot)])
    paths["comparisons_csv"] = out_dir / "comparisons.csv"
    comparisons.to_csv(paths["comparisons_csv"], index=False)
    calibration = calibration_table(per_object, boot)
    paths["calibration_csv"] = out_dir / "calibration.csv"
    calibration.to_csv(paths["calibration_csv"], index=False)
    # Per target (label value) beside the pooled task rows, as the official code reports.
    by_label = summarize_by_label(per_object, boot)
    paths["summary_label_csv"] = out_dir / "summary_label.csv"
    by_label.to_csv(paths["summary_label_csv"], index=False)

    case_summary = None
    if per_case is not None and not per_case.empty:
        case_summary = summarize(per_case, boot)
        paths["summary_case_csv"] = out_dir / "summary_case.csv"
        case_summary.to_csv(paths["summary_case_csv"], index=False)

    # Correlations within one (model, prompt) at no jitter: pooling prompts would mix
    # differences between prompts into the attribute effect.
    spearman = spearman_table(
        no_jitter(per_object), "dice", REPORT_ATTRIBUTES, by=["model", "prompt"]
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
        "by_label": by_label,
        "pooled": pooled,
        "case_summary": case_summary,
        "spearman": spearman,
        "noc": noc_table,
        "comparisons": comparisons,
        "calibration": calibration,
        "ci": boot.describe(),
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
        bar_table(pooled),
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
    scatter_rows = no_jitter(per_object)
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
    paths["plot_iou_reliability"] = plots.plot_reliability(
        reliability_bins(per_object), plot_dir / "iou_reliability.png"
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
    tables: dict[str, Any],
    paths: dict[str, Path],
) -> list[str]:
    """The lines of ``summary.md``: the tables of :func:`_write_tables` and the figures."""
    summary, pooled = tables["summary"], tables["pooled"]
    case_summary, spearman, noc_table = tables["case_summary"], tables["spearman"], tables["noc"]
    assert summary is not None and pooled is not None and spearman is not None
    tasks = list(dict.fromkeys(summary["task"]))
    models = ", ".join(map(str, dict.fromkeys(summary["model"])))
    comparisons, calibration = tables["comparisons"], tables["calibration"]
    lines = [
        f"# {title}",
        "",
        f"{counts_line(per_object)}; models: {models}; tasks: "
        f"{', '.join(map(str, tasks))}. Means are over objects (2D slices); task `all` pools the "
        f"objects of all tasks. Brackets: {tables['ci']}, the case being the unit (its objects are "
        "correlated). Paired Δ: over the objects both sides scored; p: two-sided Wilcoxon "
        "signed-rank over per-case mean differences, Holm-corrected within each table.",
        "",
        *few_cases_lines(summary),
        *skipped_lines(out_dir),
        "## Dice per prompt strategy (no jitter)",
        "",
    ]
    lines += [to_markdown(tables["headline"]), ""]
    unit = summary_unit(summary)
    lines += ["## All metrics (no jitter)", "", f"HD95 in {unit_words(unit)}, averaged where it "]
    lines[-1] += "exists; `hd95 missing` counts objects with an empty prediction or ground truth."
    lines += ["", to_markdown(metrics_view(no_jitter(summary))), ""]
    by_label = tables.get("by_label")
    if by_label is not None and not by_label.empty:
        lines += ["## Per target (label value, no jitter)", ""]
        lines += ["The tables above pool a task's targets; the official code reports each.", ""]
        lines += [to_markdown(metrics_view(no_jitter(by_label))), ""]
    jitter = jitter_table(summary)
    if not jitter.empty:
        lines += ["## Robustness to prompt jitter (Dice)", "", to_markdown(jitter), ""]
    for family, heading in (
        ("model", "Paired: each model vs zero-shot (Dice)"),
        ("prompt", "Paired: each prompt vs the box (Dice)"),
    ):
        view = comparisons_view(comparisons, family) if comparisons is not None else None
        if view is not None and not view.empty:
            lines += [f"## {heading}", "", "`left out`: cases scored on one side only "]
            lines[-1] += "(all named in `comparisons.csv`)."
            lines += ["", to_markdown(view), ""]
    if calibration is not None and not calibration.empty:
        lines += [
            "## IoU-head calibration (no jitter)",
            "",
            "Predicted IoU (SAM's IoU head, kept mask) vs true IoU over objects: Spearman rho, "
            "mean absolute calibration error (MACE = mean |predicted − true|, with its CI) and, "
            "where recorded, the Dice lost by keeping the IoU head's choice instead of the "
            "oracle's.",
            "",
            to_markdown(calibration_view(calibration)),
            "",
        ]
    if case_summary is not None:
        lines += [
            "## Per case (3D, no jitter)",
            "",
            to_markdown(metrics_view(no_jitter(case_summary))),
            "",
        ]
    lines += [
        "## Dice vs object attributes (Spearman rho, no jitter)",
        "",
        "`*` marks p < 0.05.",
        "",
        to_markdown(spearman_wide(spearman)),
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


FEW_CASES = 10


def counts_line(per_object: pd.DataFrame) -> str:
    """``51 objects in 2 cases, each scored by 2 models x 21 prompt settings (2142 rows)``: the
    objects are what a summary row's ``n`` counts."""
    objects, rows = object_counts(per_object)
    n_cases = per_object.assign(**{CLUSTER: cluster_ids(per_object)})[CLUSTER].nunique()
    models = per_object["model"].nunique()
    settings = len(per_object[["prompt", "jitter"]].drop_duplicates())
    return (
        f"{objects} objects in {n_cases} case(s), each scored by {models} model(s) x {settings} "
        f"prompt setting(s) ({rows} rows)"
    )


def headline_table(tables: dict[str, Any]) -> pd.DataFrame:
    """Dice per prompt without jitter, each model with its CI and the paired test
    (:func:`prompt_table`); with several tasks the pooled rows too. Shown first in ``summary.md``
    and printed as ``summary.txt``."""
    summary, pooled = tables["summary"], tables["pooled"]
    source = summary if summary["task"].nunique() == 1 else pd.concat([summary, pooled])
    return prompt_table(source, tables["comparisons"])


def summary_text(title: str, per_object: pd.DataFrame, tables: dict[str, Any]) -> str:
    """The headline as plain text for the console and logs (``summary.txt``): the counts, the
    Dice per prompt without jitter (with CIs and the paired test when computed), and where the
    rest is. Markdown stays in ``summary.md``."""
    summary = tables["summary"]
    few = [line.replace("**", "").replace("`", "") for line in few_cases_lines(summary)]
    lines = [
        title,
        counts_line(per_object) + ".",
        *few[:1],
        f"Dice per prompt, no jitter (brackets: {tables['ci']}; p: Wilcoxon over cases, Holm):",
        "",
        to_text(tables["headline"]).rstrip("\n"),
    ]
    return "\n".join(lines) + "\n"


def few_cases_lines(summary: pd.DataFrame) -> list[str]:
    """A warning when some mean rests on fewer than :data:`FEW_CASES` cases: the bootstrap sees
    no more variability than those cases show, and the two-sided Wilcoxon test cannot reach
    p < 0.05 under 6 pairs (its smallest exact p is 2 / 2^n)."""
    if "n_cases" not in summary or summary["n_cases"].min() >= FEW_CASES:
        return []
    if summary["n_cases"].min() < 2:
        return [
            "**Few cases**: some means rest on 1 case (column `cases`): no CI can be drawn (the "
            "bootstrap resamples cases) and no paired test can reject; more cases are needed.",
            "",
        ]
    return [
        f"**Few cases**: some means rest on {int(summary['n_cases'].min())} case(s) (column "
        f"`cases`); with fewer than {FEW_CASES} the CIs understate the uncertainty, and under 6 "
        "paired cases no Wilcoxon p can be below 0.05.",
        "",
    ]


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
