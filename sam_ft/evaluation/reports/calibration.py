"""IoU-head calibration: how well SAM's predicted IoU of the kept mask tracks its true IoU.

The study's "predicted IoU" mask selection trusts the IoU head; on medical images nothing says
it is calibrated. Per model and prompt (no jitter; Everything mode has no prediction), over
objects: Spearman's rho of predicted vs true IoU, the mean absolute calibration error
(MACE = mean |predicted - true|, CI resampling cases), and the Dice gap between the oracle's
mask and the IoU head's first choice (``per_object.csv``'s ``dice_oracle - dice_top_iou``,
whatever ``eval.mask_selection`` kept), with its CI.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy.stats import spearmanr

from sam_ft.evaluation.protocol.order import sort_table
from sam_ft.evaluation.reports.statistics import Bootstrap, cluster_ids, exact_mean, mean_ci

CALIBRATION_COLUMNS = [
    "model", "prompt", "n", "n_cases", "spearman_rho", "spearman_p", "pred_iou_mean",
    "iou_mean", "mace", "mace_ci_low", "mace_ci_high", "dice_gap", "dice_gap_ci_low",
    "dice_gap_ci_high",
]  # fmt: skip


def _scored(per_object: pd.DataFrame) -> pd.DataFrame:
    """Rows without jitter that have a predicted and a true IoU, both as floats."""
    rows = per_object
    if "jitter" in rows:
        rows = rows[rows["jitter"].astype(str) == "none"]
    if "pred_iou" not in rows:
        return rows.iloc[:0]
    rows = rows.assign(
        pred_iou=pd.to_numeric(rows["pred_iou"], errors="coerce"),
        iou=pd.to_numeric(rows["iou"], errors="coerce"),
    )
    return rows[rows["pred_iou"].notna() & rows["iou"].notna()]


def calibration_table(per_object: pd.DataFrame, opts: Bootstrap) -> pd.DataFrame:
    """One row per (model, prompt) with :data:`CALIBRATION_COLUMNS` (``dice_gap*`` NaN when
    ``dice_oracle`` / ``dice_top_iou`` were not recorded, as in tables of older versions;
    ``spearman_*`` NaN under 3 objects or a constant column)."""
    rows = _scored(per_object)
    out = []
    for (model, prompt), g in rows.groupby(["model", "prompt"], sort=False):
        clusters = cluster_ids(g)
        rho = p = np.nan
        if len(g) >= 3 and g["pred_iou"].nunique() > 1 and g["iou"].nunique() > 1:
            res = spearmanr(g["pred_iou"], g["iou"])
            rho, p = float(res.statistic), float(res.pvalue)
        error = (g["pred_iou"] - g["iou"]).abs()
        row = {
            "model": model, "prompt": prompt, "n": len(g), "n_cases": clusters.nunique(),
            "spearman_rho": rho, "spearman_p": p, "pred_iou_mean": exact_mean(g["pred_iou"]),
            "iou_mean": exact_mean(g["iou"]), "mace": exact_mean(error),
        }  # fmt: skip
        row["mace_ci_low"], row["mace_ci_high"] = mean_ci(error, clusters, opts)
        gap = np.nan, np.nan, np.nan
        if {"dice_oracle", "dice_top_iou"} <= set(g):
            d = pd.to_numeric(g["dice_oracle"], errors="coerce")
            d = d - pd.to_numeric(g["dice_top_iou"], errors="coerce")
            if d.notna().any():
                gap = (exact_mean(d), *mean_ci(d, clusters, opts))
        row["dice_gap"], row["dice_gap_ci_low"], row["dice_gap_ci_high"] = gap
        out.append(row)
    table = pd.DataFrame(out, columns=CALIBRATION_COLUMNS).assign(**opts.columns())
    return sort_table(table, by=("model", "prompt"))


def calibration_view(table: pd.DataFrame) -> pd.DataFrame:
    """:func:`calibration_table` for ``summary.md``: prompt names, rho, MACE [CI], gap [CI]."""
    from sam_ft.evaluation.reports.summary_tables import PROMPT_NAMES, ci_cells, signed_ci

    view = pd.DataFrame(
        {
            "model": table["model"],
            "prompt": table["prompt"].map(lambda p: PROMPT_NAMES.get(p, p)),
            "objects": table["n"],
            "cases": table["n_cases"],
            "Spearman rho": table["spearman_rho"],
            "predicted IoU": table["pred_iou_mean"],
            "true IoU": table["iou_mean"],
            "MACE [CI]": ci_cells(table.rename(columns={"mace": "mace_mean"}), "mace"),
        }
    )
    if table["dice_gap"].notna().any():
        gap = zip(
            table["dice_gap"], table["dice_gap_ci_low"], table["dice_gap_ci_high"], strict=True
        )
        view["Dice gap oracle − IoU head [CI]"] = [signed_ci(*v) for v in gap]
    return view.reset_index(drop=True)


def reliability_bins(per_object: pd.DataFrame, bins: int = 10) -> pd.DataFrame:
    """Reliability diagram data: per (model, prompt) and equal-width bin of predicted IoU in
    [0, 1], the mean predicted and mean true IoU and the object count: ``model, prompt, bin,
    pred_iou, iou, n`` (empty bins left out)."""
    rows = _scored(per_object)
    if rows.empty:
        return pd.DataFrame(columns=["model", "prompt", "bin", "pred_iou", "iou", "n"])
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(rows["pred_iou"].clip(0, 1), edges[1:-1]), 0, bins - 1)
    g = rows.assign(bin=which).groupby(["model", "prompt", "bin"], sort=False)
    table = g.agg(pred_iou=("pred_iou", exact_mean), iou=("iou", exact_mean), n=("iou", "size"))
    return sort_table(table.reset_index(), by=("model", "prompt", "bin"))
