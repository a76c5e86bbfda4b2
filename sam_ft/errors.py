"""Error types that carry a user-facing message naming the file or option at fault."""

from __future__ import annotations


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
