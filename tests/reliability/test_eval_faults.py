"""``python evaluate.py`` killed with SIGKILL midway, then re-run, ends with the same CSVs as a run
that was never interrupted. Issue #8, item 1 (the engine-level resume test with a hand-cut file
is ``tests/test_engine.py::test_resume_after_kill_gives_same_files``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[2]
# The demo task's test split (2 volumes), box prompts only: a few seconds per run.
QUICK = ["eval.prompts=[box]", "eval.jitter_px=[]", "eval.overlays=0"]
TABLES = ("per_object.csv", "per_case.csv", "summary.csv")


def _start(run_dir: Path, cache: Path) -> subprocess.Popen:
    env = dict(os.environ, SAM_FT_CACHE=str(cache), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        [sys.executable, str(ROOT / "evaluate.py"), *QUICK, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _done_lines(run_dir: Path) -> list[str]:
    path = run_dir / "progress.jsonl"
    return path.read_text().splitlines() if path.exists() else []


def _table(path: Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    return df.sort_values(list(df.columns)).reset_index(drop=True)


def test_sigkill_mid_evaluation_then_rerun_gives_same_csvs(tmp_path):
    cache = tmp_path / "cache"
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    # The uninterrupted run and the one to kill run side by side (2 cores, 1 thread each).
    ref_proc = _start(reference, cache)
    victim = _start(killed, cache)
    deadline = time.monotonic() + 240
    while not _done_lines(killed) and victim.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait(30)
    assert victim.returncode == -signal.SIGKILL, "evaluation ended before it could be killed"
    assert len(_done_lines(killed)) == 1  # killed after the first case, before the second
    assert not (killed / "summary.csv").exists()
    assert ref_proc.wait(240) == 0, ref_proc.stderr.read()[-3000:]

    resumed = _start(killed, cache)
    assert resumed.wait(240) == 0, resumed.stderr.read()[-3000:]
    assert len(_done_lines(killed)) == 2  # the finished case was not evaluated again
    for name in TABLES:
        pd.testing.assert_frame_equal(_table(killed / name), _table(reference / name))
