"""Preprocessing throughput: volumes read and sliced into the slice cache with 1 vs W workers.

Writes N synthetic CT volumes (``bench/scale.py``'s generator: ``--side`` x ``--side`` x
``--slices`` int16 NIfTI) and times ``SamDataModule.setup`` (every split prepared: MONAI
loading, orientation, windowing, slicing, cache writes) on an empty cache, once with
``data.prep_workers=1`` and once with ``--workers`` processes.

    python bench/prep_throughput.py --cases 8 --workers 2

Last line: ``prep_speedup=<seconds with 1 worker / seconds with W workers>`` (target >= 1.6 with
2 workers on two free cores).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import final_line, machine, print_table
from scale import write_volumes


def _task(root: Path) -> dict:
    from sam_ft.data.tasks import task_options

    return task_options(
        {
            "name": "bench",
            "root": str(root),
            "modality": "CT",
            "intensity": {"mode": "window", "level": 40, "width": 400},
        }
    )


def warm_up(root: Path) -> None:
    """Load one case untimed: the first MONAI reader setup takes seconds, and forked workers
    would inherit it warm, which would flatter the parallel run."""
    from sam_ft.data.folder import find_cases
    from sam_ft.data.loading import load_case
    from sam_ft.data.tasks import data_options

    load_case(find_cases(root, _task(root))[0], _task(root), data_options(None))


def prepare(root: Path, cache: Path, workers: int) -> float:
    """Seconds for ``setup()`` with ``workers`` prep processes on an empty ``cache``."""
    from sam_ft.data.datamodule import SamDataModule
    from sam_ft.data.tasks import data_options, task_options
    from sam_ft.model.preprocess import SamTransform
    from sam_ft.prompts.train_sampling import BoxPrompts

    task = _task(root)
    data = {"cache_dir": str(cache), "prep_workers": workers, "seed": 0}
    dm = SamDataModule(
        task_options(task),
        data_options(data),
        SamTransform(256),
        BoxPrompts(),
        0,
        run_dir=cache / "run",
        progress=False,
    )
    t0 = time.perf_counter()
    dm.setup("fit")
    seconds = time.perf_counter() - t0
    assert dm.slice_cache.misses == sum(len(dm.case_entries(s)) for s in ("train", "val", "test"))
    return seconds


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=8)
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--slices", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="4 cases of 128 x 128 x 8 (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.side, args.slices = 4, 128, 8
    with tempfile.TemporaryDirectory(prefix="sam_ft_prep_") as tmp:
        root = Path(tmp) / "task"
        write_volumes(root, args.cases, args.side, args.slices)
        warm_up(root)
        rows = []
        for workers in (1, args.workers):
            seconds = prepare(root, Path(tmp) / f"cache_{workers}", workers)
            rows.append([workers, args.cases, seconds, seconds / args.cases])
    print(f"machine: {machine()}")
    print_table(
        f"preprocessing {args.cases} volumes of {args.side}x{args.side}x{args.slices}",
        ["prep_workers", "cases", "s", "s/case"],
        rows,
    )
    speedup = rows[0][2] / rows[1][2]
    final_line("prep_speedup", speedup)
    return speedup


if __name__ == "__main__":
    main()
