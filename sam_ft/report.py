"""``sam-ft-report``: merge the evaluation summaries of several runs into one report.

Usage::

    sam-ft-report DIR... [--out FILE.md] [--wandb] [--wandb-project NAME]
    sam-ft-report merge DIR... --out DIR     # eval.shard=K/N folders -> one evaluation's files

Every ``summary.csv`` under the given folders is read (a single run folder, or a Hydra multirun
folder with numbered run subfolders). The run's ``.hydra/config.yaml``, found in the summary's
folder or one above it (up to the given DIR), names the model size (``model.name``), the finetune
mode (``finetune.name``) and the task (``task.name``). The merged table has one row per
model size x finetune mode x task x prompt x jitter; the zero-shot evaluation is the baseline row
(finetune mode ``zero_shot``) and ``delta_dice`` is each row's Dice minus that baseline. A model
study (``python evaluate.py -m model=tiny,litemedsam,...``) gives a row per model, prompt and
jitter level; ``encoder_s_per_image`` is that model's median image-encoder time per image in its
run (``run_info.json``, measured where it ran: ``encoder_device``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from sam_ft.errors import SamFtError
from sam_ft.evaluation.protocol.order import BASELINE_MODEL, sort_table
from sam_ft.evaluation.reports import plots
from sam_ft.evaluation.reports.study import find_per_object, run_config, write_study
from sam_ft.evaluation.reports.summary_tables import PROMPT_NAMES, SCORE_COLUMNS, to_markdown

MERGED_KEYS = ["model_size", "finetune", "task", "prompt", "jitter"]
MERGED_COLUMNS = [
    *MERGED_KEYS, *SCORE_COLUMNS, "distance_unit", "delta_dice", "encoder_s_per_image",
    "encoder_device", "run", "sam_ft_version", "config_hash",
]  # fmt: skip
"""``sam_ft_version`` and ``config_hash``: the run's ``provenance.json`` (empty before it)."""
UNKNOWN = "unknown"


def find_summaries(dirs: Sequence[str | Path]) -> list[tuple[Path, Path]]:
    """(summary.csv, the DIR it was found under) for every summary under ``dirs``, sorted.

    Raises:
        SamFtError: a DIR does not exist or holds no ``summary.csv``.
    """
    found = []
    for d in map(Path, dirs):
        if not d.is_dir():
            raise SamFtError(f"{d}: not a directory")
        summaries = sorted(d.rglob("summary.csv"))
        if not summaries:
            raise SamFtError(
                f"{d}: no summary.csv found under it (run sam-ft-evaluate first, or pass the run "
                "or multirun folder)"
            )
        found += [(s, d) for s in summaries]
    return found


def merge_summaries(dirs: Sequence[str | Path]) -> pd.DataFrame:
    """One table from every run's ``summary.csv`` under ``dirs`` (see the module docstring).

    Returns:
        DataFrame with columns ``model_size, finetune, task, prompt, jitter, n, dice_mean,
        dice_std, iou_mean, hd95_mean, nsd_mean, distance_unit, delta_dice, run, sam_ft_version,
        config_hash`` and the runs'
        ``n_cases`` and ``<metric>_ci_low/high`` when their summaries have them
        (``distance_unit``: the unit of ``hd95_mean``, ``mm`` or ``px`` for 2D images); a
        zero-shot baseline evaluated by several runs is kept once (the first run's).
    """
    frames = []
    for summary, root in find_summaries(dirs):
        df = pd.read_csv(summary)
        missing = {"model", "prompt", "dice_mean"} - set(df.columns)
        if missing:
            raise SamFtError(f"{summary}: not an evaluation summary (no {', '.join(missing)})")
        info = run_config(summary, root)
        df["model_size"] = info["model_size"] or UNKNOWN
        finetuned = df["model"].astype(str) != BASELINE_MODEL
        df["finetune"] = df["model"].astype(str)
        if info["finetune"]:
            df.loc[finetuned, "finetune"] = info["finetune"]
        if "task" not in df:
            df["task"] = info["task"] or UNKNOWN
        if "jitter" not in df:
            df["jitter"] = "none"
        if "distance_unit" not in df:
            df["distance_unit"] = "mm"  # summaries written before the column existed
        df["run"] = os.path.relpath(summary.parent, root.parent)
        timed = _encoder_times(summary.parent)
        labels = df["model"].astype(str)
        df["encoder_s_per_image"] = [timed.get(m, (float("nan"), ""))[0] for m in labels]
        df["encoder_device"] = [timed.get(m, (float("nan"), ""))[1] for m in labels]
        provenance = summary.parent / "provenance.json"
        info = json.loads(provenance.read_text()) if provenance.is_file() else {}
        df["sam_ft_version"] = info.get("sam_ft_version", "")
        df["config_hash"] = info.get("config_hash", "")
        frames.append(df)
    merged = pd.concat(frames, ignore_index=True)
    for column in MERGED_COLUMNS:
        if column not in merged:
            merged[column] = float("nan")
    merged = merged.drop_duplicates(subset=MERGED_KEYS, keep="first")

    baseline = merged[merged["finetune"] == BASELINE_MODEL].set_index(
        ["model_size", "task", "prompt", "jitter"]
    )["dice_mean"]
    keys = pd.MultiIndex.from_frame(merged[["model_size", "task", "prompt", "jitter"]])
    merged["delta_dice"] = merged["dice_mean"].to_numpy() - baseline.reindex(keys).to_numpy()
    merged.loc[merged["finetune"] == BASELINE_MODEL, "delta_dice"] = float("nan")
    # The runs' CIs (and their case counts) come along, after the fixed columns.
    intervals = [c for c in merged if c == "n_cases" or c.endswith(("_ci_low", "_ci_high"))]
    return _sort(merged[[*MERGED_COLUMNS, *intervals]])


