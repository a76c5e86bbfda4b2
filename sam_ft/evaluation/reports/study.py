"""A COSMOS-style study from many evaluation runs: per task, modality and object; model vs model;
zero-shot vs finetuned. Written by ``sam-ft-report`` next to its report.

Input: every ``per_object.csv`` under the given folders (``python evaluate.py -m
model=vit_b,vit_h task=liver_ct,prostate_mri,...`` and/or ``train.py`` runs), one row per object
on one slice for one prompt. The run's ``.hydra/config.yaml`` says the model size
(``model.name``), the finetune mode (``finetune.name``, for rows that are not ``zero_shot``), the
task (``task.name``) and its modality (``task.modality``); the object is the row's ``name`` (the
task config's label name). A zero-shot evaluation found in several runs counts once.

The task, modality and object tables are pooled over objects: a mean is over all object rows
behind it, and ``n`` says how many (as the study reports means over its masks); the task table
adds the mean of case means. ``study_levels.csv`` sets the levels side by side across tasks:
pooled over objects (micro), mean of case means, mean of task means (macro)
(:mod:`sam_ft.evaluation.reports.levels`). Every mean has a CI resampling cases, every comparison a
paired CI, a Wilcoxon p over cases and Holm's correction within its table
(:mod:`sam_ft.evaluation.reports.statistics`; the bootstrap settings of ``conf/eval/default.yaml``).
Rows without jitter unless named.

Files: ``study.md``; ``study_task.csv``, ``study_modality.csv``, ``study_object.csv``,
``study_levels.csv``, ``study_models.csv`` (model size vs model size), ``study_finetune.csv``
(zero-shot vs finetuned); ``study_modality.png`` and ``study_models.png``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf

from sam_ft import __version__
from sam_ft.errors import SamFtError
from sam_ft.evaluation.protocol.order import BASELINE_MODEL, sort_table
from sam_ft.evaluation.reports import plots
from sam_ft.evaluation.reports.levels import aggregation_levels, with_case_level
from sam_ft.evaluation.reports.statistics import CI_SETTINGS, Bootstrap, add_intervals, holm, paired
from sam_ft.evaluation.reports.summary_tables import PROMPT_NAMES, signed_ci, to_markdown, with_ci

UNKNOWN = "unknown"
ROW_KEYS = ["model_size", "setting", "task", "case", "slice", "label", "prompt", "jitter"]
SCORES = ["dice", "iou", "hd95", "nsd"]


def find_per_object(dirs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(per_object.csv, the DIR it is under) for each run under ``dirs``; a distributed run's
    rank folders (``.ranks/``) are parts of their run's file, not runs."""
    found = []
    for d in map(Path, dirs):
        for path in sorted(d.rglob("per_object.csv")):
            if not any(part.startswith(".") for part in path.relative_to(d).parts[:-1]):
                found.append((path, d))
    return found


def run_config(summary: Path, root: Path) -> dict[str, str | None]:
    """``model_size``, ``finetune``, ``task`` and ``modality`` from the nearest
    ``.hydra/config.yaml`` between the summary's folder and ``root``; None for what is not found."""
    info: dict[str, str | None] = {"model_size": None, "finetune": None, "task": None}
    info["modality"] = None
    root = root.resolve()
    folder = summary.parent.resolve()
    while True:
        config = folder / ".hydra" / "config.yaml"
        if config.is_file():
            cfg = OmegaConf.load(config)
            for key, path in (("model_size", "model.name"), ("finetune", "finetune.name")):
                info[key] = _select(cfg, path)
            info["task"] = _select(cfg, "task.name")
            info["modality"] = _select(cfg, "task.modality")
            return info
        if folder == root or folder.parent == folder:
            return info
        folder = folder.parent


def _select(cfg, key: str) -> str | None:
    # Hydra-only resolvers (${hydra:...}) cannot resolve outside a Hydra run: treat as unknown.
    value = OmegaConf.select(cfg, key, default=None, throw_on_resolution_failure=False)
    return None if value is None else str(value)


def label_rows(df: pd.DataFrame, info: dict[str, str | None], run: str) -> pd.DataFrame:
    """One run's object rows with ``model_size, setting, modality, object, run`` (``info``:
    :func:`run_config`)."""
    df = df.copy()
    df["model_size"] = info["model_size"] or UNKNOWN
    df["setting"] = df["model"].astype(str)
    if info["finetune"]:
        df.loc[df["setting"] != BASELINE_MODEL, "setting"] = info["finetune"]
    if info["modality"]:
        df["modality"] = info["modality"]
    elif "modality" not in df:
        df["modality"] = UNKNOWN
    df["object"] = df["name"].astype(str)
    df["run"] = run
    return df


