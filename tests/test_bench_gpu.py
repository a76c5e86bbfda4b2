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
    """Every row of the tiny model measured; a model that cannot be built costs its own rows
    only (marked FAILED with the cause), as an out-of-memory row does on a GPU."""
    out = tmp_path / "out"
    proc = _run("--dry-run", str(out), "--", "--models", "tiny,nosuch", CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = list(csv.DictReader((out / "gpu_bench.csv").open()))
    lost = [r for r in rows if r["model"] == "nosuch"]
    assert lost and all(r["unit"].startswith("FAILED (") for r in lost)
    rows = [r for r in rows if r["model"] != "nosuch"]
    kinds = {(r["bench"], r["mode"], r["precision"]) for r in rows}
    for precision in ("fp32", "bf16"):
        assert ("encoder", "-", precision) in kinds
        for mode in ("decoder", "decoder_prompt", "lora", "encoder_last_n", "full"):
            assert ("train step", mode, precision) in kinds
    assert ("evaluate", "1 process", "auto") in kinds
    assert ("evaluate vs encoder", "eval.workers=auto", "auto") in kinds  # issue #20's check
    assert all(float(r["rate"]) > 0 for r in rows)
    table = (out / "gpu_bench.md").read_text()
    assert table.count("\n| ") == len(rows) + len(lost) + 1  # header + one line per row
    assert proc.stdout.count("\nrow: ") + proc.stdout.startswith("row: ") >= len(rows)  # at once
    assert (out / "gpu_bench.log").is_file()
    assert proc.stdout.strip().splitlines()[-1].startswith("encoder_bf16_vs_fp32_tiny=")


def test_a_failed_torch_import_is_named_as_such(tmp_path):
    """Not "no CUDA GPU": the step that failed and torch's own error."""
    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(
        "raise ImportError('libcudart.so.13: cannot open shared object file')\n"
    )
    proc = _run(str(tmp_path / "out"), PYTHONPATH=str(tmp_path / "site"))
    assert proc.returncode == 4
    assert "step 'import torch' failed: ImportError: libcudart.so.13" in proc.stderr
    assert "no CUDA GPU" not in proc.stderr


def test_the_budget_stops_grandchildren_too(tmp_path):
    """bench/_budget.py: the command's whole process group ends at the budget (what
    ``timeout --foreground`` left running), and what was printed before is in the log."""
    import time

    marker = tmp_path / "grandchild.pid"
    child = (
        "import subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(marker)!r}, 'w').write(str(p.pid))\n"
        "print('measured one row', flush=True)\n"
        "time.sleep(120)\n"
    )
    log = tmp_path / "log"
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT.parent / "_budget.py"), "3", str(log), "--",
         sys.executable, "-c", child],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 124 and time.monotonic() - start < 60
    assert "measured one row" in log.read_text() and "measured one row" in proc.stdout
    pid = int(marker.read_text())
    for _ in range(50):
        if not Path(f"/proc/{pid}").exists() or "Z" in _state(pid):
            break
        time.sleep(0.1)
    assert not Path(f"/proc/{pid}").exists() or "Z" in _state(pid)  # gone (or a zombie)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return "gone"
