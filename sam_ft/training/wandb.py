"""A W&B logger that works without an account, opens one run per Hydra job and never records
secrets."""

from __future__ import annotations

import configparser
import contextlib
import logging
import netrc
import os
import re
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hydra.experimental.callback import Callback

from sam_ft.atomic import atomic_write_text

log = logging.getLogger(__name__)

SECRET_NAME = re.compile(r"(api[_-]?key|token|secret|password|passwd)", re.IGNORECASE)
DEFAULT_BASE_URL = "https://api.wandb.ai"
# Override keys left out of a run name: already in it (model, task, finetune) or not about the
# experiment (where files go, which logger, Hydra's own settings).
_UNNAMED_KEYS = {
    *("model", "task", "finetune", "logger", "paths", "hydra", "hparams_search"),
    "ckpt_path",  # a resumed job is the same run (same W&B run id, same name)
}
MAX_NAME = 128  # W&B's limit for display names and groups


def base_url() -> str:
    """The W&B server: ``WANDB_BASE_URL``, else the one ``wandb login --host`` saved, else
    wandb.ai."""
    url = os.environ.get("WANDB_BASE_URL")
    if url:
        return url
    settings = Path(os.environ.get("WANDB_CONFIG_DIR", Path.home() / ".config" / "wandb"))
    parser = configparser.ConfigParser()
    try:
        parser.read(settings / "settings")
        return parser.get("default", "base_url", fallback=DEFAULT_BASE_URL) or DEFAULT_BASE_URL
    except (configparser.Error, OSError):
        return DEFAULT_BASE_URL


def _has_credentials() -> bool:
    """An API key in the environment, or a ``.netrc`` entry for the server's host (``machine
    host[:port]``, as ``wandb login`` writes it, also for a self-hosted ``WANDB_BASE_URL``)."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlsplit(base_url()).netloc
    if not host:
        return False
    try:
        auth = netrc.netrc(os.environ.get("NETRC", Path.home() / ".netrc"))
        entry = auth.authenticators(host)
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return entry is not None and bool(entry[2])


def wandb_mode() -> str:
    """``WANDB_MODE`` when set, else ``online`` with credentials and ``offline`` (with a
    notice) without."""
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if _has_credentials():
        return "online"
    log.warning(
        "W&B: no API key found (WANDB_API_KEY, `wandb login`, or a .netrc entry for %s): "
        "logging offline. Upload later with `wandb sync`.",
        base_url(),
    )
    return "offline"


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


def _hydra_job():
    """Hydra's config of the running job, or None outside a Hydra app."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get() if HydraConfig.initialized() else None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split(".", 1)[0].split("/", 1)[0]