def load_study(dirs: Sequence[str | Path]) -> pd.DataFrame:
    """All object rows of all runs with ``model_size, setting, task, modality, object``, in
    memory (``write_study`` streams them instead: :mod:`sam_ft.evaluation.reports.study_parts`)."""
    frames = []
    for path, root in find_per_object(dirs):
        df = pd.read_csv(path, dtype={"model": str, "task": str, "name": str, "jitter": str})
        run = os.path.relpath(path.parent, root.parent)
        frames.append(label_rows(df, run_config(path, root), run))
    if not frames:
        raise SamFtError(f"no per_object.csv under {', '.join(map(str, dirs))}")
    rows = pd.concat(frames, ignore_index=True)
    return rows.drop_duplicates(subset=ROW_KEYS, keep="first").reset_index(drop=True)


def pooled(rows: pd.DataFrame, by: Sequence[str], boot: Bootstrap | None = None) -> pd.DataFrame:
    """Mean of each score over the object rows of each group, and ``n`` (rows behind it); with
    ``boot``, ``n_cases`` and each mean's CI resampling cases
    (:func:`~sam_ft.evaluation.reports.statistics.add_intervals`)."""
    by = list(by)
    g = rows.groupby(by, sort=False, dropna=False)
    out = g.size().rename("n").to_frame()
    for score in SCORES:
        if score in rows:
            out[f"{score}_mean"] = g[score].mean()
    out = _order(out.reset_index())
    return out if boot is None else add_intervals(out, rows, by, boot)


def _order(df: pd.DataFrame) -> pd.DataFrame:
    """Rows by model size, setting (zero-shot first), modality, task, object, prompt S1..S6,
    jitter (numerically); names alphabetically."""
    by = ("model_size", "setting", "modality", "task", "object", "prompt", "jitter")
    return sort_table(df, by=by)


def _paired(
    rows: pd.DataFrame, column: str, a: str, b: str, by: Sequence[str], boot: Bootstrap
) -> pd.DataFrame:
    """``b`` vs ``a`` of ``column`` on the objects both scored (same task, case, slice, label,
    prompt, jitter), per ``by``: Dice of each, ``delta_dice`` = ``b - a`` with its CI, the
    Wilcoxon p over cases (:func:`~sam_ft.evaluation.reports.statistics.paired`), ``n`` pairs,
    ``n_cases`` and the cases ``left_out``."""
    keys = [k for k in ROW_KEYS if k != column and k not in ("model_size", "setting")]
    other = [c for c in ("model_size", "setting") if c != column]
    left = rows[rows[column] == a]
    right = rows[rows[column] == b]
    out = []
    for key, b_rows in right.groupby(list(by), sort=False):
        key = key if isinstance(key, tuple) else (key,)
        a_rows = left[(left[list(by)].astype(str) == [str(k) for k in key]).all(axis=1)]
        result = paired(a_rows, b_rows, [*keys, *other], "dice", boot)
        if result["n_objects"]:
            out.append({**dict(zip(by, key, strict=True)), **result})
    if not out:
        return pd.DataFrame()
    table = (
        pd.DataFrame(out)
        .assign(**boot.columns())
        .rename(columns={"n_objects": "n", "mean_a": f"dice_{a}", "mean_b": f"dice_{b}"})
    )
    table = table.rename(
        columns={"delta": "delta_dice", "delta_ci_low": "delta_dice_ci_low",
                 "delta_ci_high": "delta_dice_ci_high"}
    )  # fmt: skip
    return _order(table)


def _with_holm(parts: list[pd.DataFrame]) -> pd.DataFrame:
    """The comparisons of one table together, Holm-corrected over all of them (``p_holm``)."""
    table = pd.concat([p for p in parts if not p.empty] or [pd.DataFrame()], ignore_index=True)
    if not table.empty:
        table["p_holm"] = holm(table["p_value"])
    return table


def study_tables(rows: pd.DataFrame, boot: Bootstrap) -> dict[str, pd.DataFrame]:
    """The study's tables (see the module docstring), from :func:`load_study` rows."""
    plain = rows[rows["jitter"].astype(str) == "none"]
    base = ["model_size", "setting"]
    task_keys = [*base, "modality", "task", "prompt"]
    tables = {
        "task": with_case_level(pooled(plain, task_keys, boot), plain, task_keys, boot),
        "modality": pooled(plain, [*base, "modality", "prompt"], boot),
        "object": pooled(plain, [*base, "modality", "object", "prompt"], boot),
        "levels": aggregation_levels(plain, [*base, "prompt"], boot),
    }
    sizes = sorted(set(rows["model_size"].astype(str)))
    models = [
        _paired(plain, "model_size", a, b, ["setting", "prompt"], boot).assign(
            comparison=f"{b} vs {a}"
        )
        for i, a in enumerate(sizes)
        for b in sizes[i + 1 :]
    ]
    tables["models"] = _with_holm(models)
    settings = sorted(set(rows["setting"].astype(str)) - {BASELINE_MODEL})
    finetune = [
        _paired(plain, "setting", BASELINE_MODEL, s, ["model_size", "prompt"], boot).assign(
            comparison=f"{s} vs {BASELINE_MODEL}"
        )
        for s in settings
    ]
    tables["finetune"] = _with_holm(finetune)
    return tables