def _encoder_times(folder: Path) -> dict[str, tuple[float, str]]:
    """Per model label: (median encoder seconds per image, device) from ``run_info.json``."""
    path = folder / "run_info.json"
    models = json.loads(path.read_text()).get("models", {}) if path.is_file() else {}
    return {
        name: (float(e["encoder_seconds_per_image"]), str(e.get("encoder_device", "")))
        for name, e in models.items()
        if e.get("encoder_seconds_per_image") is not None
    }


def encoder_table(merged: pd.DataFrame) -> pd.DataFrame:
    """One row per model size x finetune mode that was timed: its encoder seconds per image."""
    timed = merged.dropna(subset=["encoder_s_per_image"])
    keys = ["model_size", "finetune", "encoder_device"]
    out = timed.groupby(keys, sort=False)["encoder_s_per_image"].first().reset_index()
    # 3 significant digits: a CPU-sized model takes milliseconds, ViT-H seconds.
    out["encoder_s_per_image"] = out["encoder_s_per_image"].map(lambda t: f"{t:.3g}")
    return out.rename(columns={"encoder_s_per_image": "encoder seconds per image"})


def _sort(df: pd.DataFrame) -> pd.DataFrame:
    return sort_table(df, by=("model_size", "task", "prompt", "jitter", "finetune"))


