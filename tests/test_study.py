"""``sam-ft-report`` on several runs: the COSMOS-style study tables, pooled over objects.

Run folders are written by hand (``per_object.csv`` + ``.hydra/config.yaml``, as evaluate.py
leaves them) so every expected mean can be computed beside it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from sam_ft.evaluation.reports.statistics import Bootstrap
from sam_ft.evaluation.reports.study import load_study, study_tables
from sam_ft.report import main

BOOT = Bootstrap(resamples=500, seed=1, method="percentile", confidence=0.95)

TASKS = {  # task -> (modality, objects)
    "liver_ct": ("CT", ["liver", "liver_tumour"]),
    "prostate_mri": ("MRI", ["prostate"]),
}


def _dice(size: str, setting: str, task: str, obj: str, case: int) -> float:
    """A made-up score with a distinct value per cell: ViT-H > ViT-B, finetuned > zero-shot."""
    base = {"liver": 0.6, "liver_tumour": 0.3, "prostate": 0.5}[obj]
    return (
        base
        + (0.1 if size == "vit_h" else 0)
        + (0.05 if setting != "zero_shot" else 0)
        + 0.01 * case
    )


def _run(root: Path, size: str, task: str, finetuned: bool) -> None:
    """One run folder; a train run holds zero_shot and finetuned rows, an eval run zero_shot."""
    run = root / f"{size}_{task}_{'train' if finetuned else 'eval'}"
    (run / ".hydra").mkdir(parents=True)
    modality, objects = TASKS[task]
    config = {
        "model": {"name": size},
        "finetune": {"name": "decoder"},
        "task": {"name": task, "modality": modality},
    }
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    rows = []
    for model in ["zero_shot", "finetuned"] if finetuned else ["zero_shot"]:
        for label, obj in enumerate(objects, start=1):
            for case in range(2):
                for jitter in ("none", "0-10"):
                    setting = "decoder" if model == "finetuned" else model
                    dice = _dice(size, setting, task, obj, case) - (0.2 if jitter != "none" else 0)
                    rows.append({
                        "model": model, "task": task, "case": f"c{case}", "slice": 4,
                        "label": label, "name": obj, "prompt": "box", "jitter": jitter,
                        "dice": dice,
                        "iou": 0.5, "hd95": 3.0, "nsd": 0.7, "modality": modality,
                    })  # fmt: skip
    pd.DataFrame(rows).to_csv(run / "per_object.csv", index=False)
    summary = pd.DataFrame(rows).groupby(["model", "task", "prompt", "jitter"], as_index=False)
    summary.agg(n=("dice", "size"), dice_mean=("dice", "mean")).to_csv(
        run / "summary.csv", index=False
    )


@pytest.fixture
def study_dir(tmp_path) -> Path:
    for size in ("vit_b", "vit_h"):
        for task in TASKS:
            _run(tmp_path, size, task, finetuned=True)
            _run(tmp_path, size, task, finetuned=False)  # the same zero-shot again: counted once
    return tmp_path


def test_tables_pool_over_objects(study_dir):
    rows = load_study([study_dir])
    assert len(rows) == 2 * 3 * 2 * 2 * 2  # sizes x (task, object) x settings x cases x jitters
    t = study_tables(rows, BOOT)

    modality = t["modality"].set_index(["model_size", "setting", "modality"])
    ct = modality.loc[("vit_b", "zero_shot", "CT")]
    assert ct["n"] == 4  # 2 objects x 2 cases, no jitter
    assert ct["dice_mean"] == pytest.approx((0.6 + 0.61 + 0.3 + 0.31) / 4)
    assert modality.loc[("vit_h", "decoder", "MRI")]["dice_mean"] == pytest.approx(0.655)

    obj = t["object"].set_index(["model_size", "setting", "object"])
    assert obj.loc[("vit_b", "zero_shot", "liver_tumour")]["n"] == 2
    assert obj.loc[("vit_b", "zero_shot", "liver_tumour")]["dice_mean"] == pytest.approx(0.305)
    task = t["task"].set_index(["model_size", "setting", "task"])
    assert list(task.index.get_level_values("setting")[:2]) == ["zero_shot", "zero_shot"]
    assert task.loc[("vit_h", "zero_shot", "prostate_mri")]["dice_mean"] == pytest.approx(0.605)

    models = t["models"].set_index(["setting"])
    assert set(t["models"]["comparison"]) == {"vit_h vs vit_b"}
    assert models.loc["zero_shot"]["n"] == 6  # every object scored by both sizes
    assert models.loc["zero_shot"]["delta_dice"] == pytest.approx(0.1)

    ft = t["finetune"].set_index(["model_size"])
    assert set(t["finetune"]["comparison"]) == {"decoder vs zero_shot"}
    assert ft.loc["vit_b"]["delta_dice"] == pytest.approx(0.05)
    assert ft.loc["vit_b"]["n"] == 6
    # Paired over 4 cases (2 per task), +0.05 everywhere: the CI is that value; Holm over the
    # table's two comparisons (vit_b, vit_h).
    assert ft.loc["vit_b"]["n_cases"] == 4 and ft.loc["vit_b"]["left_out"] == ""
    assert ft.loc["vit_b"]["delta_dice_ci_low"] == pytest.approx(0.05)
    p = [stats.wilcoxon(np.full(4, 0.05)).pvalue] * 2
    np.testing.assert_allclose(t["finetune"]["p_holm"], np.minimum(1, np.array(p) * 2))


def test_aggregation_levels_micro_case_macro(study_dir):
    t = study_tables(load_study([study_dir]), BOOT)
    levels = t["levels"]
    got = levels[(levels["model_size"] == "vit_b") & (levels["setting"] == "zero_shot")]
    got = got.set_index("level")
    # liver_ct: liver 0.60/0.61 and tumour 0.30/0.31 in cases c0/c1; prostate 0.50/0.51.
    micro = (0.6 + 0.61 + 0.3 + 0.31 + 0.5 + 0.51) / 6
    case_means = np.array([0.45, 0.46, 0.5, 0.51])
    macro = (0.455 + 0.505) / 2
    row = {lvl.split(" ")[0]: got.loc[lvl] for lvl in got.index}
    assert row["object"]["dice_mean"] == pytest.approx(micro) and row["object"]["n"] == 6
    assert row["case"]["dice_mean"] == pytest.approx(case_means.mean()) and row["case"]["n"] == 4
    assert row["task"]["dice_mean"] == pytest.approx(macro) and row["task"]["n"] == 2
    ref = stats.bootstrap(
        (np.sort(case_means),), np.mean, n_resamples=500, method="percentile",
        rng=np.random.default_rng(1),
    )  # fmt: skip
    assert row["case"]["dice_ci_low"] == pytest.approx(ref.confidence_interval.low)
    assert row["case"]["dice_ci_high"] == pytest.approx(ref.confidence_interval.high)
    for r in row.values():
        assert r["dice_ci_low"] <= r["dice_mean"] <= r["dice_ci_high"]
    # The task table holds the per-case level beside the pooled mean.
    task = (
        t["task"]
        .set_index(["model_size", "setting", "task"])
        .loc[("vit_b", "zero_shot", "liver_ct")]
    )
    assert task["case_dice_mean"] == pytest.approx(0.455) and task["n_cases"] == 2


def test_report_cli_writes_the_study(study_dir, capsys):
    out = study_dir / "report" / "report.md"
    assert main([str(study_dir), "--out", str(out)]) == 0
    folder = out.parent
    for name in ("task", "modality", "object", "models", "finetune"):
        assert not pd.read_csv(folder / f"study_{name}.csv").empty, name
    for png in ("study_modality.png", "study_models.png"):
        assert (folder / png).stat().st_size > 1000
    text = (folder / "study.md").read_text()
    assert "8 runs, 2 tasks, 2 modalities, 3 objects" in text
    for heading in (
        "Per task",
        "Across tasks: micro (objects), per case, macro (tasks)",
        "Per modality",
        "Per object",
        "Model vs model",
        "Zero-shot vs finetuned",
    ):
        assert f"## {heading}" in text
    assert "S5 box" in text


def test_streamed_study_writes_the_bytes_of_the_in_memory_tables(study_dir, tmp_path, monkeypatch):
    """``write_study`` streams the rows through partitions (3-row chunks here, so every file is
    read in several): each CSV is the one the whole-table path writes."""
    from sam_ft.evaluation.reports import study_parts
    from sam_ft.evaluation.reports.study import write_study

    monkeypatch.setattr(study_parts, "CHUNK_ROWS", 3)
    out = tmp_path / "streamed"
    paths = write_study([study_dir], out, BOOT)
    want = study_tables(load_study([study_dir]), BOOT)
    assert [k for k in paths if k.endswith("_csv")] == [f"study_{k}_csv" for k in want]
    for name, table in want.items():
        assert len(table) and paths[f"study_{name}_csv"].read_text() == table.to_csv(index=False)
    assert "2 tasks" in paths["study_md"].read_text() and not list(out.glob(".study-*"))
