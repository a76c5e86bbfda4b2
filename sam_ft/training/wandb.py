"""A W&B logger that works without an account and never records secrets."""

from __future__ import annotations

import logging
import netrc
import os
import re
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|password|passwd)", re.IGNORECASE)


def _has_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        auth = netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc"))
        return auth.authenticators("api.wandb.ai") is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def env_secrets() -> list[str]:
    """Values of environment variables with secret-looking names (``WANDB_API_KEY``,
    ``HF_TOKEN``, ...); short values are skipped, they would match ordinary text."""
    return [v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v) >= 8]


def scrub(obj: Any, secrets: list[str] | None = None) -> Any:
    """Copy of a nested config with values under secret-looking keys replaced by ``"***"``, and
    any environment secret (:func:`env_secrets`) inside a string replaced too: a value pulled
    in through ``${oc.env:HF_TOKEN}`` under an innocent key name is caught by its value.
    """
    secrets = env_secrets() if secrets is None else secrets
    if isinstance(obj, dict):
        return {
            k: "***" if SECRET_NAME.search(str(k)) else scrub(v, secrets) for k, v in obj.items()
        }
    if isinstance(obj, list | tuple):
        return [scrub(v, secrets) for v in obj]
    if isinstance(obj, str):
        for secret in secrets:
            obj = obj.replace(secret, "***")
    return obj


def make_wandb_logger(
    project: str = "sam_ft",
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    save_dir: str = ".",
    entity: str | None = None,
    offline: bool = False,
    log_model: bool = False,
):
    """``WandbLogger``, offline (with a notice) when ``WANDB_MODE=offline`` or no key is set.

    The key itself is read by wandb from the environment or ~/.netrc; we never pass it along.
    """
    from lightning.pytorch.loggers import WandbLogger

    if not offline and os.environ.get("WANDB_MODE") != "offline" and not _has_credentials():
        log.warning(
            "W&B: no API key found (WANDB_API_KEY or `wandb login`): logging offline to %s. "
            "Upload later with `wandb sync`.",
            save_dir,
        )
        offline = True
    if offline:
        os.environ["WANDB_MODE"] = "offline"
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    return WandbLogger(
        project=project,
        name=name,
        group=group,
        tags=list(tags or []),
        save_dir=save_dir,
        entity=entity,
        offline=offline,
        log_model=log_model,
    )