def dice_overview(merged: pd.DataFrame) -> pd.DataFrame:
    """Dice at no jitter: one row per (model size, task, prompt), one column per finetune mode,
    each non-baseline cell with its difference to zero-shot in brackets."""
    s = merged[merged["jitter"].astype(str) == "none"]
    if s.empty:
        return s
    modes = list(dict.fromkeys(s["finetune"]))
    if BASELINE_MODEL in modes:
        modes = [BASELINE_MODEL] + [m for m in modes if m != BASELINE_MODEL]
    index = ["model_size", "task", "prompt"]
    dice = s.pivot_table(index=index, columns="finetune", values="dice_mean", sort=False)
    delta = s.pivot_table(
        index=index, columns="finetune", values="delta_dice", sort=False, dropna=False
    )
    out = pd.DataFrame(index=dice.index)
    for m in modes:
        cells = []
        for key in dice.index:
            value = dice.at[key, m]
            d = delta.at[key, m] if m in delta.columns else float("nan")
            if pd.isna(value):
                cells.append("–")
            elif pd.isna(d):
                cells.append(f"{value:.3f}")
            else:
                cells.append(f"{value:.3f} ({d:+.3f})")
        out[m] = cells
    out = out.reset_index()
    out["prompt"] = out["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))
    return out


def write_markdown(merged: pd.DataFrame, path: Path, figure: Path | None) -> Path:
    """``report.md``: the Dice overview, then the full merged table."""
    lines = [
        "# sam_ft report",
        "",
        f"{merged['run'].nunique()} runs merged. Rows: model size x finetune mode x task x prompt"
        " x jitter; `zero_shot` is the baseline and `delta_dice` = Dice - zero-shot Dice.",
        "",
        "## Dice per prompt (no jitter); brackets: difference to zero-shot",
        "",
        to_markdown(dice_overview(merged)),
        "",
        "## Image encoder time per image (median over the run's images)",
        "",
        to_markdown(encoder_table(merged)),
        "",
        "## All rows",
        "",
        to_markdown(merged),
        "",
    ]
    if figure is not None:
        lines.append(f"![report]({os.path.relpath(figure, path.parent)})")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def figure_table(merged: pd.DataFrame) -> pd.DataFrame:
    """The bars of :func:`write_figure`: one row per (prompt and jitter level, model size x
    finetune mode with its encoder time per image), Dice averaged over tasks weighted by their
    number of objects (= pooled over objects), in the tables' order."""
    s = merged.copy()
    seconds = s["encoder_s_per_image"].map(lambda t: "" if pd.isna(t) else f" ({t:.3g} s/image)")
    s["setting"] = s["model_size"].astype(str) + " " + s["finetune"].astype(str) + seconds
    s["weighted"] = s["dice_mean"] * s["n"]
    keys = ["prompt", "jitter", "setting"]
    table = s.groupby(keys, sort=False)[["weighted", "n"]].sum().reset_index()
    table["dice_mean"] = table["weighted"] / table["n"]
    table = sort_table(table, by=("prompt", "jitter"))
    names = table["prompt"].map(lambda p: PROMPT_NAMES.get(p, p))
    jitter = table["jitter"].astype(str).map(lambda j: "" if j == "none" else f", jitter {j}")
    table["group"] = names + jitter
    return table[["group", "setting", "dice_mean", "n"]]


def write_figure(merged: pd.DataFrame, path: Path) -> Path:
    """Grouped bars (:func:`figure_table`): Dice per prompt and jitter level, a bar per model."""
    return plots.plot_grouped_bars(
        figure_table(merged),
        path,
        group="group",
        hue="setting",
        error=None,
        title="Dice per prompt strategy and jitter (px), all tasks",
    )


def log_wandb(merged: pd.DataFrame, figure: Path, project: str, out_dir: Path) -> None:
    """Log the merged table and figure to W&B: online when credentials are found (an API key,
    or a ``.netrc`` entry for the server), offline otherwise; ``WANDB_MODE`` overrides both."""
    import wandb

    from sam_ft.training.wandb import wandb_mode

    run = wandb.init(project=project, job_type="report", mode=wandb_mode(), dir=str(out_dir))
    try:
        run.log(
            {
                "report/table": wandb.Table(dataframe=merged),
                "report/figure": wandb.Image(str(figure)),
            }
        )
    finally:
        run.finish()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``sam-ft-report``; returns the exit status (0 ok, 1 on a user error).

    ``sam-ft-report merge DIR... --out DIR`` merges ``eval.shard=K/N`` folders instead
    (``sam_ft.evaluation.protocol.merge``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["merge"]:
        from sam_ft.evaluation.protocol.merge import main as merge_main

        return merge_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="sam-ft-report", description="Merge sam_ft evaluation summaries into one report."
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="run or multirun folders")
    parser.add_argument(
        "--out", type=Path, default=None, help="Markdown file (default DIR/report.md)"
    )
    parser.add_argument("--wandb", action="store_true", help="also log the table to W&B")
    parser.add_argument("--wandb-project", default="sam_ft", help="W&B project name")
    args = parser.parse_args(argv)
    try:
        merged = merge_summaries(args.dirs)
        out = args.out or args.dirs[0] / "report.md"
        figure = write_figure(merged, out.with_name("report.png"))
        merged.to_csv(out.with_name("report.csv"), index=False)
        write_markdown(merged, out, figure)
        # Per-object rows there too: the COSMOS-style study (per task, modality, object; model
        # vs model; zero-shot vs finetuned).
        if find_per_object(args.dirs):
            write_study(args.dirs, out.parent)
        if args.wandb:
            log_wandb(merged, figure, args.wandb_project, out.parent)
    except SamFtError as err:
        print(f"sam-ft-report: error: {err}", file=sys.stderr)
        return 1
    print(f"sam-ft-report: {len(merged)} rows from {merged['run'].nunique()} runs -> {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
