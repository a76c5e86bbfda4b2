"""Atomic file writing: a reader sees the old file or the whole new one, never a part.

Every file sam_ft replaces in place (tables, run info, model cards, exported weights, caches,
predictions, downloads) goes through here. The data goes to a temporary file with a unique name
in the target's own folder (``os.replace`` is atomic only within one filesystem, and a unique
name lets two processes write the same target at once: each replaces it with a complete file,
the last one wins), is flushed to disk (``fsync``, so a crash right after the rename does not
leave an empty file under the final name), then renamed over the target. On any error the
temporary file is removed and the target is left as it was.

Temporary names start with a dot (``.<name>.<pid>-<random>.tmp``) so folder listings and globs
for the final names do not pick them up. A process killed mid-write leaves its temporary file
behind; :func:`sweep_temp_files` removes those at the next start, and a parent that kills its
own workers (a terminated pool) removes theirs at once with :func:`remove_temp_files_of`, found
by the writer's process id in the name. A full disk (or quota) is a
one-line :class:`~sam_ft.errors.DiskFullError` naming the file, the free space and the bytes
needed, not a traceback from wherever the write happened.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from sam_ft.errors import DiskFullError

__all__ = [
    "atomic_path",
    "atomic_write",
    "atomic_write_text",
    "check_free_space",
    "disk_full_error",
    "remove_temp_files_of",
    "STALE_TEMP_S",
    "sweep_temp_files",
]

log = logging.getLogger(__name__)

# No space left, over quota, over the file size limit (``ulimit -f``): the write cannot finish.
_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
STALE_TEMP_S = 6 * 3600
"""Age after which a temporary file in a folder shared by jobs (a cache) is a killed writer's:
no single write takes that long."""

TEMP_GLOB = ".*.tmp*"
"""Names of the temporary files written here (``.<name>.<pid>-<random>.tmp[.<suffixes>]``)."""


def _umask() -> int:
    """The process's umask (``os.umask`` can only be read by setting it, so it is put back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _temp_file(path: Path, suffix: str) -> tuple[int, str]:
    """A new, uniquely named file beside ``path`` (its folder is created): (fd, name).

    ``mkstemp`` creates the file readable by its owner only; the final file gets the mode any
    new file of this user gets (0666 less the umask), so colleagues sharing a cluster project
    folder can read predictions and tables as they read the user's other files.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}.{os.getpid()}-"
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=suffix)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, name


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _free(folder: Path) -> int | None:
    """Free bytes on ``folder``'s disk; None when the filesystem does not say."""
    with contextlib.suppress(OSError):
        return shutil.disk_usage(folder).free
    return None


def disk_full_error(
    path: str | Path, needed: int | None, code: int = errno.ENOSPC, at_least: bool = False
) -> DiskFullError:
    """The one-line error for ``path`` not written (``needed``: bytes, when known, ``at_least``
    when only the bytes written before the refusal are; ``code``: the refusal's ``errno``)."""
    path = Path(path)
    free = _free(path.parent if path.parent.exists() else Path.cwd())
    free_text = "unknown free space" if free is None else f"{_size(free)} free"
    need = f"; {'more than ' if at_least else ''}{_size(needed)} needed" if needed else ""
    return DiskFullError(
        f"cannot write {path}: {os.strerror(code)} ({free_text} on its disk{need}); "
        "free some space or write elsewhere, then run the same command again"
    )


def check_free_space(path: str | Path, needed: int) -> None:
    """Raise :func:`disk_full_error` before writing ``needed`` bytes to ``path`` when its disk
    has less free space than that (the write would fail midway)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    free = _free(path.parent)
    if free is not None and free < needed:
        raise disk_full_error(path, needed)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` through ``write(file)`` (a binary file object) atomically; return ``path``.

    ``write`` may raise: the temporary file is then removed, ``path`` is unchanged and the error
    propagates (e.g. a download whose checksum does not match is never renamed into place).
    """
    path = Path(path)
    try:
        fd, tmp = _temp_file(path, ".tmp")
    except OSError as err:
        if err.errno in _FULL:
            raise disk_full_error(path, None, err.errno) from None
        raise
    written = 0
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            finally:
                with contextlib.suppress(OSError, ValueError):
                    written = f.tell()
        os.replace(tmp, path)
    except BaseException as err:
        _discard(tmp)
        if code := _full_errno(err):
            raise disk_full_error(path, written or None, code, at_least=True) from None
        raise
    return path


def _full_errno(err: BaseException | None) -> int | None:
    """The errno of a full disk behind ``err``, also when a writer wraps the ``OSError``
    (``torch.save``'s zip writer raises a ``RuntimeError`` in its context), else None."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in _FULL:
            return err.errno
        err = err.__cause__ or err.__context__
    return None


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`); return ``path``."""
    data = text.encode(encoding)
    return atomic_write(path, lambda f: f.write(data))


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temporary path to write ``path``'s new content to, for writers that take a file name
    only (``nibabel.save``); renamed over ``path`` when the block ends without error.

    The temporary name ends with ``path``'s own suffixes (``.tmp.nii.gz``) because such writers
    choose the format (and the compression) by extension.
    """
    path = Path(path)
    fd, tmp = _temp_file(path, ".tmp" + "".join(path.suffixes[-2:]))
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        _discard(tmp)
        if code := _full_errno(err):
            raise disk_full_error(path, None, code) from None
        raise


def sweep_temp_files(
    root: str | Path, older_than_s: float = 0.0, recursive: bool = True
) -> list[Path]:
    """Remove the temporary files under ``root`` that writers killed mid-write left behind.

    Only files named as this module names them and last written more than ``older_than_s``
    seconds ago are removed: a folder shared with running jobs (a cache) passes an age no write
    takes, so a file another process is writing now is kept. ``recursive=False``: ``root``'s
    own files only. Returns the removed files.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    cutoff = time.time() - older_than_s
    removed = []
    for tmp in root.rglob(TEMP_GLOB) if recursive else root.glob(TEMP_GLOB):
        with contextlib.suppress(OSError):
            if tmp.is_file() and tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed.append(tmp)
    if removed:
        log.info("removed %d stale temporary file(s) under %s", len(removed), root)
    return removed


def remove_temp_files_of(folder: str | Path, pids: Iterable[int]) -> list[Path]:
    """Remove the temporary files in ``folder`` (not below) that the processes ``pids`` left.

    For a parent that has just killed its workers (``Pool.terminate`` in the middle of their
    writes): those files belong to no live writer, and other processes' files (another rank
    writing the same cache) are kept, whatever their age. Returns the removed files.
    """
    folder = Path(folder)
    removed = []
    for pid in set(pids):
        for tmp in folder.glob(f".*.{pid}-*.tmp*"):
            with contextlib.suppress(OSError):
                tmp.unlink()
                removed.append(tmp)
    return removed
