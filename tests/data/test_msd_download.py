"""MSD downloads: the checksum always holds, a wrong location or a full disk fails before any
byte is fetched, and the archive is removed after a verified extraction.

Real archives (tar of NIfTI files) served by ``file://`` URLs or a local HTTP server.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import http.server
import shutil
import tarfile
import threading
from pathlib import Path

import pytest
from partial_api import find_cases, prepare_task

from sam_ft.data import tasks as tasks_module
from sam_ft.errors import DataError

SPLEEN = {"name": "spleen_ct", "source": "decathlon"}


def _archive(tmp_path: Path, h, folder: str = "Task09_Spleen") -> tuple[Path, str]:
    """A small MSD-layout archive (2 cases) whose top folder is ``folder``; (path, md5)."""
    src = tmp_path / "src" / folder
    image, label = h.simple_case()
    for i in range(2):
        h.write_nifti(src / "imagesTr" / f"spleen_{i}.nii.gz", image)
        h.write_nifti(src / "labelsTr" / f"spleen_{i}.nii.gz", label)
    archive = tmp_path / "mirror" / "Task09_Spleen.tar"
    archive.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(archive, "w") as tar:
        tar.add(src, arcname=folder)
    return archive, hashlib.md5(archive.read_bytes()).hexdigest()


@pytest.fixture
def http_mirror(tmp_path):
    """A real HTTP server on 127.0.0.1 over ``tmp_path/mirror``; counts GET requests."""
    root = tmp_path / "mirror"
    root.mkdir(exist_ok=True)
    hits = collections.Counter()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            hits[self.path] += 1
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(root))
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}", hits
    server.shutdown()


@pytest.mark.parametrize("scheme", ["file", "http"])
def test_mirror_keeps_the_presets_md5(tmp_path, h, http_mirror, scheme):
    # The mirror holds an archive that is not the published Task09_Spleen.tar and task.md5 is
    # unset: the preset's md5 still applies, so this is an error naming the file, not a warning.
    archive, md5 = _archive(tmp_path, h)
    url = archive.as_uri() if scheme == "file" else f"{http_mirror[0]}/{archive.name}"
    data = tmp_path / "data"
    with pytest.raises(DataError, match="md5 mismatch") as err:
        prepare_task({**SPLEEN, "url": url}, data_dir=data)
    assert str(data / "Task09_Spleen.tar") in str(err.value) and url in str(err.value)
    assert not (data / "Task09_Spleen").exists() and not (data / "Task09_Spleen.tar").exists()
    # task.md5 overrides the preset's: the same mirror now downloads and reads.
    root = prepare_task({**SPLEEN, "url": url, "md5": md5}, data_dir=data)
    assert len(find_cases(root, SPLEEN)) == 2


def test_archive_removed_after_verified_extraction_unless_kept(tmp_path, h):
    archive, md5 = _archive(tmp_path, h)
    task = {**SPLEEN, "url": archive.as_uri(), "md5": md5}
    root = prepare_task(task, data_dir=tmp_path / "a")
    assert len(find_cases(root, task)) == 2
    assert sorted(p.name for p in (tmp_path / "a").iterdir() if not p.name.endswith(".lock")) == [
        "Task09_Spleen"
    ]  # neither the archive nor a staging folder is left
    prepare_task({**task, "keep_archive": True}, data_dir=tmp_path / "b")
    assert (tmp_path / "b" / "Task09_Spleen.tar").read_bytes() == archive.read_bytes()


def test_wrong_root_fails_before_downloading(tmp_path, h):
    # task.root names a folder the archive can never fill (it extracts to <parent>/Task09_Spleen).
    archive, md5 = _archive(tmp_path, h)
    task = {**SPLEEN, "url": archive.as_uri(), "md5": md5}
    data = tmp_path / "data"
    with pytest.raises(DataError, match="Nothing was downloaded") as err:
        prepare_task({**task, "root": str(data / "spleen")})
    assert str(data / "spleen") in str(err.value) and str(data / "Task09_Spleen") in str(err.value)
    assert not data.exists() or not any(data.glob("*.tar"))
    # A folder that exists with other content is not an MSD task folder either.
    (data / "Task09_Spleen" / "notes").mkdir(parents=True)
    with pytest.raises(DataError, match="Nothing was downloaded"):
        prepare_task({**task, "root": str(data / "Task09_Spleen")})
    assert not any(data.glob("*.tar"))


def test_full_disk_fails_before_downloading(tmp_path, h, http_mirror, monkeypatch):
    # The preset's archive size is checked against the free space before any request.
    archive, md5 = _archive(tmp_path, h)
    base, hits = http_mirror
    monkeypatch.setitem(tasks_module.DECATHLON_ARCHIVE_BYTES, "Task09_Spleen", 10**18)
    data = tmp_path / "data"
    with pytest.raises(DataError, match="free here") as err:
        prepare_task({**SPLEEN, "url": f"{base}/{archive.name}", "md5": md5}, data_dir=data)
    assert str(data) in str(err.value) and "Nothing was downloaded" in str(err.value)
    assert sum(hits.values()) == 0 and not any(data.glob("*.tar"))


def test_file_mirror_checks_its_own_size(tmp_path):
    # A sparse file larger than the free space: the check uses the mirror file's real size.
    big = tmp_path / "mirror" / "Task09_Spleen.tar"
    big.parent.mkdir()
    with open(big, "wb") as f:
        f.truncate(shutil.disk_usage(tmp_path).free + 1)
    with pytest.raises(DataError, match="free here"):
        prepare_task({**SPLEEN, "url": big.as_uri()}, data_dir=tmp_path / "data")
    assert not any((tmp_path / "data").glob("*.tar"))


def test_killed_extraction_is_redone(tmp_path, h):
    # A staging folder left by a killed extraction is never taken for the dataset.
    archive, md5 = _archive(tmp_path, h)
    data = tmp_path / "data"
    (data / ".Task09_Spleen.extracting" / "Task09_Spleen" / "imagesTr").mkdir(parents=True)
    root = prepare_task({**SPLEEN, "url": archive.as_uri(), "md5": md5}, data_dir=data)
    assert len(find_cases(root, SPLEEN)) == 2
    assert not (data / ".Task09_Spleen.extracting").exists()
