"""Fetch published weights into a local cache, verified by SHA-256, written atomically."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import BinaryIO

from tqdm.auto import tqdm

from sam_ft.atomic import atomic_write, atomic_write_text
from sam_ft.errors import CheckpointError

log = logging.getLogger(__name__)

_CHUNK = 1 << 20


def cache_dir() -> Path:
    """``$SAM_FT_CACHE``, default ``~/.cache/sam_ft``."""
    return Path(os.environ.get("SAM_FT_CACHE", Path.home() / ".cache" / "sam_ft")).expanduser()


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _records_file() -> Path:
    return cache_dir() / "verified_sha256.json"


def _stat_key(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_records() -> dict:
    try:
        return json.loads(_records_file().read_text())
    except (OSError, ValueError):
        return {}  # none yet, or damaged: files are simply hashed again


def remember_sha256(path: Path, sha256: str) -> None:
    """Record that ``path``, at its current size and mtime, hashes to ``sha256``."""
    from filelock import FileLock

    records_file = _records_file()
    records_file.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(records_file) + ".lock"):
        records = _read_records()
        records[str(path.resolve())] = {**_stat_key(path), "sha256": sha256}
        atomic_write_text(records_file, json.dumps(records, indent=1))


def verified_sha256(path: Path) -> str:
    """SHA-256 of ``path``, hashed once and remembered while its size and mtime are unchanged.

    Hashing ViT-H's 2.4 GB takes seconds and a run builds the model twice; any write to the file
    (a new download, a truncation, an edit) changes its mtime or size, which forces a re-hash.
    """
    record = _read_records().get(str(path.resolve()))
    if record and {k: record.get(k) for k in ("size", "mtime_ns")} == _stat_key(path):
        return str(record["sha256"])
    digest = sha256_of(path)
    remember_sha256(path, digest)
    return digest


def fetch(url: str, filename: str, sha256: str | None, directory: Path | None = None) -> Path:
    """Return the cached file for ``url``, downloading it first if needed.

    A cached file is reused only if its hash matches (when a hash is known; the result is
    remembered by size and mtime, see :func:`verified_sha256`). Without a known hash
    (``sha256=None``: SAM-HQ's and SAM 2.1's files) nothing is verified here and the download's
    own SHA-256 is logged; the caller's strict load checks the file's contents. The download goes to
    a temporary file in the cache directory and is renamed into place after verification, so a
    killed download or a concurrent job never leaves a partial file under the final name.

    Raises:
        CheckpointError: offline or unreachable URL (the message says where to put the file by
            hand), or a SHA-256 mismatch.
    """
    directory = Path(directory or cache_dir())
    target = directory / filename
    if target.exists():
        if sha256 is None or verified_sha256(target) == sha256:
            return target
        log.warning("%s does not match its published SHA-256; downloading it again", target)

    digest = hashlib.sha256()

    def download(out: BinaryIO) -> None:
        # Hashed while streaming; a mismatch raises inside atomic_write, which then removes the
        # temporary file: a bad download never appears under the final name.
        try:
            with urllib.request.urlopen(url, timeout=60) as response:
                total = int(response.headers.get("Content-Length") or 0) or None
                bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"download {filename}")
                with bar:
                    while chunk := response.read(_CHUNK):
                        out.write(chunk)
                        digest.update(chunk)
                        bar.update(len(chunk))
        except (urllib.error.URLError, OSError, ValueError) as err:
            raise CheckpointError(
                f"could not download {url} ({err}). If this machine is offline, download the "
                f"file elsewhere and put it at {target} (or set SAM_FT_CACHE to its folder)."
            ) from None
        if sha256 is not None and digest.hexdigest() != sha256:
            raise CheckpointError(
                f"SHA-256 mismatch for {url}: got {digest.hexdigest()}, expected {sha256}. "
                "The file was not saved."
            )

    atomic_write(target, download)
    remember_sha256(target, digest.hexdigest())  # hashed while downloading
    if sha256 is None:
        # Nothing to compare with (no published hash): the strict load checks the contents.
        log.warning(
            "%s: no published SHA-256 to verify; its SHA-256 is %s", target, digest.hexdigest()
        )
    log.info("saved %s", target)
    return target
