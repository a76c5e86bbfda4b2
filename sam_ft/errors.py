"""Error types that carry a user-facing message naming the file or option at fault."""

from __future__ import annotations

import contextlib
import functools
import logging
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SamFtError(Exception):
    """Base class: the message is meant for the user, one line, no traceback needed."""


class ConfigError(SamFtError):
    """A configuration option has a value we cannot use."""


class CheckpointError(SamFtError):
    """A checkpoint file is missing, unsafe, corrupt or does not fit the model."""


class DataError(SamFtError):
    """An input file cannot be used. ``path`` names it; ``reason`` says what is wrong."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def own_error(err: BaseException | None) -> SamFtError | None:
    """``err`` itself, or the first of its causes, that is one of ours; None when none is."""
    while err is not None and not isinstance(err, SamFtError):
        err = err.__cause__ or err.__context__
    return err


def _log_to_files(err: SamFtError) -> None:
    """Record ``err`` in the run's log files (Hydra's ``<job>.log``) but not on the console,
    where the ``error:`` line already says it: the user reads it once."""
    logger = logging.getLogger("sam_ft")
    record = logger.makeRecord(logger.name, logging.ERROR, __file__, 0, "%s", (err,), None)
    for handler in logging.getLogger().handlers + logger.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def _remove_empty_run_dir() -> None:
    """A run that stopped on a user error before writing anything of its own leaves no run dir
    (Hydra's ``.hydra/`` and job log are all it holds): ``logs/`` keeps only runs worth opening.
    A dir holding anything else (a checkpoint, a table, a cache) is kept as it is."""
    import shutil
    from pathlib import Path

    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        run_dir = Path(HydraConfig.get().runtime.output_dir)
    except Exception:
        return
    if not run_dir.is_dir():
        return
    if all(p.name == ".hydra" or (p.is_file() and p.suffix == ".log") for p in run_dir.iterdir()):
        logging.shutdown()  # closes the job log before its file goes
        shutil.rmtree(run_dir, ignore_errors=True)
        parent = run_dir.parent  # runs/<run name>/, now empty when this was its only run
        with contextlib.suppress(OSError):
            parent.rmdir()


def exit_on_own_error(fn: Callable[[Any], T]) -> Callable[[Any], T]:
    """Our own errors end a command with one readable line and exit code 1, not a traceback.

    Also when Hydra wraps them: an error raised while a ``_target_`` is built (a bad checkpoint,
    a model/image-size mismatch) arrives as ``InstantiationException`` with ours as its cause.
    """

    @functools.wraps(fn)
    def run(cfg: Any) -> T:
        try:
            return fn(cfg)
        except Exception as err:
            ours = own_error(err)
            if ours is None:
                raise
            _log_to_files(ours)
            print(f"error: {ours}", file=sys.stderr)
            _remove_empty_run_dir()
            raise SystemExit(1) from None

    return run
