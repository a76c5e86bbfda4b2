"""The CPU cores one rank may use, from its own node's allocation: the default of
``data.prep_workers`` and ``eval.workers``.

Three sources, the smallest wins: the CPU affinity of this process (what the kernel lets it run
on: a container's cpuset, a SLURM task bound to its CPUs), ``SLURM_CPUS_PER_TASK`` (a SLURM
task's share when its CPUs are not bound), else ``SLURM_CPUS_ON_NODE`` divided among the job's
tasks on this node. Ranks that share one allocation (launched by Lightning from one process or
one SLURM task) divide it between them; ranks that are SLURM tasks of their own (``srun``, one
task per GPU) already have their own. The global world size plays no part: 32 ranks of 8 CPUs
each on 4 nodes get 8 cores each, not 1.
"""

from __future__ import annotations

import os
import re


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "")
    return int(value) if value.isdigit() and int(value) > 0 else None


def slurm_tasks_on_node() -> int:
    """The SLURM tasks of this job step on this node (1 outside SLURM).

    ``SLURM_NTASKS_PER_NODE``, else the first count of ``SLURM_TASKS_PER_NODE`` (``"4(x2)"`` ->
    4, ``"2,1"`` -> 2: every node's count is an upper bound of this one's)."""
    explicit = _env_int("SLURM_NTASKS_PER_NODE")
    if explicit:
        return explicit
    match = re.match(r"(\d+)", os.environ.get("SLURM_TASKS_PER_NODE", ""))
    return max(1, int(match.group(1))) if match else 1


def cores_per_rank(local_ranks: int = 1) -> int:
    """Cores for one of ``local_ranks`` ranks on this node (at least 1).

    Args:
        local_ranks: the ranks of this run on this node (world size / number of nodes).
    """
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    tasks = slurm_tasks_on_node()
    per_task = _env_int("SLURM_CPUS_PER_TASK")
    on_node = _env_int("SLURM_CPUS_ON_NODE")
    if per_task:
        cores = min(cores, per_task)
    elif on_node:
        cores = min(cores, max(1, on_node // tasks))
    # Ranks that are SLURM tasks each hold their task's cores; ranks spawned from one task share.
    return max(1, cores // max(1, int(local_ranks) // tasks))
