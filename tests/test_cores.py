"""The cores a rank may use come from its node's own allocation (CPU affinity, SLURM's
per-task and per-node counts), divided among the ranks that share it, never by the global world
size: the default of ``data.prep_workers`` and ``eval.workers``."""

from __future__ import annotations

import os

import pytest

from sam_ft.cores import cores_per_rank, slurm_tasks_on_node
from sam_ft.data.preparation import prep_workers
from sam_ft.evaluation.protocol.scoring_pool import default_workers

SLURM = (
    "SLURM_CPUS_PER_TASK",
    "SLURM_CPUS_ON_NODE",
    "SLURM_NTASKS_PER_NODE",
    "SLURM_TASKS_PER_NODE",
)
AFFINITY = len(os.sched_getaffinity(0))


@pytest.fixture
def slurm(monkeypatch):
    for name in SLURM:
        monkeypatch.delenv(name, raising=False)

    def set_env(**values):
        for name, value in values.items():
            monkeypatch.setenv(name, str(value))

    return set_env


def test_outside_slurm_local_ranks_share_this_process_affinity(slurm):
    assert cores_per_rank(1) == AFFINITY
    assert cores_per_rank(2) == max(1, AFFINITY // 2)
    assert default_workers(1) == AFFINITY - 1
    assert default_workers(2) == max(1, AFFINITY // 2) - 1
    assert prep_workers(None, 100, 1) == AFFINITY


def test_ranks_that_are_slurm_tasks_keep_their_own_cores(slurm):
    """32 ranks on 4 nodes, one SLURM task per GPU (8 per node) with 2 CPUs each: 2 cores per
    rank (the global world size divided them down to 1 before)."""
    per_task = min(2, AFFINITY)
    slurm(SLURM_CPUS_PER_TASK=per_task, SLURM_NTASKS_PER_NODE=8, SLURM_TASKS_PER_NODE="8(x4)")
    assert slurm_tasks_on_node() == 8
    assert cores_per_rank(local_ranks=8) == per_task
    assert prep_workers(None, 100, local_ranks=8) == per_task


def test_ranks_spawned_from_one_slurm_task_divide_its_cores(slurm):
    slurm(SLURM_CPUS_PER_TASK=AFFINITY, SLURM_TASKS_PER_NODE="1")
    assert cores_per_rank(local_ranks=2) == max(1, AFFINITY // 2)


def test_cpus_on_node_divided_among_the_tasks_when_cpus_per_task_is_unset(slurm):
    slurm(SLURM_CPUS_ON_NODE=AFFINITY, SLURM_TASKS_PER_NODE="2(x3)")
    assert slurm_tasks_on_node() == 2
    assert cores_per_rank(local_ranks=2) == max(1, AFFINITY // 2)
    assert cores_per_rank(local_ranks=1) == max(1, AFFINITY // 2)  # the task's share, not more


def test_an_explicit_count_wins(slurm):
    slurm(SLURM_CPUS_PER_TASK=1)
    assert prep_workers(3, 100, local_ranks=8) == 3
    assert prep_workers(None, 1, local_ranks=1) == 1  # never more processes than cases
