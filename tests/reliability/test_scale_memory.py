"""Memory stays flat as the task grows, on the path the command line takes (issue #14).

Runs ``bench/scale.py --quick``: ``train.py`` and ``evaluate.py`` through Hydra, each in its own
process, on 2 and on 6 synthetic 512 x 512 x 12 CT volumes. Holding the data of the four extra
cases in RAM (what ``SamDataModule.setup`` did before: every kept slice's RGB image, float32
intensities and masks, plus the label volumes) would add ``held_mb`` ~ 120 MB, four times the
budget below; streaming from the slice cache keeps the growth to noise (+-5 MB: the bench pins
glibc's mmap threshold, without which the same run's peak varies by +-70 MB).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"
# Peak RSS may grow by this fraction of what holding the extra cases would add.
BUDGET_FRACTION = 0.25


def test_train_and_evaluate_memory_does_not_grow_with_cases(tmp_path):
    out = tmp_path / "scale.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH / "scale.py"), "--quick", "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    last = proc.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"rss_growth_16_vs_4=(\S+)", last)
    assert match, f"last line {last!r}"
    result = json.loads(out.read_text())
    rows = {(r["run"], r["cases"]): r for r in result["rows"]}
    for run in ("train", "evaluate"):
        small, large = rows[(run, 2)], rows[(run, 6)]
        extra_data = large["held_mb"] - small["held_mb"]
        growth = large["peak_mb"] - small["peak_mb"]
        # The budget would be exceeded by holding the extra cases, and is not.
        assert extra_data > 100, rows
        assert growth < BUDGET_FRACTION * extra_data, (run, growth, extra_data, rows)
    assert float(match.group(1)) <= 1.15, result
