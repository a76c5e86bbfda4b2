"""Evaluation results and the exported model, sent to the run's dashboards (W&B, TensorBoard).

What a run gets after its evaluation (:func:`log_evaluation`), per model (``zero_shot``,
``finetuned``, ...), prompt strategy and jitter level (``none``, ``0-10``, ...):

- summary scalars ``eval/<model>/<prompt>/<jitter>/{dice,iou,hd95,nsd}`` (means over 2D
  objects), ``.../case_{dice,iou,hd95,nsd}`` (means over per-case 3D scores), with their
  bootstrap CI bounds ``.../<metric>_ci_low`` and ``_ci_high`` when the summary has one task
  (CIs of means pooled over several tasks are not those of the tasks),
  ``eval/delta/<model>/<prompt>/<jitter>/{dice,...}`` (that model minus zero-shot),
  ``eval/paired/<model>/<prompt>/<jitter>/{delta,ci_low,ci_high,p_value,p_holm}`` (the paired
  Dice comparison with zero-shot of ``comparisons.csv``, one task),
  ``eval/<model>/clicks/noc85`` and ``noc90`` when the click study ran, ``eval/skipped`` (cases
  the evaluation could not score);
- W&B tables ``eval/summary`` (``summary.csv``), ``eval/prompt_table`` (Dice per prompt, one
  column per model and the paired differences), ``eval/per_case``, ``eval/spearman``,
  ``eval/comparisons``, ``eval/calibration``, ``eval/click_curve``;
- images: every report figure, and the best/worst objects as W&B images whose prediction and
  ground-truth masks (and the box prompt) can be switched on and off in the UI.

TensorBoard gets the same scalars, the report and the tables (but the per-case one) as Markdown
text, and the figures as images.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

if TYPE_CHECKING:
    from sam_ft.evaluation.reports.summary import ReportTables

log = logging.getLogger(__name__)

METRICS = ("dice", "iou", "hd95", "nsd")
BASELINE_MODEL = "zero_shot"
OBJECTIVE = "eval/finetuned/box/none/dice"
"""What ``train.py`` returns to a Hydra sweeper: the finetuned model's Dice with an unjittered
box prompt (``val/dice_best`` when the run does not evaluate)."""


def sweep_objective(metrics: Mapping[str, float] | None) -> float | None:
    """The value a Hydra sweeper (Optuna) optimises: :data:`OBJECTIVE`, else ``val/dice_best``."""
    if not metrics:
        return None
    value = metrics.get(OBJECTIVE, metrics.get("val/dice_best"))
    return None if value is None else float(value)


def _read(path: Path) -> pd.DataFrame:
    if not path.is_file() or path.stat().st_size == 0:
        return pd.DataFrame()
    keys = {c: str for c in ("model", "task", "prompt", "jitter", "case", "patient")}
    return pd.read_csv(path, dtype=keys, keep_default_na=False, na_values=[""])


def _means(pooled: pd.DataFrame, metric: str) -> dict[tuple[str, str, str], float]:
    """(model, prompt, jitter) -> the mean of ``metric`` over the objects of all tasks: the
    report's pooled rows (task ``all``), computed once there."""
    return {
        (str(r["model"]), str(r["prompt"]), str(r["jitter"])): float(r[f"{metric}_mean"])
        for r in pooled.to_dict("records")
    }


def _interval_scalars(summary: pd.DataFrame, prefix: str = "") -> dict[str, float]:
    """``eval/<model>/<prompt>/<jitter>/<prefix><metric>_ci_{low,high}`` of a one-task summary."""
    if "task" not in summary or summary["task"].nunique() != 1:
        return {}
    out = {}
    for r in summary.to_dict("records"):
        for column in (c for c in summary if c.endswith(("_ci_low", "_ci_high"))):
            key = f"eval/{r['model']}/{r['prompt']}/{r['jitter']}/{prefix}{column}"
            out[key] = float(r[column])
    return out


def _paired_scalars(comparisons: pd.DataFrame) -> dict[str, float]:
    """``eval/paired/<model>/<prompt>/<jitter>/...``: each model vs zero-shot, one task."""
    if comparisons.empty or comparisons["task"].nunique() != 1:
        return {}
    out = {}
    for r in comparisons[comparisons["family"] == "model"].to_dict("records"):
        for column, name in (("delta", "delta"), ("delta_ci_low", "ci_low"),
                             ("delta_ci_high", "ci_high"), ("p_value", "p_value"),
                             ("p_holm", "p_holm")):  # fmt: skip
            out[f"eval/paired/{r['model']}/{r['prompt']}/{r['jitter']}/{name}"] = float(r[column])
    return out


SKIPPED_KEY = "eval/skipped"
"""The logged number of cases skipped for bad data (``skipped.csv``), in every logger."""


