"""One atomic writer (sam_ft.atomic): concurrent writers of one file never tear it or collide on
a temporary name, and a failed write leaves the old file and no temporary file behind."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from sam_ft.atomic import atomic_path, atomic_write, atomic_write_text

ROOT = Path(__file__).resolve().parents[1]
SIZE = 1 << 18  # 256 KiB: large enough that a torn write would be visible mid-file


def _payload(writer: int, round_: int) -> bytes:
    """One byte value repeated: a file mixing two writes (or cut short) is easy to tell."""
    return bytes([(writer * 31 + round_) % 251 + 1]) * SIZE


def _whole(data: bytes) -> bool:
    return len(data) == SIZE and data == data[:1] * SIZE


def test_concurrent_threads_never_tear_the_file_nor_share_a_temp_name(tmp_path):
    target = tmp_path / "table.bin"
    atomic_write(target, lambda f: f.write(_payload(0, 0)))
    errors: list[BaseException] = []
    torn: list[int] = []
    done = threading.Event()

    def writer(i: int) -> None:
        try:
            for r in range(40):
                atomic_write(target, lambda f, i=i, r=r: f.write(_payload(i, r)))
        except BaseException as err:  # a shared temp name shows up as FileNotFoundError here
            errors.append(err)

    def reader() -> None:
        while not done.is_set():
            data = target.read_bytes()
            if not _whole(data):
                torn.append(len(data))

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    watch = threading.Thread(target=reader)
    watch.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watch.join()
    assert errors == [] and torn == []
    assert _whole(target.read_bytes())
    assert [p.name for p in tmp_path.iterdir()] == ["table.bin"]  # no temporary file left


_CHILD = """
import json, sys
from sam_ft.inference.card import update_card_evaluation
card, me = sys.argv[1], int(sys.argv[2])
for r in range(150):
    update_card_evaluation(card, {"writer": me, "round": r, "pad": "x" * 20000})
    json.loads(open(card).read())  # a torn card would not parse
"""


def test_two_processes_updating_one_model_card(tmp_path):
    """A real call site: two jobs scoring the same exported model both update its card. With a
    fixed ``.card.json.tmp`` name they overwrote each other's temp file (a torn card, or a
    crash when one renamed the file the other was about to rename)."""
    card = tmp_path / "sam_finetuned.json"
    card.write_text(json.dumps({"format": 1, "evaluation": {}}) + "\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(card), str(i)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    results = [(p.wait(timeout=120), p.stderr.read()) for p in procs]
    assert [rc for rc, _ in results] == [0, 0], "\n".join(err[-2000:] for _, err in results)
    data = json.loads(card.read_text())
    assert data["format"] == 1 and data["evaluation"]["round"] == 149
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sam_finetuned.json"]


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp_file(tmp_path):
    target = tmp_path / "run_info.json"
    atomic_write_text(target, "old\n")

    def broken(f):
        f.write(b"half of the new content")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    with pytest.raises(ValueError, match="bad array"), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise ValueError("bad array")
    assert target.read_text() == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["run_info.json"]


def test_a_new_file_in_a_new_folder_and_no_file_after_a_failure(tmp_path):
    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "new" / "x.bin", lambda f: (_ for _ in ()).throw(RuntimeError()))
    assert list((tmp_path / "new").iterdir()) == []  # the folder was made, nothing left in it
    assert atomic_write_text(tmp_path / "a" / "b.txt", "é").read_bytes() == "é".encode()


def test_atomic_path_keeps_the_extension_for_writers_that_choose_the_format_by_it(tmp_path):
    import nibabel as nib

    target = tmp_path / "case_001.nii.gz"
    labels = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.endswith(".nii.gz") and tmp.name[0] == "."
        nib.save(nib.Nifti1Image(labels, np.eye(4)), tmp)
    assert gzip.decompress(target.read_bytes())[:4] == (348).to_bytes(4, sys.byteorder)
    np.testing.assert_array_equal(np.asarray(nib.load(target).dataobj), labels)
    assert [p.name for p in tmp_path.iterdir()] == ["case_001.nii.gz"]


def test_no_fixed_temporary_names_left_in_sam_ft():
    """Every in-place write goes through sam_ft.atomic: no module builds its own ``.tmp`` name."""
    offenders = [
        f"{p.relative_to(ROOT)}:{n}"
        for p in sorted((ROOT / "sam_ft").rglob("*.py"))
        if p.name != "atomic.py"
        for n, line in enumerate(p.read_text().splitlines(), 1)
        if ('.tmp"' in line or ".tmp." in line or "mkstemp(" in line)
    ]
    assert offenders == []


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_mode_of_the_users_umask(tmp_path, umask):
    """mkstemp's 0600 would hide predictions and tables from colleagues on a shared cluster."""
    old = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        plain.write_text("x")  # what any other program of this user would create
        written = atomic_write_text(tmp_path / "table.csv", "a,b\n")
        with atomic_path(tmp_path / "label.nii.gz") as tmp:
            tmp.write_bytes(b"x")
    finally:
        os.umask(old)
    expected = plain.stat().st_mode & 0o777
    assert expected == 0o666 & ~umask
    assert written.stat().st_mode & 0o777 == expected
    assert (tmp_path / "label.nii.gz").stat().st_mode & 0o777 == expected


KILLED_MID_WRITE = """
import sys, time
from sam_ft.atomic import atomic_write

def write(f):
    f.write(b"half an entry")
    f.flush()
    print("writing", flush=True)
    time.sleep(600)

atomic_write(sys.argv[1], write)
"""


def test_a_killed_writers_temp_file_is_removed_by_its_pid_and_others_are_kept(tmp_path):
    """A terminated pool worker dies mid-write (SIGKILL runs no cleanup): its parent removes the
    worker's temporary file at once; another live writer's file in the same folder stays."""
    from sam_ft.atomic import remove_temp_files_of

    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_MID_WRITE, str(tmp_path / "entry.npz")],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait()
    (left,) = tmp_path.iterdir()
    assert left.name.startswith(f".entry.npz.{child.pid}-") and left.name.endswith(".tmp")
    live = tmp_path / f".other.npz.{os.getpid()}-abc.tmp"  # a live writer (this process)
    live.write_bytes(b"being written")
    assert remove_temp_files_of(tmp_path, [child.pid]) == [left]
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name]
