"""Error types that carry a user-facing message naming the file or option at fault."""

from __future__ import annotations

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


class DiskFullError(SamFtError):
    """A file could not be written because its filesystem is full (or over quota)."""


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
            logging.getLogger("sam_ft").error("%s", ours)
            print(f"error: {ours}", file=sys.stderr)
            raise SystemExit(1) from None

    return run
