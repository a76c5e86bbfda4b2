"""The ``on_error`` policy for bad input files (``raise`` or ``skip``) and the record of the files
skipped under ``skip``, written as ``skipped.csv``."""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sam_ft.atomic import atomic_write_text
from sam_ft.errors import ConfigError, DataError

log = logging.getLogger(__name__)

SKIPPED_CSV = "skipped.csv"

ON_ERROR = ("raise", "skip")
"""What a bad input file (a :class:`~sam_ft.errors.DataError`) does: stop the command, or be
recorded in ``skipped.csv`` while the other inputs go on."""


def check_on_error(value: Any, option: str) -> str:
    """``value`` of the option ``option`` (``data.on_error``, ``on_error`` of ``predict.py``), which
    must be one of :data:`ON_ERROR`.

    Raises:
        ConfigError: any other value, naming the option.
    """
    if value not in ON_ERROR:
        raise ConfigError(f"{option} must be 'raise' or 'skip', got {value!r}")
    return str(value)


@dataclass(frozen=True)
class SkipEntry:
    """One skipped file: the case it belongs to, the file at fault and why."""

    case: str
    path: str
    reason: str


class SkipLog:
    """Collects skipped files; when ``path`` is given the CSV is rewritten on every addition.

    Rewriting on each ``add`` keeps ``skipped.csv`` complete even if the run is killed later.

    Args:
        path: the CSV file, or a directory (then ``<dir>/skipped.csv``), or None to keep in memory.
    """

    def __init__(self, path: str | Path | None = None) -> None:
        if path is not None:
            path = Path(path)
            if path.is_dir() or not path.suffix:
                path = path / SKIPPED_CSV
        self.path: Path | None = path
        self.entries: list[SkipEntry] = []

    def add(self, case: str, path: str, reason: str) -> None:
        """Record one skipped file and log a one-line warning."""
        self.entries.append(SkipEntry(str(case), str(path), str(reason)))
        log.warning("skipped case %s: %s: %s", case, path, reason)
        if self.path is not None:
            self.write(self.path)

    def write(self, path: str | Path | None = None) -> Path:
        """Write ``case,path,reason`` rows (with header) to ``path`` (default: ``self.path``)."""
        target = Path(path) if path is not None else self.path
        if target is None:
            raise ValueError("SkipLog.write needs a path")
        if target.is_dir():
            target = target / SKIPPED_CSV
        rows = io.StringIO(newline="")
        writer = csv.writer(rows)
        writer.writerow(["case", "path", "reason"])
        for e in self.entries:
            writer.writerow([e.case, e.path, e.reason])
        # Atomic: a kill or a full disk never leaves a half-written list of skipped files.
        return atomic_write_text(target, rows.getvalue())

    @property
    def cases(self) -> set[str]:
        """Case ids with at least one skipped file."""
        return {e.case for e in self.entries}

    def __len__(self) -> int:
        return len(self.entries)


def raise_or_skip(
    on_error: str,
    case: str,
    error: Exception,
    skip_log: SkipLog | None,
    path: str | Path = "",
) -> None:
    """Apply the ``on_error`` policy to one bad input: ``raise`` re-raises ``error``; ``skip``
    records it in ``skip_log`` (when given) and returns, so the caller goes on with the next
    input. A :class:`DataError` names its file and reason; any other error is recorded against
    ``path`` with its type and message."""
    if on_error == "raise":
        raise error
    if skip_log is None:
        return
    if isinstance(error, DataError):
        skip_log.add(case, error.path, error.reason)
    else:
        skip_log.add(case, str(path), f"{type(error).__name__}: {error}")
