"""Kill anywhere, run the same command again: the run ends exactly as an uninterrupted one.

Each case is a real ``train.py`` (demo task, tiny model, 2 epochs of 4 steps, validation after
each, the final zero-shot vs finetuned evaluation) stopped at one point by SIGKILL or SIGTERM,
from a callback (``_faults.SignalAtStep``) or inside the product's own step (``_faults.
KillInside``: data preparation, embedding caching, a checkpoint write cut in half, the export
cut in half, the evaluation between two cases), never by a timer. The same command is then run
again (``ckpt_path=auto``, the default: a requeued job) and must end with a byte-identical
``sam_finetuned.pth`` and byte-identical evaluation tables.
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
from _train_run import run_train  # tests/reliability/_train_run.py

ROOT = Path(__file__).resolve().parents[2]
RUN = [
    "model=tiny",  # the synthetic demo (the default run is LiteMedSAM on MNI152)
    "task=demo",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "train.overlays=0",
    "callbacks.step_checkpoint.every_n_train_steps=1",
    "data.prep_workers=1",
    "eval.prompts=[box,point1]",
    "eval.jitter_px=[]",
    "eval.overlays=0",
    "eval.workers=0",
]
TABLES = ["per_object.csv", "per_case.csv", "summary.csv", "summary_case.csv", "spearman.csv"]

pytestmark = pytest.mark.heavy


def train(run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_train([*RUN, *overrides], run_dir, cache, timeout=900)


def at_step(step: int, signum: int, when: str) -> list[str]:
    return [
        "+callbacks.fault._target_=_faults.SignalAtStep",
        f"+callbacks.fault.step={step}",
        f"+callbacks.fault.signum={int(signum)}",
        f"+callbacks.fault.when={when}",
    ]


def inside(where: str, nth: int) -> list[str]:
    return [
        "+callbacks.fault._target_=_faults.KillInside",
        f"+callbacks.fault.where={where}",
        f"+callbacks.fault.nth={nth}",
    ]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = train(run_dir, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


KILL, TERM = -signal.SIGKILL, 1  # exit codes: killed; stopped with a checkpoint (Preempted)
# (id, fault overrides, exit code of the stopped run, its own data cache)
POINTS = [
    ("data_preparation", inside("prep", 3), KILL, True),
    ("embedding_cache", inside("embedding", 5), KILL, True),
    ("mid_epoch_step", at_step(6, signal.SIGKILL, "end"), KILL, False),
    ("sigterm_mid_epoch", at_step(2, signal.SIGTERM, "end"), TERM, False),
    ("validation", at_step(4, signal.SIGKILL, "validation"), KILL, False),
    ("sigterm_validation", at_step(4, signal.SIGTERM, "validation"), TERM, False),
    ("epoch_end", at_step(4, signal.SIGKILL, "start"), KILL, False),
    # The 6th write is last.ckpt after the first validation: cut in half, in its temp file.
    ("checkpoint_write", inside("checkpoint", 6), KILL, False),
    ("last_validation", at_step(8, signal.SIGKILL, "validation"), KILL, False),
    ("export", inside("export", 1), KILL, False),
    # The 3rd progress record: the second case is scored by the first model, not yet marked.
    ("evaluation", inside("evaluation", 3), KILL, False),
]


@pytest.mark.parametrize(
    ("faults", "code", "own_cache"), [p[1:] for p in POINTS], ids=[p[0] for p in POINTS]
)
def test_killed_anywhere_then_rerun_equals_uninterrupted(
    tmp_path, cache, uninterrupted, faults, code, own_cache
):
    # Preparation and embedding kills need a cache the reference run has not filled already.
    data = [f"data.cache_dir={tmp_path / 'data_cache'}"] if own_cache else []
    run_dir = tmp_path / "run"
    stopped = train(run_dir, cache, *data, *faults)
    assert stopped.returncode == code, stopped.stderr[-3000:]
    assert not (run_dir / "eval" / "summary.csv").exists()

    again = train(run_dir, cache, *data)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Traceback" not in again.stderr
    want = (uninterrupted / "sam_finetuned.pth").read_bytes()
    assert (run_dir / "sam_finetuned.pth").read_bytes() == want
    for table in TABLES:
        got = (run_dir / "eval" / table).read_text()
        assert got == (uninterrupted / "eval" / table).read_text(), table
    # A write cut short left only a temp file, swept by the rerun; no checkpoint is damaged.
    assert not list(run_dir.rglob(".*.tmp*"))


def test_half_written_newest_checkpoint_resumes_from_the_newest_intact_one(
    tmp_path, cache, uninterrupted
):
    # A writer that is not atomic (Lightning's copy across filesystems, a full disk) leaves the
    # newest checkpoint truncated under its final name: the resume warns naming it and falls
    # back to the newest intact one (the end of the first epoch's validation).
    run_dir = tmp_path / "run"
    killed = train(run_dir, cache, *at_step(6, signal.SIGKILL, "end"))
    assert killed.returncode == KILL, killed.stderr[-3000:]
    last = run_dir / "checkpoints" / "last.ckpt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])

    again = train(run_dir, cache)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"not resuming from {last}" in again.stderr + again.stdout
    assert (run_dir / "sam_finetuned.pth").read_bytes() == (
        uninterrupted / "sam_finetuned.pth"
    ).read_bytes()
    for table in TABLES:
        got = (run_dir / "eval" / table).read_text()
        assert got == (uninterrupted / "eval" / table).read_text(), table
