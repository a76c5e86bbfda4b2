"""Shared fixtures: small random-weight SAMs and isolated caches."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache/sam_ft or W&B account from tests."""
    monkeypatch.setenv("SAM_FT_CACHE", str(tmp_path_factory.getbasetemp() / "sam_ft_cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    """The tiny models' small matmuls gain nothing from a second thread, and on a busy machine
    OpenMP's spin-waiting made 2 threads ~40x slower than 1."""
    torch.set_num_threads(1)
