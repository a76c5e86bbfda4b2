"""The propagation part of a report (``eval.mode=propagate``), from ``propagation.csv`` and
``per_case.csv``:

- ``propagation_volumes.csv``: per volume (model, task, case, label, prompt, jitter): its key
  slice(s), the prompts given (one per key slice), the object's z extent, the slices predicted
  outside it (over-propagation), the slices where the object is and nothing was predicted
  (missed), and the 3D Dice / NSD / HD95 against the whole label volume;
- ``propagation_distance.csv`` and ``plots/propagation_distance.png``: the mean 2D Dice of a
  slice against its distance (in slices) from the key slice it was propagated from, over every
  slice where the object or a prediction is;
- in ``summary.md``, propagation beside per-slice prompting (models evaluated with
  ``eval.mode=slices`` in the same folder, or merged by ``sam-ft-report``), per prompt: the
  prompts each used per object and volume, and the same 3D scores.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from sam_ft.evaluation.protocol.order import sort_table
from sam_ft.evaluation.protocol.tables import PROPAGATION_COLUMNS, PROPAGATION_CSV, read_table
from sam_ft.evaluation.reports.summary_tables import PROMPT_NAMES, to_markdown

VOLUME_KEYS = ["model", "task", "case", "label", "name", "prompt", "jitter"]
SCORES = ["dice", "nsd", "hd95"]


def volume_table(prop: pd.DataFrame, per_case: pd.DataFrame | None) -> pd.DataFrame:
    """``propagation_volumes.csv`` (module docstring): one row per propagated volume."""
    prop = prop.assign(
        over=prop["pred_px"].gt(0) & ~prop["in_extent"].astype(bool),
        missed=prop["pred_px"].eq(0) & prop["gt_px"].gt(0),
        gt_on=prop["gt_px"].gt(0),
        pred_on=prop["pred_px"].gt(0),
    )
    rows = []
    for key, g in prop.groupby(VOLUME_KEYS, sort=False):
        keys = sorted(g.loc[g["is_key"].astype(bool), "slice"].astype(int))
        inside = g.loc[g["gt_on"], "slice"]
        rows.append(
            {
                **dict(zip(VOLUME_KEYS, key, strict=True)),
                "key_slices": ";".join(map(str, keys)),
                "prompts": len(keys),
                "extent_first": int(inside.min()),
                "extent_last": int(inside.max()),
                "gt_slices": int(g["gt_on"].sum()),
                "pred_slices": int(g["pred_on"].sum()),
                "slices_over": int(g["over"].sum()),
                "slices_missed": int(g["missed"].sum()),
            }
        )
    out = pd.DataFrame(rows)
    if per_case is not None and not per_case.empty and not out.empty:
        scores = per_case[[*VOLUME_KEYS, *SCORES]].astype({"case": str, "jitter": str})
        out = out.astype({"case": str, "jitter": str}).merge(scores, on=VOLUME_KEYS, how="left")
    return sort_table(out)


def distance_table(prop: pd.DataFrame) -> pd.DataFrame:
    """``propagation_distance.csv``: mean slice Dice per |distance from the key slice|."""
    prop = prop.assign(distance=prop["distance"].abs())
    keys = ["model", "task", "prompt", "jitter", "distance"]
    table = prop.groupby(keys, sort=False)["dice"].agg(dice_mean="mean", slices="size")
    return sort_table(table.reset_index(), by=["model", "task", "prompt", "jitter", "distance"])


def beside_table(volumes: pd.DataFrame, per_case: pd.DataFrame | None) -> pd.DataFrame:
    """Per (task, prompt), no jitter: each model's mode, prompts per object-volume, 3D scores
    and, for propagation, the slices over and missed (summed over volumes)."""
    if per_case is None or per_case.empty:
        return pd.DataFrame()
    propagated = set(volumes["model"]) if not volumes.empty else set()
    rows = []
    cases = per_case[per_case["jitter"].astype(str) == "none"]
    for (model, task, prompt), g in cases.groupby(["model", "task", "prompt"], sort=False):
        row = {"task": task, "prompt": PROMPT_NAMES.get(prompt, prompt), "model": model}
        if model in propagated:
            v = volumes[
                (volumes["model"] == model)
                & (volumes["task"] == task)
                & (volumes["prompt"] == prompt)
                & (volumes["jitter"] == "none")
            ]
            row |= {"mode": "propagate", "prompts / volume": v["prompts"].mean()}
            over, missed = int(v["slices_over"].sum()), int(v["slices_missed"].sum())
        else:
            row |= {"mode": "slices", "prompts / volume": g["num_slices"].mean()}
            over = missed = float("nan")
        row |= {"volumes": len(g), **{f"{m} 3D": g[m].mean() for m in SCORES}}
        rows.append(row | {"slices over": over, "slices missed": missed})
    return sort_table(pd.DataFrame(rows), by=["task", "prompt", "model"])


def write_propagation_report(
    out_dir: Path, per_case: pd.DataFrame | None, paths: dict[str, Path]
) -> list[str]:
    """Write the files of the module docstring when ``out_dir`` holds ``propagation.csv``;
    -> the ``summary.md`` lines (none without it)."""
    prop = read_table(out_dir / PROPAGATION_CSV, PROPAGATION_COLUMNS)
    if prop.empty:
        return []
    from sam_ft.evaluation.reports.plots import plot_dice_vs_distance

    volumes, distance = volume_table(prop, per_case), distance_table(prop)
    paths["propagation_volumes_csv"] = out_dir / "propagation_volumes.csv"
    volumes.to_csv(paths["propagation_volumes_csv"], index=False)
    paths["propagation_distance_csv"] = out_dir / "propagation_distance.csv"
    distance.to_csv(paths["propagation_distance_csv"], index=False)
    paths["plot_propagation_distance"] = plot_dice_vs_distance(
        distance, out_dir / "plots" / "propagation_distance.png"
    )
    return [
        "## Propagation (per volume, no jitter)",
        "",
        "Propagated masks (`eval.mode=propagate`: key slice(s) prompted, the box carried slice "
        "to slice) beside per-slice prompting (one prompt on every kept slice), per prompt. 3D "
        "scores against the whole label volume (empty slices counted); `slices over`: slices "
        "predicted outside the object's z extent; `slices missed`: slices where the object is "
        "and nothing was predicted. Per volume: `propagation_volumes.csv`.",
        "",
        to_markdown(beside_table(volumes, per_case)),
        "",
    ]
