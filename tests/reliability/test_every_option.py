"""Every option the README and ``conf/`` name for ``logger``, ``trainer``, ``finetune``,
``prompt``, ``loss`` and ``scheduler`` runs a real one-step ``train.py`` (demo task, tiny model)
through its final zero-shot vs finetuned evaluation, not only composes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
ONE_STEP = [
    "model=tiny",  # the synthetic demo (the default run is LiteMedSAM on MNI152)
    "task=demo",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=1",
    "trainer.limit_val_batches=1",
    "train.overlays=0",
    "data.split.test=0.1",
    "eval.prompts=[box]",
    "eval.jitter_px=[]",
    "eval.overlays=0",
    "eval.workers=0",
]

pytestmark = pytest.mark.heavy


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml"))


CASES = [
    *(["logger=" + o] for o in _options("logger")),
    *(["finetune=" + o] for o in _options("finetune")),
    *(["prompt=" + o] for o in _options("prompt")),
    *(["loss=" + o] for o in _options("loss")),
    *(["scheduler=" + o] for o in _options("scheduler")),
    ["trainer=cpu"],
    ["trainer=default"],
    ["trainer=gpu"],
    # The README's DDP line: two CPU processes with gloo.
    ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"],
]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("option", CASES, ids=[" ".join(c) for c in CASES])
def test_option_trains_one_step_and_evaluates(option, tmp_path, cache):
    if option == ["trainer=gpu"] and not torch.cuda.is_available():
        pytest.skip("trainer=gpu needs a CUDA device")
    env = dict(os.environ, SAM_FT_CACHE=str(cache), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *ONE_STEP, *option, f"hydra.run.dir={tmp_path}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sam_finetuned.pth").is_file()
    summary = pd.read_csv(tmp_path / "eval" / "summary.csv")
    assert set(summary["model"]) == {"zero_shot", "finetuned"}
    logged = {
        "logger=csv": "csv/metrics.csv",
        "logger=tensorboard": "tensorboard/events.out.tfevents.*",
        "logger=wandb": "wandb/offline-run-*",
    }
    if option[0] in logged:
        assert list(tmp_path.glob(logged[option[0]])), option
