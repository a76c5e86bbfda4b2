"""Atomic file writing: a reader sees the old file or the whole new one, never a part.

Every file sam_ft replaces in place (tables, run info, model cards, exported weights, caches,
predictions, downloads) goes through here. The data goes to a temporary file with a unique name
in the target's own folder (``os.replace`` is atomic only within one filesystem, and a unique
name lets two processes write the same target at once: each replaces it with a complete file,
the last one wins), is flushed to disk (``fsync``, so a crash right after the rename does not
leave an empty file under the final name), then renamed over the target. On any error the
temporary file is removed and the target is left as it was.

Temporary names start with a dot (``.<name>.<random>.tmp``) so folder listings and globs for
the final names do not pick them up.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = ["atomic_path", "atomic_write", "atomic_write_text"]


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
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.fchmod(fd, 0o666 & ~_umask())
    return fd, name


def _discard(tmp: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(tmp)


def atomic_write(path: str | Path, write: Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` through ``write(file)`` (a binary file object) atomically; return ``path``.

    ``write`` may raise: the temporary file is then removed, ``path`` is unchanged and the error
    propagates (e.g. a download whose checksum does not match is never renamed into place).
    """
    path = Path(path)
    fd, tmp = _temp_file(path, ".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        _discard(tmp)
        raise
    return path


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
    except BaseException:
        _discard(tmp)
        raise
