"""``python train.py`` as a user runs it, for the reliability tests: the real entry point in a
subprocess, with its cache in the test's folder, W&B offline, one thread, and this folder on
``PYTHONPATH`` so the command line can add the fault injectors of ``_faults``."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def train_env(cache: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        SAM_FT_CACHE=str(cache),
        WANDB_MODE="offline",
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(Path(__file__).parent),
    )
    # An in-process W&B test in this pytest worker started a wandb-core service and exported
    # its address; a child that inherits it logs through that service, which outlives a child
    # killed mid-run and keeps its run open ("run ID ... is in use" when the resume inits it
    # again). Each train process gets its own service, as a real job does.
    env.pop("WANDB_SERVICE", None)
    return env


def run_train(
    args: Sequence[str], run_dir: Path, cache: Path, timeout: int = 600
) -> subprocess.CompletedProcess:
    """``train.py *args hydra.run.dir=run_dir``; the finished process (never raises on exit)."""
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=train_env(cache),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
