"""A SLURM job of several tasks (one rank per task, as ``srun`` starts them: Lightning's
``SLURMEnvironment`` reads the ranks from ``SLURM_*``) preempted mid-training and requeued:
every task starts again with the same command, resumes from the run dir's ``last.ckpt``
(``ckpt_path=auto``) and ends with the weights of a job that never stopped.

The tasks are two real ``train.py`` processes on this machine with the variables ``srun`` sets
(gloo on CPU); the preemption is SIGTERM, SLURM's signal to every task, sent by a fault callback
at the same step in each.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_run import ROOT, train_env  # tests/reliability/_train_run.py

from sam_ft.training.checkpoints import newest_last_checkpoint

pytestmark = pytest.mark.heavy

ARGS = [
    "model=tiny",
    "task=demo",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.devices=2",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=1",
    "train.evaluate=false",
    "train.overlays=0",
    "callbacks.progress=null",
    "logger=csv",
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _job(run_dir: Path, cache: Path, *extra: str) -> list[subprocess.CompletedProcess]:
    """The job's two tasks, started together as srun starts them; their finished processes."""
    port = _free_port()
    procs = []
    for rank in (0, 1):
        env = train_env(cache)
        for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "SUBMITIT_PREEMPT_SIGNAL"):
            env.pop(key, None)
        env.update(
            SLURM_JOB_ID="4242", SLURM_JOB_NAME="sam_ft_test", SLURM_NTASKS="2",
            SLURM_NTASKS_PER_NODE="2", SLURM_TASKS_PER_NODE="2", SLURM_NNODES="1",
            SLURM_NODEID="0", SLURM_PROCID=str(rank), SLURM_LOCALID=str(rank),
            SLURM_CPUS_PER_TASK="1", SLURM_NODELIST="127.0.0.1", MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )  # fmt: skip
        cmd = [sys.executable, str(ROOT / "train.py"), *ARGS, *extra, f"hydra.run.dir={run_dir}"]
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )  # fmt: skip
        )
    outs = [p.communicate(timeout=900)[0] for p in procs]
    return [
        subprocess.CompletedProcess(p.args, p.returncode, out, "")
        for p, out in zip(procs, outs, strict=True)
    ]


def test_a_requeued_job_of_two_tasks_resumes_and_equals_uninterrupted(tmp_path):
    cache = tmp_path / "cache"
    uninterrupted = tmp_path / "uninterrupted"
    for proc in _job(uninterrupted, cache):
        assert proc.returncode == 0, proc.stdout[-3000:]

    run = tmp_path / "requeued"
    sigterm_at_step_2 = [
        "+callbacks.fault._target_=_faults.SignalAtStep",
        "+callbacks.fault.step=2",
        f"+callbacks.fault.signum={int(signal.SIGTERM)}",
    ]
    first = _job(run, cache, *sigterm_at_step_2)
    assert all(p.returncode != 0 for p in first), [p.stdout[-2000:] for p in first]
    stopped = torch.load(newest_last_checkpoint(run), weights_only=True)
    assert stopped["global_step"] == 2  # the preemption saved where it stopped
    # The requeue: the same command in every task (the fault fires at step 2, now behind).
    second = _job(run, cache, *sigterm_at_step_2)
    for proc in second:
        assert proc.returncode == 0, proc.stdout[-3000:]
    assert "ckpt_path=auto: resuming from" in second[0].stdout

    want = torch.load(newest_last_checkpoint(uninterrupted), weights_only=True)
    got = torch.load(newest_last_checkpoint(run), weights_only=True)
    assert got["global_step"] == want["global_step"] == 6
    for key, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, atol=1e-6, rtol=0, msg=key)
    assert os.path.getsize(run / "sam_finetuned.pth") > 0
