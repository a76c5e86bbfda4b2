"""``sam-ft-report`` on a study 5x larger than the memory it is given (issue #28).

A generated study (two model sizes, each run with zero-shot and finetuned rows, six prompts, two
jitter levels, in the engine's ``per_object.csv`` columns) of ~100 MB of CSV. ``sam-ft-report``
runs in a subprocess, once on it and once on a small study of the same shape: the big run may
use at most 1/5 of the big study's CSV size in peak RSS beyond the small one (what the imports,
the figures and the fixed costs take). The in-memory path (``load_study``) is measured the same
way (against its own small run) and needs more than that: the limit is one the streamed path
alone meets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from sam_ft.evaluation.protocol.tables import PER_OBJECT_COLUMNS

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["everything", "point1", "point5", "point5_neg5", "box", "box_point1"]

CHILD = r"""
import json, sys


def hwm():
    # Peak RSS in MB: VmHWM, which (unlike ru_maxrss) a process does not inherit across exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


from sam_ft.report import main
from sam_ft.evaluation.reports.study import load_study

base = hwm()
if sys.argv[1] == "report":
    assert main([sys.argv[2]]) == 0
else:
    load_study([sys.argv[2]])
peak = hwm()
print(json.dumps({"base_mb": base, "peak_mb": peak}))
"""


def _study(root: Path, cases: int, seed: int = 0) -> int:
    """Two runs (vit_b, vit_h) of ``cases`` cases x 12 slices x 2 objects; -> CSV bytes."""
    rng = np.random.default_rng(seed)
    total = 0
    for size in ("vit_b", "vit_h"):
        run = root / f"{size}_train"
        (run / ".hydra").mkdir(parents=True)
        config = {
            "model": {"name": size},
            "finetune": {"name": "lora"},
            "task": {"name": "liver_ct", "modality": "CT"},
        }
        (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        keys = pd.MultiIndex.from_product(
            [["zero_shot", "finetuned"], [f"c{c:05d}" for c in range(cases)], range(12), [1, 2],
             PROMPTS, ["none", "0-10"]],
            names=["model", "case", "slice", "label", "prompt", "jitter"],
        ).to_frame(index=False)  # fmt: skip
        n = len(keys)
        scores = {c: rng.random(n) for c in ("dice", "iou", "nsd", "hd", "asd", "pred_iou")}
        df = keys.assign(
            task="liver_ct", name=np.where(keys["label"] == 1, "liver", "tumour"),
            hd95=rng.random(n) * 20, hd95_missing=False, empty_pred=False, mask_index=1,
            modality="CT", patient=keys["case"], distance_unit="mm", **scores,
        ).reindex(columns=PER_OBJECT_COLUMNS)  # fmt: skip
        df.to_csv(run / "per_object.csv", index=False)
        summary = df.groupby(["model", "task", "prompt", "jitter"], as_index=False)
        summary.agg(n=("dice", "size"), dice_mean=("dice", "mean")).to_csv(
            run / "summary.csv", index=False
        )
        total += (run / "per_object.csv").stat().st_size
    return total


def _peak(how: str, study: Path) -> float:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, how, str(study)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_mb"]


@pytest.mark.heavy
def test_report_merges_a_study_five_times_its_memory(tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    _study(small, cases=4)
    size_mb = _study(big, cases=420) / 2**20
    assert size_mb > 90
    budget = size_mb / 5
    fixed = _peak("report", small)
    streamed = _peak("report", big) - fixed
    assert streamed <= budget, f"{streamed:.0f} MB over the fixed costs for {size_mb:.0f} MB"
    assert (big / "study_task.csv").is_file() and (big / "study.md").is_file()
    whole = _peak("load", big) - _peak("load", small)
    print(f"{size_mb:.0f} MB of CSV: streamed +{streamed:.0f} MB, in memory +{whole:.0f} MB")
    assert whole > budget, f"the in-memory rows took only {whole:.0f} MB"
