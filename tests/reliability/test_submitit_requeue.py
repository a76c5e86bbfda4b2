"""SLURM through Hydra's submitit launcher: the config composes, and a preempted job that
submitit requeues resumes from its run directory's ``last.ckpt`` and ends equal to a run that
never stopped.

The end-to-end run uses submitit's local executor (``hydra/launcher=submitit_local``): the same
job pickling, signal handlers and requeue logic as on a cluster, with processes on this machine.
The preemption is submitit's own signal (SIGUSR2), sent by a fault callback at a given step.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_run import train_env  # tests/reliability/_train_run.py
from hydra import compose, initialize_config_dir

from sam_ft.defaults import config_dir
from sam_ft.training.callbacks import submitit_signal
from sam_ft.training.checkpoints import newest_last_checkpoint, resolve_ckpt_path

ROOT = Path(__file__).resolve().parents[2]
SHORT = [
    # The synthetic demo with the tiny model (the default run is LiteMedSAM on MNI152).
    "model=tiny",
    "task=demo",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "train.evaluate=false",
    "train.overlays=0",
    "callbacks.progress=null",
]


def test_slurm_launcher_composes():
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["hydra/launcher=slurm", "hydra.launcher.nodes=2"],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("submitit_launcher.SlurmLauncher")
    assert launcher.nodes == 2
    assert launcher.max_num_timeout > 0  # requeues allowed: jobs resume (ckpt_path=auto)
    assert cfg.ckpt_path == "auto"


def test_submitit_signal_is_usr2_by_default(monkeypatch):
    from submitit.core.job_environment import JobEnvironment

    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    assert submitit_signal() == signal.SIGUSR2 == JobEnvironment._usr_sig()


def test_ckpt_path_auto_resumes_newest_else_fresh_and_explicit_wins(tmp_path):
    run_dir = tmp_path / "run"
    assert resolve_ckpt_path("auto", run_dir) is None  # nothing there: a fresh start
    (run_dir / "checkpoints").mkdir(parents=True)
    older, newer = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last-v1.ckpt"
    torch.save({"step": 0}, older)
    torch.save({"step": 1}, newer)
    os.utime(older, ns=(1, 1_000_000_000))
    assert resolve_ckpt_path("auto", run_dir) == str(newer)
    assert resolve_ckpt_path("last", run_dir) == str(newer)
    assert resolve_ckpt_path(None, run_dir) is None
    explicit = tmp_path / "other.ckpt"
    torch.save({"step": 2}, explicit)
    assert resolve_ckpt_path(str(explicit), run_dir) == str(explicit)


def _train(cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = train_env(cache)
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    return subprocess.run(
        # Flags (-m) before the overrides, as Hydra's argument parser wants them.
        [
            sys.executable,
            str(ROOT / "train.py"),
            *sorted(overrides, key=lambda a: a != "-m"),
            *SHORT,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_requeued_submitit_job_resumes_and_equals_uninterrupted(tmp_path):
    cache = tmp_path / "cache"
    uninterrupted = tmp_path / "uninterrupted"
    proc = _train(cache, f"hydra.run.dir={uninterrupted}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    usr2_at_step_2 = [
        "+callbacks.fault._target_=_faults.SignalAtStep",
        "+callbacks.fault.step=2",
        f"+callbacks.fault.signum={int(signal.SIGUSR2)}",
    ]
    # The default run and sweep directories (with their time stamp): the requeued job must find
    # the same one without being told.
    proc = _train(
        cache,
        "-m",
        "hydra/launcher=submitit_local",
        f"paths.log_dir={tmp_path}/logs",
        *usr2_at_step_2,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (job_dir,) = (tmp_path / "logs" / "train" / "multiruns").glob("*/0_*")
    logs = "\n".join(p.read_text() for p in job_dir.parent.glob(".submitit/*/*_log.*"))
    assert "Requeued job" in logs  # submitit requeued it ...
    assert "ckpt_path=auto: resuming from" in logs  # ... and the second start resumed
    assert "last.ckpt at step 2" in logs  # the stop saved a checkpoint first, mid-training

    want = torch.load(newest_last_checkpoint(uninterrupted), weights_only=True)
    got = torch.load(newest_last_checkpoint(job_dir), weights_only=True)
    assert got["global_step"] == want["global_step"] == 8
    assert want["state_dict"].keys() == got["state_dict"].keys()
    for key, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, atol=1e-6, rtol=0, msg=key)
    exported = torch.load(job_dir / "sam_finetuned.pth", weights_only=True)
    reference = torch.load(uninterrupted / "sam_finetuned.pth", weights_only=True)
    for key, value in reference.items():
        torch.testing.assert_close(exported[key], value, atol=1e-6, rtol=0, msg=key)


EVALUATED = [
    "model=tiny",
    "task=demo",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "train.overlays=0",
    "callbacks.progress=null",
    "eval.prompts=[box]",
    "eval.jitter_px=[]",
    "eval.workers=0",
]


@pytest.mark.heavy
def test_preempted_during_the_final_evaluation_resumes_it(tmp_path):
    """submitit's signal while the final evaluation commits its 2nd case: submitit requeues the
    job, which resumes (``ckpt_path=auto``: the fit is complete), scores only the cases left
    and ends with the tables of a run that never stopped."""
    cache = tmp_path / "cache"
    uninterrupted = tmp_path / "uninterrupted"
    proc = _run(cache, *EVALUATED, f"hydra.run.dir={uninterrupted}")
    assert proc.returncode == 0, proc.stderr[-3000:]

    fired = tmp_path / "fired"
    proc = _run(
        cache,
        "-m",
        "hydra/launcher=submitit_local",
        f"paths.log_dir={tmp_path}/logs",
        *EVALUATED,
        "+callbacks.fault._target_=_faults.KillInside",
        "+callbacks.fault.where=evaluation",
        "+callbacks.fault.nth=2",
        f"+callbacks.fault.signum={int(signal.SIGUSR2)}",
        f"+callbacks.fault.once={fired}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert fired.exists()  # the signal came during the final evaluation
    (job_dir,) = (tmp_path / "logs" / "train" / "multiruns").glob("*/0_*")
    logs = "\n".join(p.read_text() for p in job_dir.parent.glob(".submitit/*/*_log.*"))
    assert "Requeued job" in logs
    progress = (job_dir / "eval" / "progress.jsonl").read_text().splitlines()
    marks = [(json.loads(line)["model"], json.loads(line)["case"]) for line in progress]
    assert len(marks) == len(set(marks))  # no case scored twice: the evaluation resumed
    for name in ("per_object.csv", "per_case.csv", "summary.csv"):
        assert (job_dir / "eval" / name).read_bytes() == (
            uninterrupted / "eval" / name
        ).read_bytes()


def _run(cache: Path, *args: str) -> subprocess.CompletedProcess:
    env = train_env(cache)
    env.pop("SUBMITIT_PREEMPT_SIGNAL", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *sorted(args, key=lambda a: a != "-m")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
