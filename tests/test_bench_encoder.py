"""bench/encoder_throughput.py runs end to end in --quick mode and ends with its summary line."""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "encoder_throughput.py"


def test_quick_mode_prints_speedup_last():
    # One thread: the tiny model gains nothing from more, and the test machine is shared.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    last = result.stdout.strip().splitlines()[-1]
    match = re.fullmatch(r"sdpa_speedup_vs_original=(\S+)", last)
    assert match, last
    speedup = float(match.group(1))
    assert math.isfinite(speedup) and speedup > 0
