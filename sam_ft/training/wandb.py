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


def scrub(obj: Any) -> Any:
    """Copy of a nested config with values under secret-looking keys replaced by ``"***"``."""
    if isinstance(obj, dict):
        return {k: "***" if SECRET_NAME.search(str(k)) else scrub(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [scrub(v) for v in obj]
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
