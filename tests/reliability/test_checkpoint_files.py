"""Checkpoint files under faults: atomic writes, a resume that skips damaged files, full disks,
stale temp files, and a limited epoch resumed at the next epoch's start."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sam_ft.atomic import sweep_temp_files
from sam_ft.errors import ConfigError, DiskFullError
from sam_ft.training.checkpoints import AtomicCheckpointIO, resolve_ckpt_path


def _checkpoint(step: int) -> dict:
    return {"global_step": step, "state_dict": {"w": torch.full((64, 64), float(step))}}


def _dated(path: Path, state: dict, second: int) -> Path:
    torch.save(state, path)
    os.utime(path, ns=(second * 10**9, second * 10**9))
    return path


def test_resume_skips_damaged_checkpoints_for_the_newest_intact_one(tmp_path, caplog):
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    intact = _dated(folder / "epoch_000.ckpt", _checkpoint(4), 1)
    truncated = _dated(folder / "last.ckpt", _checkpoint(6), 3)
    truncated.write_bytes(truncated.read_bytes()[:-200])
    os.utime(truncated, ns=(3 * 10**9, 3 * 10**9))
    flipped = _dated(folder / "last-v1.ckpt", _checkpoint(5), 2)
    raw = bytearray(flipped.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # inside the tensor data: the zip's CRC no longer matches
    flipped.write_bytes(bytes(raw))
    os.utime(flipped, ns=(2 * 10**9, 2 * 10**9))

    with caplog.at_level(logging.WARNING, logger="sam_ft.training.checkpoints"):
        for mode in ("last", "auto"):
            assert resolve_ckpt_path(mode, tmp_path) == str(intact)
    warned = caplog.text
    assert f"not resuming from {truncated}" in warned and f"not resuming from {flipped}" in warned
    assert torch.load(intact, weights_only=True)["global_step"] == 4

    # An explicit file that is damaged is refused in one line, naming it.
    with pytest.raises(ConfigError, match=f"ckpt_path={truncated}: the file is damaged"):
        resolve_ckpt_path(str(truncated), tmp_path)


def test_last_without_any_intact_checkpoint_says_what_was_found(tmp_path):
    with pytest.raises(ConfigError) as err:
        resolve_ckpt_path("last", tmp_path)
    message = str(err.value)
    # The run dir was passed: the message must not ask for it again.
    assert "stopped before its first checkpoint" in message and "hydra.run.dir" not in message
    assert "\n" not in message
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(ConfigError, match=r"1 found, none intact"):
        resolve_ckpt_path("last", tmp_path)
    assert resolve_ckpt_path("auto", tmp_path) is None  # a fresh start


def test_a_failed_checkpoint_write_keeps_the_previous_file_and_no_temp(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "checkpoints" / "last.ckpt"
    io.save_checkpoint(_checkpoint(1), path)
    with pytest.raises(Exception, match="pickle|lambda"):
        io.save_checkpoint({**_checkpoint(2), "bad": lambda: None}, path)
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == ["last.ckpt"]


def test_a_checkpoint_larger_than_the_free_space_is_one_line_before_writing(tmp_path):
    # A meta tensor has a size but no storage: 2**60 bytes that no disk has free.
    huge = {"state_dict": {"w": torch.empty(2**58, device="meta")}}
    path = tmp_path / "checkpoints" / "last.ckpt"
    with pytest.raises(DiskFullError) as err:
        AtomicCheckpointIO().save_checkpoint(huge, path)
    message = str(err.value)
    assert message.startswith(f"cannot write {path}: ") and "\n" not in message
    assert "free on its disk" in message and "1048576.0 TiB needed" in message
    assert not any(path.parent.iterdir())


FULL_DISK = """
import resource, signal, sys
from omegaconf import OmegaConf
from sam_ft.data.datamodule import SamDataModule
from sam_ft.data.tasks import data_options, task_options
from sam_ft.model.preprocess import SamTransform
from sam_ft.prompts.train_sampling import BoxPrompts

task = OmegaConf.to_container(OmegaConf.load("conf/task/demo.yaml").task)
task["root"] = sys.argv[1] + "/demo"
data = {"cache_dir": sys.argv[1] + "/cache", "prep_workers": 2}
task, data = task_options(task), data_options(data)
dm = SamDataModule(task, data, SamTransform(64), BoxPrompts(), 0, sys.argv[1] + "/run")
dm.prepare_data()  # the demo files, before the disk is "full"
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
# The kernel now refuses writes past 4 KiB (a quota, or a disk with 4 KiB left).
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
dm.setup("fit")
"""


def test_a_full_disk_while_filling_the_slice_cache_is_one_line_naming_the_entry(tmp_path):
    # Two preprocessing workers: the error crosses the process pool with its message.
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(FULL_DISK), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=root,
    )
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sam_ft.errors.DiskFullError: cannot write "), proc.stderr[-2000:]
    assert "File too large" in last and "more than" in last and "needed" in last
    assert str(tmp_path / "cache" / "slices") in last
    assert not list((tmp_path / "cache").rglob(".*.tmp*"))  # nothing half-written is left


def test_stale_temp_files_are_swept_and_live_ones_kept(tmp_path):
    old = tmp_path / "checkpoints" / ".last.ckpt.abc123.tmp"
    old.parent.mkdir()
    old.write_bytes(b"half")
    os.utime(old, (1, 1))
    live = tmp_path / "cache" / ".entry.npz.def456.tmp"
    live.parent.mkdir()
    live.write_bytes(b"being written")
    kept = tmp_path / "checkpoints" / "last.ckpt"
    kept.write_bytes(b"final")
    assert sweep_temp_files(tmp_path, older_than_s=3600) == [old]
    assert live.exists() and kept.exists() and not old.exists()
