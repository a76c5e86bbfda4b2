"""The W&B logger's online/offline choice, independent of the machine's own credentials.

Only the decision is exercised: the logger's run is never started (its ``experiment`` is never
touched), so nothing can reach the network whatever the choice.
"""

from __future__ import annotations

import os

import pytest

from sam_ft.training.wandb import make_wandb_logger

# Online asked for (logger=wandb's choice): what the credentials then decide is under test.
WANDB = {"project": "sam_ft", "offline": False, "log_model": False}


@pytest.fixture
def no_machine_credentials(tmp_path, monkeypatch):
    """HOME and NETRC inside tmp_path: the user's ~/.netrc and wandb settings are out of reach."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("NETRC", str(tmp_path / "home" / ".netrc"))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "home").mkdir()
    return tmp_path / "home" / ".netrc"


def test_without_credentials_the_logger_goes_offline_and_says_so(
    tmp_path, monkeypatch, no_machine_credentials, caplog
):
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the choice itself is under test
    logger = make_wandb_logger(**WANDB, save_dir=str(tmp_path / "run"))
    assert logger._offline is True and os.environ["WANDB_MODE"] == "offline"
    assert "no API key found" in caplog.text
    assert logger._experiment is None  # never started


def test_with_credentials_in_netrc_the_logger_is_online(
    tmp_path, monkeypatch, no_machine_credentials
):
    no_machine_credentials.write_text("machine api.wandb.ai\n  login user\n  password x\n")
    no_machine_credentials.chmod(0o600)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    logger = make_wandb_logger(**WANDB, save_dir=str(tmp_path / "run"))
    assert logger._offline is False and "WANDB_MODE" not in os.environ
    assert logger._experiment is None  # never started


def test_explicit_offline_mode_wins_over_credentials(tmp_path, monkeypatch, no_machine_credentials):
    no_machine_credentials.write_text("machine api.wandb.ai\n  login user\n  password x\n")
    monkeypatch.setenv("WANDB_API_KEY", "f" * 40)
    monkeypatch.setenv("WANDB_MODE", "offline")
    logger = make_wandb_logger(**WANDB, save_dir=str(tmp_path / "run"))
    assert os.environ["WANDB_MODE"] == "offline"
    assert logger._experiment is None
