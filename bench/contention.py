"""CPU time of ``python evaluate.py`` alone and beside a competing load, per OpenMP wait policy.

A shared node (a cluster node, a laptop) is the normal case: when other processes hold the
cores, OpenMP threads that spin while they wait burn CPU without doing work, so a run's CPU
time grows with the load, not only its wall time. sam_ft sets ``OMP_WAIT_POLICY=PASSIVE`` where
its processes start (``sam_ft/__init__.py``); this bench runs the same evaluation (the demo
task, tiny model, random weights, box and one-point prompts) idle and beside one busy loop per
core, with the passive policy and with OpenMP's spinning one, and reports CPU seconds (user +
system of the evaluate process and its children) and wall seconds.

    python bench/contention.py                 # prompts box,point1 on the demo's test split
    python bench/contention.py --policies PASSIVE --prompts "[box]"
    python bench/contention.py --job train      # the README's first command, python train.py

Last line: ``cpu_loaded_vs_idle_passive=<CPU s beside the load / CPU s idle>`` (target <= 1.5).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ is on sys.path when a bench runs as a script.
from _common import ROOT, final_line, machine, print_table


def _busy() -> None:
    while True:
        pass


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_job(job: str, policy: str, prompts: str, work: Path, name: str) -> tuple[float, float]:
    """One ``python evaluate.py`` (or ``train.py``: the README's demo) run: (wall s, CPU s of it
    and its children)."""
    env = dict(os.environ, OMP_WAIT_POLICY=policy, SAM_FT_CACHE=str(work / "cache"))
    env.pop("OMP_NUM_THREADS", None)  # torch's own choice: the cores it may use
    if job == "train":  # the README's first command, as it is
        cmd = [sys.executable, str(ROOT / "train.py"), f"hydra.run.dir={work / name}"]
    else:
        cmd = [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "model=tiny",
            "task=demo",
            f"eval.prompts={prompts}",
            "eval.overlays=0",
            f"hydra.run.dir={work / name}",
        ]
    cpu0, t0 = _children_cpu(), time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=work)
    return time.perf_counter() - t0, _children_cpu() - cpu0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--policies", nargs="+", default=["PASSIVE", "ACTIVE"])
    p.add_argument("--job", choices=["evaluate", "train"], default="evaluate")
    p.add_argument("--prompts", default="[box,point1]", help="evaluate's eval.prompts")
    p.add_argument("--load", type=int, default=os.cpu_count() or 1, help="busy loops (cores)")
    args = p.parse_args(argv)
    print(machine())
    rows, cpu = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        run_job(args.job, "PASSIVE", args.prompts, work, "warm")  # untimed: fills the caches
        for policy in args.policies:
            for loaded in (False, True):
                loops = [mp.Process(target=_busy, daemon=True) for _ in range(args.load * loaded)]
                for loop in loops:
                    loop.start()
                try:
                    run = f"{policy}{loaded}"
                    wall, seconds = run_job(args.job, policy, args.prompts, work, run)
                finally:
                    for loop in loops:
                        loop.terminate()
                        loop.join()
                cpu[policy, loaded] = seconds
                label = f"beside {args.load} busy loop(s)" if loaded else "idle"
                rows.append([policy, label, f"{wall:.1f}", f"{seconds:.1f}"])
                title = f"{args.job}.py, demo"
                print_table(title, ["policy", "load", "wall s", "CPU s"], rows)
    for policy in args.policies:
        ratio = cpu[policy, True] / cpu[policy, False]
        print(f"{policy}: CPU time beside the load / idle = {ratio:.2f}")
    if "PASSIVE" in args.policies:
        final_line("cpu_loaded_vs_idle_passive", cpu["PASSIVE", True] / cpu["PASSIVE", False])


if __name__ == "__main__":
    main()
