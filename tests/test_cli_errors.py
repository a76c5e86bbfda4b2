"""Command-line mistakes end in one line, printed once, naming the option and the nearest known
one, before any model or data work (the real scripts, run as a user runs them)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CASES = [
    ("train.py", ["trainer.max_epoch=1"], "unknown option trainer.max_epoch (did you mean "
     "trainer.max_epochs?)"),
    # Hydra's own advice for the line above; the key then reached lightning.Trainer(...).
    ("train.py", ["+trainer.max_epoch=1"], "unknown option trainer.max_epoch (did you mean "
     "trainer.max_epochs?): lightning.pytorch.Trainer takes no 'max_epoch'"),
    ("train.py", ["-m", "optimizer.lr=1e-4,3e-4", "trainer.max_epoch=1,2"],
     "unknown option trainer.max_epoch (did you mean trainer.max_epochs?)"),
    ("train.py", ["modle=vit_b"], "unknown option modle (did you mean model?)"),
    ("train.py", ["model=vit_x"], "model=vit_x: no such option"),
    ("evaluate.py", ["eval.promts=[box]"], "unknown option eval.promts (did you mean "
     "eval.prompts?)"),
    # Found inside the task, after Hydra made the run dir (which then goes again).
    ("train.py", ["task=folder", "task.root=/no/such/folder"],
     "task.root=/no/such/folder: folder not found"),
    # Values the libraries refuse: ranges Lightning takes and fails on later, torch's own checks
    # of the optimizer (a dry build), every listed value of a sweep, and the Trainer's own
    # checks on the job's machine (in parse_config, after Hydra made the run dir).
    ("train.py", ["trainer.max_epochs=-5"],
     "trainer.max_epochs=-5: expected an integer >= 1, -1 (no limit) or null"),
    ("train.py", ["optimizer.lr=-1"], "optimizer.lr=-1: Invalid learning rate: -1"),
    ("train.py", ["-m", "optimizer.lr=1e-4,abc"],
     "optimizer.lr='abc': torch.optim.AdamW expects float"),
    ("train.py", ["trainer.accelerator=cpu", "trainer.devices=0"],
     "trainer.devices=0: `Trainer(devices=0)` value is not a valid input"),
    ("predict.py", ["input=x.png", "labels=y.png"],
     "missing required option(s): checkpoint=... output=..."),
    ("predict.py", ["checkpoint=/no/such.pth", "input=x.png", "labels=y.png", "output=o",
                    "overlays=false"], "unknown option overlays (did you mean overlay?)"),
]  # fmt: skip


@pytest.mark.parametrize(("script", "args", "message"), CASES)
def test_a_mistake_is_one_line_printed_once(tmp_path, script, args, message):
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), HYDRA_FULL_ERROR="0")
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args, f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 1
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert lines == [f"error: {lines[0][len('error: ') :]}"], lines
    assert message in lines[0]
    assert not (tmp_path / "run").exists()  # no run dir left behind by a failed start
    assert not list(tmp_path.rglob("slices"))  # no data prepared


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (ROOT / "conf" / group).glob("*.yaml") if p.stem != "default")


@pytest.mark.parametrize(
    "overrides",
    [[]]
    + [[f"{g}={o}"] for g in ("trainer", "logger", "optimizer", "scheduler") for o in _options(g)]
    + [[f"experiment={o}", "task=spleen_ct"] for o in _options("experiment")]
    + [["trainer.precision=bf16-mixed", "trainer.devices=[0,1]", "trainer.max_epochs=null"]],
)
def test_every_shipped_option_passes_the_check(overrides):
    """The check is no stricter than the libraries: every preset as shipped passes it."""
    from sam_ft.cli import check_overrides

    check_overrides("train", overrides)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("trainer.max_epochs=abc", "trainer.max_epochs='abc': lightning.pytorch.Trainer expects"),
        ("optimizer.lr=abc", "optimizer.lr='abc': torch.optim.AdamW expects float"),
        ("trainer.precision=bf17", "trainer.precision='bf17': lightning.pytorch.Trainer expects"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: expected an integer >= 1"),
        ("optimizer.weight_decay=-0.5", "optimizer.weight_decay=-0.5: Invalid weight_decay"),
    ],
)
def test_a_value_a_library_cannot_take_is_named_before_any_work(override, message):
    from sam_ft.cli import check_overrides
    from sam_ft.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        check_overrides("train", [override])


def test_every_listed_value_of_a_sweep_is_checked():
    """Not only the first job's: the bad value of the third job ends the command at once."""
    from sam_ft.cli import check_overrides
    from sam_ft.errors import ConfigError

    check_overrides("train", ["optimizer.lr=1e-4,3e-4", "trainer.max_epochs=1,2"])
    with pytest.raises(ConfigError, match=re.escape("trainer.max_epochs=0: expected")):
        check_overrides("train", ["optimizer.lr=1e-4,3e-4", "trainer.max_epochs=1,2,0"])


def test_the_trainer_is_checked_on_the_jobs_machine_before_the_data(tmp_path):
    """parse_config (the Python API, each job of a sweep) builds the Trainer dry: an accelerator
    this machine lacks or a device count it refuses is one line before any data or weights."""
    from hydra import compose, initialize_config_dir

    from sam_ft.config import parse_config
    from sam_ft.defaults import config_dir
    from sam_ft.errors import ConfigError

    overrides = ["model=tiny", "task=demo", "trainer.accelerator=cpu", "trainer.devices=0"]
    with initialize_config_dir(config_dir(), version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"paths.output_dir={tmp_path}"])
    with pytest.raises(ConfigError, match=re.escape("trainer.devices=0: `Trainer(devices=0)`")):
        parse_config(cfg, "train")
