"""Official weights are hashed once: the verified SHA-256 is remembered by size and mtime."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest

from sam_ft.errors import CheckpointError
from sam_ft.model import download
from sam_ft.model.download import fetch


@pytest.fixture
def hashed(monkeypatch):
    """Counts the real SHA-256 passes over files (the hashing itself is unchanged)."""
    calls = []
    real = download.sha256_of

    def counting(path):
        calls.append(str(path))
        return real(path)

    monkeypatch.setattr(download, "sha256_of", counting)
    return calls


def test_verified_weights_are_not_hashed_again(tmp_path, hashed):
    src = tmp_path / "w.pth"
    src.write_bytes(np.random.default_rng(0).bytes(200_000))
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    cache = tmp_path / "cache"
    out = fetch(src.as_uri(), "w.pth", digest, cache)  # verified while downloading
    for _ in range(3):  # e.g. the zero-shot and the finetuned model of one run, then a rerun
        assert fetch(src.as_uri(), "w.pth", digest, cache) == out
    assert hashed == []

    # Any write changes the size or mtime: the file is hashed again (and here refetched).
    data = bytearray(out.read_bytes())
    data[100] ^= 0xFF
    out.write_bytes(bytes(data))
    os.utime(out, ns=(out.stat().st_atime_ns, out.stat().st_mtime_ns + 10**9))
    assert fetch(src.as_uri(), "w.pth", digest, cache).read_bytes() == src.read_bytes()
    assert hashed == [str(out)]


def test_a_placed_file_is_hashed_once_and_a_wrong_one_still_fails(tmp_path, hashed):
    # A file put into the cache by hand (offline machine) is hashed on first use only.
    cache = tmp_path / "cache"
    cache.mkdir()
    payload = np.random.default_rng(1).bytes(50_000)
    (cache / "w.pth").write_bytes(payload)
    digest = hashlib.sha256(payload).hexdigest()
    for _ in range(3):
        fetch("http://127.0.0.1:9/w.pth", "w.pth", digest, cache)
    assert len(hashed) == 1
    with pytest.raises(CheckpointError, match="could not download"):
        fetch("http://127.0.0.1:9/w.pth", "w.pth", "0" * 64, cache)  # remembered hash differs
