"""Every bench runs in its quick mode (tiny model, small slices) and ends with ``name=value``.

No timing is asserted: the numbers depend on the machine; the benches themselves report them.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

FINAL_LINES = {
    "train_throughput.py": "speedup_cached_vs_uncached",
    "eval_throughput.py": "eval_cost_vs_encoder",
    "data_throughput.py": "data_headroom",
    "decoder_throughput.py": "decoder_speedup_vs_mask_decoder",
    "memory.py": "peak_mb_full_vs_decoder",
    "prep_throughput.py": "prep_speedup",
    "scale_index.py": "startup_ratio_old_vs_new",  # python bench/scale.py index --quick
}


@pytest.mark.parametrize("script", sorted(FINAL_LINES))
def test_bench_quick_prints_its_final_line(script, tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(rf"{FINAL_LINES[script]}=(\S+)", last)
    assert match, f"last line {last!r}"
    value = float(match.group(1))
    assert math.isfinite(value) and value > 0
    assert "|" in proc.stdout  # the table


def test_eval_pipeline_bench_quick(tmp_path):
    """--pipeline: eval.workers 0, 1, 2 give identical CSVs (the bench checks) and a speedup."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "eval_throughput.py"), "--pipeline", "--quick"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval.workers=2" in proc.stdout and "identical CSVs" in proc.stdout
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"eval_pipeline_speedup=(\S+)", last)
    assert match, f"last line {last!r}"
    assert math.isfinite(float(match.group(1))) and float(match.group(1)) > 0


def test_volume_metrics_match_monai_on_random_volumes():
    """The 3D metrics' KD-tree path (a bench-driven speed-up) gives MONAI's numbers."""
    from scipy.ndimage import gaussian_filter

    from sam_ft.evaluation.metrics.object_metrics import _monai_metrics, volume_metrics

    rng = np.random.default_rng(0)
    checked = 0
    for trial in range(12):
        shape = (int(rng.integers(3, 8)), int(rng.integers(20, 50)), int(rng.integers(20, 50)))
        gt = gaussian_filter(rng.normal(size=shape), (0.5, 2, 2)) > 0.3
        pred = gaussian_filter(rng.normal(size=shape), (0.5, 2, 2)) > 0.3
        if trial % 3 == 0:
            gt[0, 0, :] = True  # voxels on the array border are surface
        if not (gt.any() and pred.any()):
            continue
        spacing = tuple(float(s) for s in rng.uniform([1, 0.3, 0.3], [5, 1.5, 1.5]))
        fast = volume_metrics(pred, gt, spacing, 2.0, "area")
        ref = _monai_metrics(pred, gt, spacing, 2.0, "area")
        for key in ("dice", "iou", "hd95", "nsd"):
            assert fast[key] == pytest.approx(ref[key], abs=1e-5), key
        checked += 1
    assert checked >= 8


def test_surface_metrics_exact_when_prediction_is_far_from_the_object():
    """The distance window around the ground truth must grow until it reaches the prediction."""
    from sam_ft.evaluation.metrics.object_metrics import _monai_metrics, volume_metrics

    gt = np.zeros((4, 120, 90), dtype=bool)
    gt[1:3, 5:12, 4:9] = True
    pred = np.zeros_like(gt)
    pred[2:4, 100:118, 70:88] = True
    pred[0, 60, 45] = True
    fast = volume_metrics(pred, gt, (3.0, 0.6, 0.8), 2.0, "area")
    ref = _monai_metrics(pred, gt, (3.0, 0.6, 0.8), 2.0, "area")
    for key in ("dice", "iou", "hd95", "nsd"):
        assert fast[key] == pytest.approx(ref[key], abs=1e-5), key
