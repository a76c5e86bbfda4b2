"""Evaluation in shares equals one process: 2 CPU ranks (gloo), and 2 merged ``eval.shard`` jobs.

Real ``evaluate.py`` processes on the demo task's NIfTI volumes (every split), three prompt
strategies and one jitter level, tiny model with seeded random weights, each with its default
thread count (sam_ft/reproducible.py). "Equal" is byte-equal files: the tables, the summaries
and the plots.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sam_ft.errors import ConfigError
from sam_ft.evaluation.protocol.merge import balanced_shares, merge_shards, parse_shard
from sam_ft.report import main as report_main

ROOT = Path(__file__).resolve().parents[1]
ARGS = [
    "task=demo",
    "eval.split=all",
    "eval.prompts=[point1,point5,box]",
    "eval.jitter_px=[[0,10]]",
    "eval.overlays=2",
]
FILES = [
    "per_object.csv",
    "per_case.csv",
    "summary.csv",
    "summary_case.csv",
    "summary.md",
    "spearman.csv",
    "skipped.csv",
    "comparisons.csv",  # the bootstrap and the paired tests run on the merged tables (#29)
    "calibration.csv",
    "provenance.json",
]


def _start(run_dir: Path, cache: Path, *extra: str) -> subprocess.Popen:
    # Threads NOT pinned: one process, each rank (Lightning gives it its share of the cores) and
    # each shard run with their own default thread counts and must still agree byte for byte.
    env = dict(os.environ, SAM_FT_CACHE=str(cache), WANDB_MODE="offline")
    drop = ("OMP_NUM_THREADS", "MKL_CBWR", "WANDB_API_KEY", "NODE_RANK", "LOCAL_RANK")
    for key in (*drop, "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    return subprocess.Popen(
        [sys.executable, str(ROOT / "evaluate.py"), *ARGS, *extra, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait(*procs: subprocess.Popen) -> list[str]:
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs, strict=True):
        assert p.returncode == 0, out[-4000:]
    return outs


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process, 2 ranks, and shards 0/2 and 1/2: all at once (independent runs)."""
    tmp = tmp_path_factory.mktemp("eval_dist")
    cache = tmp / "cache"
    # The demo data and slice cache first, so the concurrent runs only read them.
    _wait(_start(tmp / "single", cache))
    outs = _wait(
        _start(tmp / "ddp", cache, "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"),
        # A fresh slice cache: the shard fills it with its own cases only (#28).
        _start(tmp / "shard0", cache, "eval.shard=0/2", f"data.cache_dir={tmp / 'cache0'}"),
        _start(tmp / "shard1", cache, "eval.shard=1/2"),
    )
    (tmp / "ddp.log").write_text(outs[0])
    return tmp


def _assert_same_files(want: Path, got: Path) -> None:
    for name in FILES:
        assert (got / name).read_bytes() == (want / name).read_bytes(), name
    plots = sorted(p.name for p in (want / "plots").glob("*.png"))
    assert "overlays_best_zero_shot.png" in plots
    assert plots == sorted(p.name for p in (got / "plots").glob("*.png"))
    for name in plots:
        assert (got / "plots" / name).read_bytes() == (want / "plots" / name).read_bytes(), name


def test_two_cpu_ranks_equal_one_process(runs):
    log = (runs / "ddp.log").read_text()
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in log  # a real second process joined (gloo)
    shares = [
        json.loads((runs / "ddp" / ".ranks" / f"{r}-of-2" / "shard.json").read_text())
        for r in (0, 1)
    ]
    cases = [set(s["cases"]) for s in shares]
    assert cases[0] and cases[1] and not cases[0] & cases[1]  # disjoint, both non-empty
    _assert_same_files(runs / "single", runs / "ddp")


