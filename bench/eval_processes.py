"""``python evaluate.py`` images/s in one process and in N (``trainer=ddp``: Fabric ranks).

The same synthetic CT slices (``_common.write_ct_task``), S2-S6 x the 3 jitter levels, random
weights, timed end to end (start-up, data, scoring, the merge by rank 0): what a user waits for.
Each rank takes its share of the cases (balanced by slice count), so the slices are spread over
several cases (up to 16 slices each).

    python bench/eval_processes.py --model vit_b --images 64 --processes 8 --accelerator gpu
    python bench/eval_processes.py --model tiny --images 32 --processes 2 --accelerator cpu

Last line: ``eval_speedup_n_vs_1=<images/s with N / images/s with 1>``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# bench/ is on sys.path when a bench runs as a script.
from _common import ROOT, final_line, machine, print_table, write_ct_task

S2_S6 = "[point1,point5,point5_neg5,box,box_point1]"


def eval_rows(
    model_name: str,
    images: int,
    size: int,
    processes: int,
    work: Path,
    accelerator: str = "gpu",
) -> list[dict]:
    """``python evaluate.py`` on 1 and on ``processes`` ranks; images/s over the whole run."""
    task = work / "task"
    splits = write_ct_task(task, images, size)
    base = [
        f"model={model_name}",
        "model.checkpoint=null",
        "task=folder",
        f"task.root={task}",
        "task.modality=CT",
        f"data.split.file={splits}",
        f"data.cache_dir={work / 'cache'}",
        "eval.split=all",  # the bench task puts every case in train
        f"eval.prompts={S2_S6}",
        "eval.overlays=0",
        f"trainer.accelerator={'gpu' if accelerator == 'cuda' else accelerator}",
    ]
    runs = [("1 process", ["trainer.devices=1"])]
    if processes > 1:
        runs.append(
            (f"{processes} processes (ddp)", ["trainer=ddp", f"trainer.devices={processes}"])
        )
    # Untimed: writes the slice cache, so every timed run starts from the same warm cache.
    _evaluate([*base, *runs[0][1]], work / "warm", "warm-up")
    rows = []
    for label, extra in runs:
        seconds = _evaluate([*base, *extra], work / f"eval_{len(rows)}", label)
        rows.append(
            {
                "bench": "evaluate",
                "model": model_name,
                "mode": label,
                "precision": "auto",
                "batch": images,
                "rate": images / seconds,
                "unit": "images/s",
                "peak_mib": float("nan"),
            }
        )
    return rows


def _evaluate(args: list[str], run_dir: Path, label: str) -> float:
    env = dict(os.environ, WANDB_MODE="offline")
    env.pop("OMP_NUM_THREADS", None)  # Lightning gives each rank its share of the cores
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *args, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"evaluate.py ({label}) failed:\n{proc.stderr[-3000:]}")
    return seconds


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--images", type=int, default=32, help="synthetic CT slices evaluated")
    p.add_argument("--size", type=int, default=512, help="side of the CT slices (pixels)")
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--accelerator", default="cpu", choices=["cpu", "gpu"])
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench_eval_proc_") as work:
        rows = eval_rows(
            args.model, args.images, args.size, args.processes, Path(work), args.accelerator
        )
    print(f"machine: {machine()}")
    print_table(
        f"evaluate.py, {args.images} slices {args.size}x{args.size}, model {args.model} (random "
        "weights), S2-S6 x 4 jitter levels, wall time including start-up",
        ["run", "images/s", "x 1 process"],
        [[r["mode"], r["rate"], r["rate"] / rows[0]["rate"]] for r in rows],
    )
    speedup = rows[-1]["rate"] / rows[0]["rate"]
    final_line("eval_speedup_n_vs_1", speedup)
    return speedup


if __name__ == "__main__":
    main()
