"""``predict.py --help`` answers with predict's own options, before torch or the model code load."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]

_PROBE = (
    "import sys; sys.argv = ['predict.py', '--help']; from sam_ft.cli import predict_main; "
    "predict_main(); heavy = {'torch', 'lightning', 'segment_anything'} & set(sys.modules); "
    "print('HEAVY', sorted(heavy))"
)


def test_predict_help_lists_predicts_options_without_loading_torch():
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert out.startswith("usage: python predict.py checkpoint=")
    assert out.rstrip().endswith("HEAVY []")
    options = set(yaml.safe_load((ROOT / "conf" / "predict.yaml").read_text())) - {
        "defaults",
        "task_name",
        "run_name",
    }
    for key in options:  # every option of predict's config, with its comment
        assert f"\n{key}:" in out, key
    for group in ("trainer", "finetune", "optimizer", "scheduler"):  # training's, not predict's
        assert f"{group}:" not in out


def test_the_script_and_the_installed_command_print_the_same_help():
    script = subprocess.run(
        [sys.executable, str(ROOT / "predict.py"), "--help"], capture_output=True, text=True
    )
    assert script.returncode == 0 and "box: null" in script.stdout
    command = Path(sys.executable).with_name("sam-ft-predict")
    if command.exists():  # the console script of the dev install
        installed = subprocess.run([str(command), "-h"], capture_output=True, text=True)
        assert installed.stdout == script.stdout