def test_two_merged_shards_equal_one_process(runs, tmp_path, capsys):
    assert (
        report_main(["merge", str(runs / "shard0"), str(runs / "shard1"), "--out", str(tmp_path)])
        == 0
    )
    _assert_same_files(runs / "single", tmp_path)
    # Each shard folder alone holds only its share.
    rows = [
        len((runs / d / "per_object.csv").read_text().splitlines()) for d in ("shard0", "shard1")
    ]
    whole = len((runs / "single" / "per_object.csv").read_text().splitlines())
    assert sum(r - 1 for r in rows) == whole - 1 and min(rows) > 1
    # A shard reads (preprocesses, verifies) only its own cases, not the whole split.
    mine = json.loads((runs / "shard0" / "shard.json").read_text())["cases"]
    entries = sorted(p.name.rsplit("-", 1)[0] for p in (runs / "cache0" / "slices").glob("*.npz"))
    every = json.loads((runs / "single" / "splits.json").read_text())
    assert entries == sorted(mine) and len(mine) < sum(len(v) for v in every.values())


def test_merge_refuses_a_missing_shard_or_another_config(runs, tmp_path, capsys):
    assert report_main(["merge", str(runs / "shard0"), "--out", str(tmp_path / "a")]) == 1
    assert "shard 1/2 missing" in capsys.readouterr().err
    other = tmp_path / "other"
    shutil.copytree(runs / "shard1", other)
    meta = json.loads((other / "shard.json").read_text())
    meta["config"]["eval"]["prompts"] = ["box"]
    (other / "shard.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"another configuration.*eval\.prompts"):
        merge_shards([runs / "shard0", other], tmp_path / "b")
    with pytest.raises(ConfigError, match="given twice"):
        merge_shards([runs / "shard0", runs / "shard0", runs / "shard1"], tmp_path / "c")


def test_killed_rank_resumes_its_own_share(runs, tmp_path):
    """A rank that lost its last case (killed before its marker) redoes only that case."""
    run = tmp_path / "ddp"
    shutil.copytree(runs / "ddp", run)
    for name in FILES:
        (run / name).unlink()
    progress = [run / ".ranks" / f"{r}-of-2" / "progress.jsonl" for r in (0, 1)]
    before = [p.read_text().splitlines() for p in progress]
    progress[1].write_text("\n".join(before[1][:-1]) + "\n" if before[1][:-1] else "")
    _wait(
        _start(run, runs / "cache", "trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    )
    after = [p.read_text().splitlines() for p in progress]
    assert after[0] == before[0]  # rank 0 had nothing left to do
    assert after[1] == before[1]  # rank 1 scored its lost case again, and only it
    _assert_same_files(runs / "single", run)


def test_shares_are_balanced_by_slices_and_deterministic():
    shares = balanced_shares(["a", "b", "c", "d", "e"], [10, 1, 6, 5, 2], 2)
    assert shares == [[0, 4], [1, 2, 3]]  # 12 vs 12 slices; each share in case order
    assert balanced_shares(["a"], [3], 3) == [[0], [], []]
    assert parse_shard("1/4").index == 1 and parse_shard(None) is None
    for bad in ("4/4", "1-4", "x/2", "0/0"):
        with pytest.raises(ConfigError, match="eval.shard"):
            parse_shard(bad)


def test_train_ddp_evaluates_in_shares(tmp_path):
    """train.py under DDP: both ranks score a share of the final evaluation; rank 0 merges."""
    run = tmp_path / "run"
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.update(WANDB_MODE="offline")
    args = [
        "model=tiny",
        "task=demo",
        "trainer=ddp",
        "trainer.accelerator=cpu",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "train.overlays=0",
        "eval.prompts=[box]",
        "eval.jitter_px=[[0,10]]",
        "callbacks.progress=null",
        f"hydra.run.dir={run}",
    ]
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    shares = [
        set(json.loads((run / "eval" / ".ranks" / f"{r}-of-2" / "shard.json").read_text())["cases"])
        for r in (0, 1)
    ]
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    rows = pd.read_csv(run / "eval" / "per_object.csv", dtype={"case": str})
    assert set(rows["model"]) == {"zero_shot", "finetuned"}
    for model in ("zero_shot", "finetuned"):
        assert set(rows.loc[rows["model"] == model, "case"]) == shares[0] | shares[1]
    assert (run / "eval" / "summary.md").is_file() and (run / "sam_finetuned.pth").is_file()
