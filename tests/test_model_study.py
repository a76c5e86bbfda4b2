"""A study across models: ``evaluate.py -m model=...`` then ``sam-ft-report`` give one table and
one plot with a row (bar) per model, prompt and jitter level, and each model's image-encoder time
per image measured where it ran (``run_info.json``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from sam_ft.evaluation.reports.summary_tables import summarize
from sam_ft.report import figure_table, main, merge_summaries

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ("box", "point1")
JITTERS = ("none", "0-10")


def _rows(dice: float) -> list[dict]:
    rows = []
    for case, shift in (("c0", 0.0), ("c1", 0.1)):
        for prompt in PROMPTS:
            for jitter in JITTERS:
                d = (
                    dice
                    - shift
                    - (0.1 if jitter != "none" else 0)
                    - (0.2 if prompt != "box" else 0)
                )
                rows.append({
                    "model": "zero_shot", "task": "demo_2d", "case": case, "slice": 0, "label": 1,
                    "name": "a", "prompt": prompt, "jitter": jitter, "dice": d,
                    "iou": d / (2 - d), "hd95": 3.0, "hd95_missing": False, "nsd": d,
                    "modality": "MR",
                })  # fmt: skip
    return rows


def _run(folder: Path, model: str, dice: float, seconds: float) -> None:
    """A run folder as evaluate.py writes it: config, summary.csv and run_info.json."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"model:\n  name: {model}\nfinetune:\n  name: decoder\ntask:\n  name: demo_2d\n"
    )
    summarize(pd.DataFrame(_rows(dice))).to_csv(folder / "summary.csv", index=False)
    info = {"models": {"zero_shot": {"encoder_seconds_per_image": seconds,
                                     "encoder_device": "cpu x86_64, 1 torch threads"}}}  # fmt: skip
    (folder / "run_info.json").write_text(json.dumps(info))


def test_report_has_a_row_and_a_bar_per_model_prompt_and_jitter(tmp_path, capsys):
    models = {"tiny": (0.5, 0.02), "litemedsam": (0.9, 4.7), "sam_hq_tiny": (0.4, 0.015)}
    for i, (model, (dice, seconds)) in enumerate(models.items()):
        _run(tmp_path / "multi" / f"{i}_{model}_demo_2d", model, dice, seconds)
    assert main([str(tmp_path / "multi")]) == 0
    capsys.readouterr()
    table = pd.read_csv(tmp_path / "multi" / "report.csv", keep_default_na=False, na_values=[""])
    keys = set(zip(table["model_size"], table["prompt"], table["jitter"], strict=True))
    assert keys == {(m, p, j) for m in models for p in PROMPTS for j in JITTERS}
    assert len(table) == len(keys)
    for model, (dice, seconds) in models.items():
        rows = table[table["model_size"] == model]
        assert (rows["encoder_s_per_image"] == seconds).all()
        box = rows[(rows["prompt"] == "box") & (rows["jitter"] == "none")]
        assert box["dice_mean"].item() == pytest.approx(dice - 0.05)  # mean of its two cases
    md = (tmp_path / "multi" / "report.md").read_text()
    assert "| litemedsam | zero_shot | cpu x86_64, 1 torch threads | 4.7 |" in md
    assert (tmp_path / "multi" / "report.png").stat().st_size > 0
    # The plot's bars: one per model in each (prompt, jitter) group, the time in its label.
    bars = figure_table(merge_summaries([tmp_path / "multi"]))
    assert len(bars) == len(models) * len(PROMPTS) * len(JITTERS)
    assert list(dict.fromkeys(bars["group"])) == [
        "S2 1 point", "S2 1 point, jitter 0-10", "S5 box", "S5 box, jitter 0-10",
    ]  # fmt: skip
    assert "litemedsam zero_shot (4.7 s/image)" in set(bars["setting"])


@pytest.mark.heavy
def test_evaluate_multirun_of_three_models_then_report(tmp_path, capsys):
    """The real thing on the 2D demo: tiny, LiteMedSAM (its real weights) and SAM-HQ tiny, each
    evaluated by ``evaluate.py -m``, the encoder timed on this CPU, then ``sam-ft-report``."""
    multi = tmp_path / "multi"
    args = [
        "-m", "model=tiny,litemedsam,sam_hq_tiny", "task=demo_2d", "eval.prompts=[box,point1]",
        "eval.jitter_px=[[0,10]]", "eval.overlays=0", f"hydra.sweep.dir={multi}",
    ]  # fmt: skip
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1",
               WANDB_MODE="offline")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main([str(multi)]) == 0
    capsys.readouterr()
    table = pd.read_csv(multi / "report.csv")
    models = ("tiny", "litemedsam", "sam_hq_tiny")
    keys = set(zip(table["model_size"], table["prompt"], table["jitter"], strict=True))
    assert keys == {(m, p, j) for m in models for p in PROMPTS for j in JITTERS}
    seconds = table.groupby("model_size")["encoder_s_per_image"].first()
    assert (seconds > 0).all() and np.isfinite(seconds).all()
    # LiteMedSAM's TinyViT (4 stages, 12 blocks, 64 x 64 tokens) costs far more than tiny's
    # 2 ViT blocks on 16 x 16 tokens.
    assert seconds["litemedsam"] > 5 * seconds["tiny"]
    md = (multi / "report.md").read_text()
    timing = md.split("## Image encoder time per image")[1].split("##")[0]
    assert all(f"| {m} | zero_shot | cpu" in timing for m in models)
    assert (multi / "report.png").stat().st_size > 0
