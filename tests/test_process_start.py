"""What every sam_ft process sets where it starts, before torch loads OpenMP."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_PROBE = (
    "import sam_ft, torch, os; torch.ones(64, 64) @ torch.ones(64, 64); "
    "print(os.environ['OMP_WAIT_POLICY'])"
)


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_openmp_threads_wait_passively_unless_the_user_says_otherwise(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given is not None:
        env["OMP_WAIT_POLICY"] = given
    out = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == expected