def _display(df: pd.DataFrame) -> pd.DataFrame:
    """Prompt names, each mean with its CI in one cell, the cases left out counted."""
    if "prompt" in df:
        df = df.assign(prompt=df["prompt"].map(lambda p: PROMPT_NAMES.get(p, p)))
    for low in [c for c in df if c.endswith("_ci_low")]:
        stem = low[: -len("_ci_low")]
        mean = f"{stem}_mean" if f"{stem}_mean" in df else stem
        cells = [
            signed_ci(*v) if stem.startswith("delta") else with_ci(*v)
            for v in zip(df[mean], df[low], df[f"{stem}_ci_high"], strict=True)
        ]
        df = df.assign(**{mean: cells}).drop(columns=[low, f"{stem}_ci_high"])
    df = df.drop(columns=[c for c in CI_SETTINGS if c in df])  # stated above the tables
    if "left_out" in df:
        counts = [len(v.split(";")) if v else 0 for v in df["left_out"].fillna("").astype(str)]
        df = df.assign(left_out=counts)
    return df


def write_study(
    dirs: Sequence[str | Path], out_dir: str | Path, boot: Bootstrap | None = None
) -> dict[str, Path]:
    """Write the study's files into ``out_dir``; returns name -> path. ``boot``: the CIs'
    settings (None: ``eval.bootstrap`` of ``conf/eval/default.yaml``)."""
    from sam_ft.evaluation.protocol.options import eval_options
    from sam_ft.evaluation.reports.study_parts import read_parts, study_tables_streamed

    boot = boot or eval_options(None).bootstrap
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # Streamed: the rows are partitioned on disk and the tables computed a partition at a time.
    with tempfile.TemporaryDirectory(dir=out, prefix=".study-") as tmp:
        parts = read_parts(dirs, Path(tmp))
        tables, by_prompt = study_tables_streamed(parts, boot)
    paths: dict[str, Path] = {}
    for name, table in tables.items():
        paths[f"study_{name}_csv"] = out / f"study_{name}.csv"
        table.to_csv(paths[f"study_{name}_csv"], index=False)

    bars = tables["modality"].assign(
        hue=lambda t: t["model_size"].astype(str) + " " + t["setting"].astype(str)
    )
    main = _main_prompt(bars)
    paths["study_modality_png"] = plots.plot_grouped_bars(
        bars[bars["prompt"] == main], out / "study_modality.png", group="modality", hue="hue",
        error=None, title=f"Dice per modality ({PROMPT_NAMES.get(main, main)}, no jitter)",
    )  # fmt: skip
    by_prompt = by_prompt.assign(
        hue=by_prompt["model_size"].astype(str) + " " + by_prompt["setting"].astype(str),
        prompt=by_prompt["prompt"].map(lambda p: PROMPT_NAMES.get(p, p)),
    )
    paths["study_models_png"] = plots.plot_grouped_bars(
        by_prompt, out / "study_models.png", hue="hue", error=None,
        title="Dice per prompt strategy, every task pooled (no jitter)",
    )  # fmt: skip

    lines = [
        "# sam_ft study",
        "",
        f"{len(parts.runs)} runs, {len(parts.tasks)} tasks, {len(parts.modalities)} "
        f"modalities, {len(parts.objects)} objects, {parts.rows} object rows (all jitter "
        "levels). Means are pooled over objects unless labelled; `n` = object rows behind each "
        f"mean; no jitter. Brackets: {boot.describe()}. Comparisons: Δ over the objects both "
        "sides scored, p = two-sided Wilcoxon signed-rank over per-case mean differences, "
        "Holm-corrected within each table; `left_out` counts cases scored on one side only "
        f"(named in the CSV). sam_ft {__version__}.",
        "",
    ]
    sections = [
        ("Per task (pooled over objects; case_dice: mean of case means)", "task"),
        ("Across tasks: micro (objects), per case, macro (tasks)", "levels"),
        ("Per modality", "modality"),
        ("Per object", "object"),
        ("Model vs model (objects both scored)", "models"),
        ("Zero-shot vs finetuned (objects both scored)", "finetune"),
    ]
    for title, name in sections:
        lines += [f"## {title}", "", to_markdown(_display(tables[name])), ""]
    lines += ["![modality](study_modality.png)", "![models](study_models.png)", ""]
    paths["study_md"] = out / "study.md"
    paths["study_md"].write_text("\n".join(lines), encoding="utf-8")
    return paths


def _main_prompt(table: pd.DataFrame) -> str:
    """The box prompt when it was evaluated (the study's best strategy), else the first one."""
    prompts = list(dict.fromkeys(table["prompt"])) if "prompt" in table else []
    return "box" if "box" in prompts else (prompts[0] if prompts else "box")