def _canonical(overrides) -> list[str]:
    """``key=value`` with Hydra's own formatting of the value (``true`` and ``True`` alike);
    sweeps (``a=1,2``) and deletions as written."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    out = []
    for o in OverridesParser.create().parse_overrides(list(overrides)):
        try:
            out.append(f"{o.get_key_element()}={o.get_value_element_as_str()}")
        except Exception:  # a sweep or a deletion: no single value
            out.append(o.input_line)
    return out


def _sweep_overrides(hydra) -> set[str]:
    """The overrides the whole multirun was started with (``multirun.yaml`` in the sweep folder,
    written before the first job): the same in every job, so they tell no two jobs apart."""
    from omegaconf import OmegaConf

    path = Path(hydra.runtime.output_dir).parent / "multirun.yaml"
    try:
        return set(_canonical(OmegaConf.load(path).hydra.overrides.task))
    except Exception:  # no such file (another launcher) or not readable: name by all overrides
        return set()


def job_run_name(base: str) -> str:
    """``base`` plus the job's own overrides; in a multirun prefixed by the job number.

    ``tiny_demo_lora`` with ``-m optimizer.lr=1e-4,1e-3 trainer.max_epochs=5`` gives
    ``0_tiny_demo_lora optimizer.lr=0.0001`` and ``1_tiny_demo_lora optimizer.lr=0.001``: what
    all jobs share is left out, and two jobs of one sweep never share a name, even when a
    sweeper (Optuna) tries the same values twice.
    """
    hydra = _hydra_job()
    if hydra is None:
        return base
    from hydra.types import RunMode

    multirun = hydra.mode == RunMode.MULTIRUN
    shared = _sweep_overrides(hydra) if multirun else set()
    own = [
        o
        for o in _canonical(hydra.overrides.task)
        if _override_key(o) not in _UNNAMED_KEYS and o not in shared
    ]
    # A secret typed on the command line (``+x.token=...``) must not become a run name.
    own = [
        f"{o.split('=', 1)[0]}=***" if SECRET_NAME.search(o.split("=", 1)[0]) else o for o in own
    ]
    name = scrub(f"{base} {','.join(own)}" if own else base)
    if multirun:
        name = f"{hydra.job.num}_{name}"
    return name[:MAX_NAME]


def sweep_group() -> str | None:
    """The multirun's folder (``logs/train/multiruns/<time>``) as the W&B group, None for a
    single run."""
    hydra = _hydra_job()
    if hydra is None:
        return None
    from hydra.types import RunMode

    if hydra.mode != RunMode.MULTIRUN or not hydra.runtime.output_dir:
        return None
    sweep_dir = Path(hydra.runtime.output_dir).parent
    with contextlib.suppress(ValueError):
        sweep_dir = sweep_dir.relative_to(Path.cwd())
    return sweep_dir.as_posix()[-MAX_NAME:]


def finish_run(exit_code: int = 0) -> None:
    """Finish the live W&B run, if any (uploads in online mode, closes the offline file)."""
    wandb = sys.modules.get("wandb")  # not imported: no run (and no import cost for CSV runs)
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish(exit_code=exit_code)


class FinishWandbRun(Callback):
    """Hydra callback: the job's W&B run ends with its job, so the next job of a multirun (same
    process) opens its own run instead of Lightning reusing the live one."""

    def on_job_end(self, config, job_return, **kwargs) -> None:
        from hydra.core.utils import JobStatus

        finish_run(0 if job_return.status == JobStatus.COMPLETED else 1)


RUN_IDS = "wandb_run_ids.json"


def run_id(save_dir: str | Path, name: str) -> str | None:
    """The W&B run id of the run ``name`` saved under ``save_dir``: drawn at random once and kept
    in ``<save_dir>/wandb_run_ids.json``, so a resumed job logs into the run it started. None on
    DDP ranks other than 0, which start no W&B run (and must not draw an id of their own)."""
    import json
    import secrets

    from lightning.pytorch.utilities import rank_zero_only

    if rank_zero_only.rank != 0:
        return None
    path = Path(save_dir) / RUN_IDS
    ids = json.loads(path.read_text()) if path.is_file() else {}
    if name not in ids:
        ids[name] = secrets.token_hex(8)
        atomic_write_text(path, json.dumps(ids, indent=2, sort_keys=True) + "\n")
    return str(ids[name])


def make_wandb_logger(
    project: str,
    name: str | None = None,
    group: str | None = None,
    tags: list[str] | None = None,
    run_tags: list[str] | None = None,
    save_dir: str = ".",
    entity: str | None = None,
    *,
    offline: bool,
    log_model: bool,
    job_type: str | None = None,
):
    """``WandbLogger`` for this job's own run, offline (with a notice) without credentials.

    Args:
        name: base run name (``<model>_<task>_<finetune>``); the job's overrides and, in a
            multirun, its number are added (:func:`job_run_name`).
        group: W&B group; null = the sweep folder in a multirun, ungrouped otherwise.
        tags, run_tags: the run's W&B tags, in this order without repeats (the config passes
            model, task and finetune names as ``tags`` and its top-level ``tags`` as
            ``run_tags``).
        offline: force offline; also when ``WANDB_MODE=offline`` or no credentials are found
            (``WANDB_API_KEY``, or a ``.netrc`` entry for ``WANDB_BASE_URL``'s host).
        log_model: log the exported ``sam_finetuned.pth`` and its model card as a ``model``
            artifact (alias ``best``) at the end of training; Lightning's own checkpoint upload
            stays off (``.ckpt`` files carry optimizer state and are several times larger).

    The key itself is read by wandb from the environment or ~/.netrc; we never pass it along.
    """
    from lightning.pytorch.loggers import WandbLogger

    if not offline and os.environ.get("WANDB_MODE") != "offline":
        offline = wandb_mode() == "offline"
    if offline:
        os.environ["WANDB_MODE"] = "offline"
    # A run still live here belongs to an earlier job of this process (a failed one, or one
    # started outside Hydra): WandbLogger would log this job into it.
    finish_run()
    Path(save_dir).mkdir(parents=True, exist_ok=True)
    run_name = job_run_name(name) if name else None
    logger = WandbLogger(
        project=project,
        name=run_name,
        # A rerun in the same folder (a resumed or requeued job) continues the same W&B run.
        id=run_id(save_dir, run_name or project),
        resume="allow",
        group=group or sweep_group(),
        tags=list(dict.fromkeys([*(tags or []), *(run_tags or [])])),
        save_dir=save_dir,
        entity=entity,
        offline=offline,
        log_model=False,
        job_type=job_type,
    )
    logger.log_exported_model = bool(log_model)
    return logger