def evaluation_scalars(report: ReportTables | None, out_dir: str | Path) -> dict[str, float]:
    """The summary scalars of an evaluation (see the module docstring), from the tables its
    report wrote (``summary.write_report``'s; None: the evaluation has no rows) and
    ``out_dir``'s ``skipped.csv``. Missing values (no HD95 when every prediction was empty) are
    left out, not NaN."""
    skipped = _read(Path(out_dir) / "skipped.csv")
    scalars = {SKIPPED_KEY: float(skipped["case"].nunique()) if "case" in skipped else 0.0}
    if report is None:
        return scalars
    for metric in METRICS:
        for (model, prompt, jitter), value in _means(report.pooled, metric).items():
            scalars[f"eval/{model}/{prompt}/{jitter}/{metric}"] = value
    scalars.update(_interval_scalars(report.summary))
    if report.case_pooled is not None:
        for metric in METRICS:
            for (model, prompt, jitter), value in _means(report.case_pooled, metric).items():
                scalars[f"eval/{model}/{prompt}/{jitter}/case_{metric}"] = value
        scalars.update(_interval_scalars(report.case_summary, "case_"))
    scalars.update(_paired_scalars(report.comparisons))
    for metric in METRICS:
        means = _means(report.pooled, metric)
        for (model, prompt, jitter), value in means.items():
            base = means.get((BASELINE_MODEL, prompt, jitter))
            if model != BASELINE_MODEL and base is not None:
                scalars[f"eval/delta/{model}/{prompt}/{jitter}/{metric}"] = value - base
    noc = report.noc
    for model, g in noc.groupby("model", sort=False) if noc is not None else ():
        for col in (c for c in g.columns if c.startswith("noc@")):
            value = np.average(g[col].astype(float), weights=g["n"].astype(float))
            scalars[f"eval/{model}/clicks/noc{col[4:]}"] = float(value)
    return {k: float(v) for k, v in scalars.items() if not math.isnan(v)}


def box_dice(report: ReportTables | None, models: Sequence[str], task: str) -> dict[str, float]:
    """``{"eval/<model>/box_dice": mean Dice}`` of ``models`` on ``task`` with an unjittered
    box: the report's summary rows (its means, not computed again)."""
    if report is None:
        return {}
    s = report.summary
    rows = s[
        s["model"].isin(list(models))
        & (s["task"].astype(str) == task)
        & (s["prompt"] == "box")
        & (s["jitter"].astype(str) == "none")
    ]
    return {f"eval/{r.model}/box_dice": float(r.dice_mean) for r in rows.itertuples(index=False)}


def evaluation_tables(report: ReportTables | None, out_dir: str | Path) -> dict[str, pd.DataFrame]:
    """``summary``, ``prompt_table``, ``per_case``, ``spearman``, ``comparisons``,
    ``calibration``, ``click_curve`` of the evaluation (the ones it has): the report's tables,
    and the per-case rows of ``out_dir``'s ``per_case.csv``."""
    from sam_ft.evaluation.reports.summary_tables import prompt_table

    if report is None:
        return {}
    tables: dict[str, pd.DataFrame] = {}
    if not report.summary.empty:
        tables["summary"] = report.summary
        tables["prompt_table"] = prompt_table(report.summary, report.comparisons)
    for name, table in (
        ("per_case", _read(Path(out_dir) / "per_case.csv")),
        ("spearman", report.spearman),
        ("comparisons", report.comparisons),
        ("calibration", report.calibration),
        ("click_curve", report.click_curves),
    ):
        if table is not None and not table.empty:
            tables[name] = table
    return tables


def _wandb_image(item: Sequence[Any]):
    """One overlay item (image (H, W, 3) uint8, gt (H, W) bool, pred (H, W) bool, prompt,
    title) as a ``wandb.Image`` with the masks and the box prompt as toggleable layers."""
    import wandb

    image, gt, pred, prompt, title = item
    masks = {
        "prediction": {
            "mask_data": np.asarray(pred).astype(np.uint8),
            "class_labels": {0: "background", 1: "prediction"},
        },
        "ground_truth": {
            "mask_data": np.asarray(gt).astype(np.uint8) * 2,
            "class_labels": {0: "background", 2: "ground truth"},
        },
    }
    boxes = None
    box = prompt.get("box") if isinstance(prompt, Mapping) else None
    if box is not None and np.size(box) == 4 and np.isfinite(np.asarray(box, float)).all():
        x0, y0, x1, y1 = (float(v) for v in np.asarray(box, float).ravel())
        position = {"minX": x0, "minY": y0, "maxX": x1, "maxY": y1}
        boxes = {
            "prompt": {
                "box_data": [{"position": position, "domain": "pixel", "class_id": 3}],
                "class_labels": {3: "box prompt"},
            }
        }
    return wandb.Image(np.asarray(image), masks=masks, boxes=boxes, caption=str(title))


