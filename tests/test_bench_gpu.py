"""``bench/gpu.sh`` without a GPU: its syntax, its help, a clear refusal, and a CPU dry run.

The GPU numbers themselves come from running the script on a GPU machine; no test needs one.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "gpu.sh"


def _run(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, PYTHON=sys.executable, OMP_NUM_THREADS="1", **env),
    )


def test_syntax_and_help():
    assert subprocess.run(["bash", "-n", str(SCRIPT)]).returncode == 0
    proc = _run("--help")
    assert proc.returncode == 0
    assert "usage: bench/gpu.sh" in proc.stdout and "--dry-run" in proc.stdout


def test_without_a_gpu_fails_at_once_and_says_why(tmp_path):
    proc = _run(str(tmp_path / "out"), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 3
    assert "no CUDA GPU visible" in proc.stderr and "--dry-run" in proc.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_unknown_option_is_refused():
    proc = _run("--fast")
    assert proc.returncode == 2 and "unknown option --fast" in proc.stderr


def test_dry_run_on_cpu_writes_one_table(tmp_path):
    out = tmp_path / "out"
    proc = _run("--dry-run", str(out), CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "gpu_bench.csv").open()))
    kinds = {(r["bench"], r["mode"], r["precision"]) for r in rows}
    for precision in ("fp32", "bf16"):
        assert ("encoder", "-", precision) in kinds
        for mode in ("decoder", "decoder_prompt", "lora", "encoder_last_n", "full"):
            assert ("train step", mode, precision) in kinds
    assert ("evaluate", "1 process", "auto") in kinds
    assert ("evaluate vs encoder", "eval.workers=auto", "auto") in kinds  # issue #20's check
    assert all(float(r["rate"]) > 0 for r in rows)
    table = (out / "gpu_bench.md").read_text()
    assert table.count("\n| ") == len(rows) + 1  # header + one line per row
    assert (out / "gpu_bench.log").is_file()
    assert proc.stdout.strip().splitlines()[-1].startswith("encoder_bf16_vs_fp32_tiny=")
