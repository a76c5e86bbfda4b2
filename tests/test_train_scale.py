"""``train.py`` beyond one plain process: DDP, bf16, Hydra multirun, W&B offline.

Real subprocesses on the demo task with the tiny model and a few steps each.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    # The synthetic demo with the tiny model (the default run is LiteMedSAM on MNI152).
    "model=tiny",
    "task=demo",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "train.evaluate=false",
    "train.overlays=1",
]


def train(args: list[str], cache: Path, **env_changes: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, SAM_FT_CACHE=str(cache), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    for key, value in env_changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def _metrics(run_dir: Path) -> pd.DataFrame:
    return pd.read_csv(run_dir / "csv" / "metrics.csv")


def _changed_from_start(run_dir: Path) -> bool:
    """Whether the decoder weights in last.ckpt differ from the zero-shot model's."""
    from sam_ft.defaults import build_from_yaml

    start = build_from_yaml("model", "tiny").sam.state_dict()
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    key = "mask_decoder.output_upscaling.0.weight"
    return not torch.equal(state[f"model.sam.{key}"], start[key])


def test_ddp_two_cpu_processes(tmp_path, cache):
    run_dir = tmp_path / "ddp"
    args = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", *SHORT]
    proc = train([*args, f"hydra.run.dir={run_dir}"], cache)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout + proc.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in out  # a real second process joined the group
    assert "gloo" in out
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2  # each rank trained its half of the batches
    assert _changed_from_start(run_dir)
    assert (run_dir / "sam_finetuned.pth").is_file()  # rank 0 exported after fit


@pytest.fixture(scope="module")
def multirun(tmp_path_factory, cache) -> Path:
    sweep_dir = tmp_path_factory.mktemp("sweep")
    proc = train(
        ["-m", "trainer.precision=32,bf16-mixed", *SHORT, f"hydra.sweep.dir={sweep_dir}"], cache
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return sweep_dir


def test_multirun_runs_two_jobs(multirun):
    jobs = sorted(p for p in multirun.iterdir() if p.is_dir())
    assert [p.name.split("_")[0] for p in jobs] == ["0", "1"]
    assert (multirun / "multirun.yaml").is_file()
    for job in jobs:
        assert (job / "sam_finetuned.pth").is_file()
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert config["model"]["name"] == "tiny"
    precisions = [
        yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["trainer"]["precision"]
        for job in jobs
    ]
    assert precisions == [32, "bf16-mixed"]


def test_bf16_mixed_trains_on_cpu(multirun):
    job = next(p for p in multirun.iterdir() if p.name.startswith("1_"))
    hparams = yaml.safe_load((job / "csv" / "hparams.yaml").read_text())
    assert hparams["trainer"]["precision"] == "bf16-mixed"
    losses = _metrics(job)["train/loss"].dropna()
    assert len(losses) == 2 and all(math.isfinite(v) for v in losses)
    assert _changed_from_start(job)
    # The exported weights stay float32 (autocast computes in bf16, parameters stay fp32).
    exported = torch.load(job / "sam_finetuned.pth", weights_only=True)
    assert {v.dtype for v in exported.values() if v.is_floating_point()} == {torch.float32}


def _fake_netrc(tmp_path: Path) -> Path:
    """A netrc holding (fake) W&B credentials, as after `wandb login`."""
    path = tmp_path / "netrc"
    path.write_text("machine api.wandb.ai\n  login user\n  password " + "f" * 40 + "\n")
    path.chmod(0o600)
    return path


def test_wandb_offline_logs_images(tmp_path, cache):
    # The mode is set explicitly, and credentials are present (a netrc, a key): the run must
    # still stay offline, whatever the machine's own ~/.netrc holds.
    run_dir = tmp_path / "wandb_run"
    quick_eval = ["train.evaluate=true", "eval.prompts=[box]", "eval.jitter_px=[[0,10]]"]
    proc = train(
        ["logger=wandb", *SHORT, *quick_eval, f"hydra.run.dir={run_dir}"],
        cache,
        WANDB_MODE="offline",
        NETRC=str(_fake_netrc(tmp_path)),
        WANDB_API_KEY="f" * 40,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert not list((run_dir / "wandb").glob("run-*"))  # no online run was started
    images = list(runs[0].rglob("media/images/**/*.png"))
    names = " ".join(p.name for p in images)
    assert "overlays" in names  # validation overlays
    assert len(images) >= 2  # and the evaluation's plots
    assert list(runs[0].glob("run-*.wandb"))  # the event log `wandb sync` uploads