def _is_wandb(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def _is_tensorboard(logger: Any) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger

    return isinstance(logger, TensorBoardLogger)


def log_evaluation(
    out_dir: str | Path,
    report: ReportTables | None,
    loggers: Sequence[Any],
    overlays: Mapping[str, Sequence[Any]] | None = None,
    step: int = 0,
) -> dict[str, float]:
    """Send the evaluation to every W&B and TensorBoard logger, and the number of skipped cases
    (``eval/skipped``) to any other logger that takes metrics (the CSV logger: its
    ``metrics.csv`` shows it beside the training curves).

    Args:
        out_dir: the evaluation folder (``plots/``, ``summary.md``, ``skipped.csv``, ...).
        report: the tables its report wrote (``summary.write_report``'s ``ReportTables``,
            ``EvalResult.report``), None when the evaluation has no rows.
        loggers: Lightning loggers; the CSV files are already in the run dir, so loggers other
            than W&B and TensorBoard get only the skipped count.
        overlays: ``{"best_<model>": items, "worst_<model>": items}`` from the engine's
            ``EvalResult.overlays``, each item as in ``plots.plot_overlay_grid``.
        step: TensorBoard step of the scalars and images.

    Returns:
        The scalars (:func:`evaluation_scalars`).
    """
    out_dir = Path(out_dir)
    scalars = evaluation_scalars(report, out_dir)
    if not loggers:
        return scalars
    tables = evaluation_tables(report, out_dir)
    plots = sorted((out_dir / "plots").glob("*.png"))
    for logger in loggers:
        if _is_wandb(logger):
            _log_wandb(logger.experiment, scalars, tables, plots, overlays or {})
        elif _is_tensorboard(logger):
            _log_tensorboard(logger.experiment, scalars, tables, plots, step, out_dir)
        elif hasattr(logger, "log_metrics"):
            logger.log_metrics({SKIPPED_KEY: scalars[SKIPPED_KEY]})
    return scalars


def _log_wandb(run, scalars, tables, plots, overlays) -> None:
    import wandb

    data: dict[str, Any] = {f"eval/{k}": wandb.Table(dataframe=v) for k, v in tables.items()}
    data.update({f"eval/plots/{p.stem}": wandb.Image(str(p)) for p in plots})
    for name, items in overlays.items():
        if items:
            data[f"eval/overlays/{name}"] = [_wandb_image(item) for item in items]
    run.log(data)
    # In the summary (not the history): sweeps and run tables rank by these.
    run.summary.update(scalars)


def _log_tensorboard(writer, scalars, tables, plots, step: int, out_dir: Path) -> None:
    from PIL import Image

    from sam_ft.evaluation.reports.summary_tables import to_markdown

    for key, value in scalars.items():
        writer.add_scalar(key, value, step)
    report = out_dir / "summary.md"
    if report.is_file():
        writer.add_text("eval/report", report.read_text(encoding="utf-8"), step)
    for name, table in tables.items():
        if name != "per_case":  # one row per case x object x prompt x jitter: too long as text
            writer.add_text(f"eval/{name}", to_markdown(table), step)
    for plot in plots:
        pixels = np.asarray(Image.open(plot).convert("RGB"))
        writer.add_image(f"eval/plots/{plot.stem}", pixels, step, dataformats="HWC")
    writer.flush()


def _artifact_name(name: str) -> str:
    # W&B artifact names: letters, digits, dashes, underscores and dots.
    return re.sub(r"[^\w.-]+", "-", f"sam_finetuned-{name}").strip("-")[:128]


def log_exported_model(loggers: Sequence[Any], exported: str | Path, name: str) -> None:
    """``sam_finetuned.pth`` and its model card (``sam_finetuned.json`` beside it, when written)
    as a W&B artifact of type ``model`` with alias ``best``, for every W&B logger made with
    ``log_model: true``. The card's fields become the artifact's metadata."""
    import wandb

    exported = Path(exported)
    card = exported.with_suffix(".json")
    for logger in loggers:
        if not (_is_wandb(logger) and getattr(logger, "log_exported_model", False)):
            continue
        metadata = {}
        if card.is_file():
            try:
                metadata = json.loads(card.read_text())
            except (OSError, ValueError):
                log.warning("model card %s is not valid JSON: logged as a file only", card)
        artifact = wandb.Artifact(
            _artifact_name(name),
            type="model",
            description="Finetuned SAM weights in segment_anything's format",
            metadata=metadata if isinstance(metadata, dict) else {},
        )
        artifact.add_file(str(exported))
        if card.is_file():
            artifact.add_file(str(card))
        logger.experiment.log_artifact(artifact, aliases=["best"])
        log.info("W&B: logged %s as artifact %s:best", exported, artifact.name)
