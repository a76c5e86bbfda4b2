"""The package ships its Hydra configs: a regular install works outside a checkout."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_and_config_group_is_listed_in_pyproject():
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    code = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for p in (ROOT / "sam_ft").rglob("__init__.py")
        if "__pycache__" not in p.parts
    }
    conf = {"sam_ft.conf"} | {
        "sam_ft.conf." + ".".join(d.relative_to(ROOT / "conf").parts)
        for d in (ROOT / "conf").rglob("*")
        if d.is_dir()
    }
    assert code | conf == listed


def test_regular_install_runs_from_another_directory():
    """``pip install .`` (not editable) into a fresh venv; then ``sam-ft-train --cfg job
    model=tiny``, ``sam-ft-evaluate --cfg job`` and ``sam-ft-predict --help`` from a folder
    outside the checkout (the script CI runs)."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "SAM_FT_CONFIG_DIR")}
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "install_check"), sys.executable],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "install_check: ok" in proc.stdout
