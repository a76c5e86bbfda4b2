"""One evaluation's summary files: ``summary.csv`` (and ``summary_case.csv``, ``spearman.csv``,
``noc.csv``), the figures in ``plots/`` and ``summary.md``, written from the engine's tables
with :mod:`sam_ft.evaluation.reports.summary_tables`.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from sam_ft.evaluation.metrics.attributes import spearman_table
from sam_ft.evaluation.protocol.order import jitter_levels_sorted, sort_table
from sam_ft.evaluation.reports import plots
from sam_ft.evaluation.reports.calibration import (
    calibration_table,
    calibration_view,
    reliability_bins,
)
from sam_ft.evaluation.reports.propagation import write_propagation_report
from sam_ft.evaluation.reports.provenance import provenance, provenance_lines
from sam_ft.evaluation.reports.summary_parts import (
    SummaryParts,
    comparisons_streamed,
    joined,
    read_parts,
)
from sam_ft.evaluation.reports.summary_tables import (
    LABEL_ORDER,
    PROMPT_NAMES,
    SUMMARY_KEYS,
    bar_table,
    click_curves,
    comparisons_view,
    jitter_table,
    metrics_view,
    no_jitter,
    noc,
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


@dataclass
class ReportTables:
    """What :func:`write_report` wrote: the paths, and the tables handed on (the dashboards take
    them, :func:`sam_ft.logging_results.log_evaluation`) instead of being read back.

    ``summary`` (``summary.csv``), ``pooled`` (the same over the objects of all tasks, task
    ``all``: the run's means), ``by_label`` (``summary_label.csv``), ``comparisons``,
    ``calibration``, ``spearman``, ``headline`` (Dice per prompt, ``summary.txt``); with per-case
    rows ``case_summary`` (``summary_case.csv``) and ``case_pooled``; with clicks ``noc`` and
    ``click_curves``."""

    paths: dict[str, Path]
    summary: pd.DataFrame
    pooled: pd.DataFrame
    by_label: pd.DataFrame
    comparisons: pd.DataFrame
    calibration: pd.DataFrame
    spearman: pd.DataFrame
    headline: pd.DataFrame
    case_summary: pd.DataFrame | None = None
    case_pooled: pd.DataFrame | None = None
    noc: pd.DataFrame | None = None
    click_curves: pd.DataFrame | None = None


def write_report(
    out_dir: str | Path,
    per_object: pd.DataFrame | str | Path,
    per_case: pd.DataFrame | None = None,
    clicks: pd.DataFrame | None = None,
    overlays: Mapping[str, Sequence[plots.OverlayItem]] | Sequence[plots.OverlayItem] | None = None,
    title: str = "Evaluation summary",
    options: EvalOptions | None = None,
    seed: int | None = None,
) -> ReportTables:
    """Write the summary tables, ``summary.md`` and the figures of one evaluation.

    Args:
        out_dir: the evaluation folder (created if needed); figures go to ``out_dir/plots``.
        per_object: per-object rows (see the module docstring), or the path of a
            ``per_object.csv``: read in chunks into partitions on disk, never whole
            (:mod:`~sam_ft.evaluation.reports.summary_parts`; the same bytes either way).
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
        :class:`ReportTables`, whose ``paths`` name every file written: ``summary_csv``,
        ``summary_md``, ``summary_txt`` (the headline as plain text, what the commands print),
        ``spearman_csv``, ``comparisons_csv``, ``calibration_csv``, ``provenance_json``,
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
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".summary-parts-") as folder:
        parts = read_parts(per_object, Path(folder))
        tables = _write_tables(out_dir, parts, per_case, clicks, paths, options)
        info = provenance(options, seed, parts.units)
        paths["provenance_json"] = out_dir / "provenance.json"
        paths["provenance_json"].write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        _write_figures(plot_dir, parts, tables, clicks, overlays, paths)
    propagation = write_propagation_report(out_dir, per_case, paths)
    tables["headline"] = headline_table(tables)
    counts = counts_line(parts)
    lines = _markdown(out_dir, title, counts, tables, paths)
    at = lines.index("## Figures")
    lines[at:at] = propagation
    lines += ["", *provenance_lines(info)]
    paths["summary_md"] = out_dir / "summary.md"
    paths["summary_md"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths["summary_txt"] = out_dir / "summary.txt"
    text = summary_text(title, counts, tables) + "All tables and figures: summary.md\n"
    paths["summary_txt"].write_text(text, encoding="utf-8")
    names = [f.name for f in fields(ReportTables) if f.name != "paths"]
    return ReportTables(paths=paths, **{name: tables.get(name) for name in names})


def _write_tables(
    out_dir: Path,
    parts: SummaryParts,
    per_case: pd.DataFrame | None,
    clicks: pd.DataFrame | None,
    paths: dict[str, Path],
    options: EvalOptions,
) -> dict[str, Any]:
    """The summary CSVs (paths added to ``paths``), each computed on whole partitions of the
    rows at a time (:meth:`SummaryParts.batches`); -> the tables, and the pooled rows."""
    boot = options.bootstrap
    several_tasks = len(parts.tasks) > 1
    pieces: dict[str, list[pd.DataFrame]] = {
        k: [] for k in ("summary", "pooled", "by_label", "calibration", "spearman", "bins")
    }
    for rows in parts.batches():
        pieces["summary"].append(summarize(rows, boot))
        # Pooled rows: CIs only where summary.md shows them (several tasks); the figures and
        # the dashboards need none.
        pieces["pooled"].append(pooled_summary(rows, boot if several_tasks else None))
        # Per target (label value) beside the pooled task rows, as the official code reports.
        pieces["by_label"].append(summarize_by_label(rows, boot))
        pieces["calibration"].append(calibration_table(rows, boot))
        # Correlations within one (model, prompt) at no jitter: pooling prompts would mix
        # differences between prompts into the attribute effect.
        pieces["spearman"].append(
            spearman_table(no_jitter(rows), "dice", REPORT_ATTRIBUTES, by=["model", "prompt"])
        )
        pieces["bins"].append(reliability_bins(rows))
    summary = joined(pieces["summary"], sort_rows)
    paths["summary_csv"] = out_dir / "summary.csv"
    summary.to_csv(paths["summary_csv"], index=False)
    pooled = joined(pieces["pooled"], sort_rows)
    comparisons = comparisons_streamed(parts, boot, pooled=False)
    if several_tasks:
        comparisons = pd.concat([comparisons, comparisons_streamed(parts, boot, pooled=True)])
    paths["comparisons_csv"] = out_dir / "comparisons.csv"
    comparisons.to_csv(paths["comparisons_csv"], index=False)
    calibration = joined(pieces["calibration"], lambda t: sort_table(t, by=("model", "prompt")))
    paths["calibration_csv"] = out_dir / "calibration.csv"
    calibration.to_csv(paths["calibration_csv"], index=False)
    by_label = joined(pieces["by_label"], lambda t: sort_table(t, by=LABEL_ORDER))
    paths["summary_label_csv"] = out_dir / "summary_label.csv"
    by_label.to_csv(paths["summary_label_csv"], index=False)

    case_summary = case_pooled = None
    if per_case is not None and not per_case.empty:
        case_summary = summarize(per_case, boot)
        case_pooled = pooled_summary(per_case)
        paths["summary_case_csv"] = out_dir / "summary_case.csv"
        case_summary.to_csv(paths["summary_case_csv"], index=False)

    spearman = joined(pieces["spearman"], sort_rows)
    paths["spearman_csv"] = out_dir / "spearman.csv"
    spearman.to_csv(paths["spearman_csv"], index=False)

    noc_table = curves = None
    if clicks is not None and not clicks.empty:
        noc_table = noc(clicks)
        curves = click_curves(clicks)
        paths["noc_csv"] = out_dir / "noc.csv"
        noc_table.to_csv(paths["noc_csv"], index=False)
    return {
        "summary": summary,
        "by_label": by_label,
        "pooled": pooled,
        "case_summary": case_summary,
        "case_pooled": case_pooled,
        "spearman": spearman,
        "noc": noc_table,
        "click_curves": curves,
        "comparisons": comparisons,
        "calibration": calibration,
        "bins": joined(pieces["bins"], lambda t: sort_table(t, by=("model", "prompt", "bin"))),
        "ci": boot.describe(),
    }


def _write_figures(
    plot_dir: Path,
    parts: SummaryParts,
    tables: dict[str, Any],
    clicks: pd.DataFrame | None,
    overlays: Mapping[str, Sequence[plots.OverlayItem]] | Sequence[plots.OverlayItem] | None,
    paths: dict[str, Path],
) -> None:
    """The summary's figures in ``plot_dir`` (paths added to ``paths``)."""
    pooled = tables["pooled"]
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
    # The scatter's prompt: the box, else the first prompt in table order without jitter.
    groups = no_jitter(pd.DataFrame(list(parts.groups), columns=SUMMARY_KEYS))
    prompts = set(groups["prompt"].astype(str))
    scatter_prompt = "box" if "box" in prompts else next(iter(sort_rows(groups)["prompt"]), "")
    keys = [k for k in parts.files if k[1] == str(scatter_prompt) and k[2] == "none"]
    scatter = [parts.load(key) for key in keys]
    paths["plot_attributes"] = plots.plot_attribute_scatter(
        pd.concat(scatter, ignore_index=True) if scatter else parts.empty,
        REPORT_ATTRIBUTES,
        plot_dir / "dice_vs_attributes.png",
        title=f"Dice vs object attributes ({PROMPT_NAMES.get(scatter_prompt, scatter_prompt)})",
    )
    paths["plot_iou_reliability"] = plots.plot_reliability(
        tables["bins"], plot_dir / "iou_reliability.png"
    )
    if tables["click_curves"] is not None:
        paths["plot_dice_vs_clicks"] = plots.plot_dice_vs_clicks(
            tables["click_curves"], plot_dir / "dice_vs_clicks.png"
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
    counts: str,
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
        f"{counts}; models: {models}; tasks: "
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


def counts_line(parts: SummaryParts) -> str:
    """``51 objects in 2 cases, each scored by 2 models x 21 prompt settings (2142 rows)``: the
    objects (one (task, case, slice, label) each) are what a summary row's ``n`` counts; each
    is scored once per model, prompt and jitter level."""
    return (
        f"{len(parts.objects)} objects in {len(parts.cases)} case(s), each scored by "
        f"{len(parts.models)} model(s) x {len(parts.settings)} prompt setting(s) "
        f"({parts.rows} rows)"
    )


def headline_table(tables: dict[str, Any]) -> pd.DataFrame:
    """Dice per prompt without jitter, each model with its CI and the paired test
    (:func:`prompt_table`); with several tasks the pooled rows too. Shown first in ``summary.md``
    and printed as ``summary.txt``."""
    summary, pooled = tables["summary"], tables["pooled"]
    source = summary if summary["task"].nunique() == 1 else pd.concat([summary, pooled])
    return prompt_table(source, tables["comparisons"])


def summary_text(title: str, counts: str, tables: dict[str, Any]) -> str:
    """The headline as plain text for the console and logs (``summary.txt``): the counts, the
    Dice per prompt without jitter (with CIs and the paired test when computed), and where the
    rest is. Markdown stays in ``summary.md``."""
    summary = tables["summary"]
    few = [line.replace("**", "").replace("`", "") for line in few_cases_lines(summary)]
    lines = [
        title,
        counts + ".",
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
