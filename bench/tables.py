"""Streamed tables vs whole DataFrames (issue #28): time and peak memory of the final sort of a
``per_object.csv``, and of the merge of its shares, ours (``tablesort.write_sorted``: sorted
runs, then a k-way merge) vs the whole-table pandas path (``read_table`` -> ``sort_table`` ->
``to_csv``, what the engine and ``sam-ft-report merge`` did before).

A synthetic table in the engine's columns (``--rows`` rows, appended one case at a time as the
engine appends, in shuffled case order) is written once; each method then runs in its own
subprocess, so each peak RSS is its own (the import baseline is given beside it). Both outputs
must be the same bytes.

    python bench/tables.py --rows 1000000

Last line: ``rss_ratio_pandas_vs_streamed=<extra peak MB of pandas / extra peak MB of ours>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

CHILD = r"""
import json, sys, time


def hwm():
    # Peak RSS in MB: VmHWM, which (unlike ru_maxrss) a process does not inherit across exec.
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024


from pathlib import Path
import pandas as pd
from sam_ft.evaluation.protocol.order import sort_table
from sam_ft.evaluation.protocol.tables import PER_OBJECT_COLUMNS, read_table
from sam_ft.evaluation.protocol.tablesort import write_sorted

method, out, inputs = sys.argv[1], Path(sys.argv[2]), [Path(p) for p in sys.argv[3:]]
base = hwm()
t0 = time.perf_counter()
if method == "pandas":
    parts = [read_table(p, PER_OBJECT_COLUMNS) for p in inputs]
    out.write_text(sort_table(pd.concat(parts, ignore_index=True)).to_csv(index=False))
elif method == "streamed":
    write_sorted(inputs, out)
seconds = time.perf_counter() - t0
peak = hwm()
print(json.dumps({"seconds": seconds, "base_mb": base, "peak_mb": peak}))
"""


def write_table(path: Path, rows: int, seed: int = 0, per_case: int = 2000) -> None:
    """``rows`` object rows in the engine's columns, one ``to_csv`` append per case."""
    import pandas as pd

    from sam_ft.evaluation.protocol.tables import PER_OBJECT_COLUMNS

    rng = np.random.default_rng(seed)
    cases = rng.permutation(max(1, rows // per_case))
    for i, case in enumerate(cases):
        n = per_case
        df = pd.DataFrame(
            {
                "model": rng.choice(["zero_shot", "lora"], n),
                "task": "liver",
                "case": f"case_{case:06d}",
                "slice": rng.integers(0, 300, n),
                "label": rng.integers(1, 3, n),
                "name": "liver",
                "prompt": rng.choice(["point1", "point5", "box", "box_point1"], n),
                "jitter": rng.choice(["none", "0-10", "10-20", "20-30"], n),
                **{c: rng.random(n) for c in ("dice", "iou", "nsd", "hd", "asd", "pred_iou")},
                "hd95": np.where(rng.random(n) < 0.05, np.nan, rng.random(n) * 30),
                "empty_pred": rng.random(n) < 0.05,
                "mask_index": rng.integers(0, 3, n),
                "area_px": rng.integers(10, 5000, n),
                "modality": "CT",
                "patient": f"case_{case:06d}",
                "distance_unit": "mm",
            }
        ).reindex(columns=PER_OBJECT_COLUMNS)
        df.to_csv(path, mode="a", header=i == 0, index=False)


def run(method: str, out: Path, inputs: list[Path]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, method, str(out), *map(str, inputs)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--shares", type=int, default=4, help="shares of the merge case")
    p.add_argument("--dir", type=Path, default=Path("/tmp/sam_ft_bench_tables"))
    p.add_argument("--quick", action="store_true", help="20k rows (a smoke run)")
    args = p.parse_args(argv)
    if args.quick:
        args.rows = 20_000
    args.dir.mkdir(parents=True, exist_ok=True)
    one = args.dir / "per_object.csv"
    shares = [args.dir / f"share{k}.csv" for k in range(args.shares)]
    t0 = time.perf_counter()
    for path in (one, *shares):
        path.unlink(missing_ok=True)
    write_table(one, args.rows)
    for k, path in enumerate(shares):
        write_table(path, args.rows // args.shares, seed=k + 1)
    size_mb = one.stat().st_size / 2**20
    print(
        f"{args.rows} rows, {size_mb:.0f} MB of CSV (written in {time.perf_counter() - t0:.0f} s)"
    )
    results = []
    for case, inputs in (("sort", [one]), (f"merge {args.shares} shares", shares)):
        outs = {}
        for method in ("pandas", "streamed"):
            outs[method] = args.dir / f"out_{method}.csv"
            r = run(method, outs[method], inputs)
            extra = r["peak_mb"] - r["base_mb"]
            results.append((case, method, r["seconds"], r["base_mb"], r["peak_mb"], extra))
            print(f"{case:16s} {method:9s} {r['seconds']:7.1f} s  import {r['base_mb']:6.0f} MB"
                  f"  peak {r['peak_mb']:6.0f} MB  (+{extra:.0f} MB)", flush=True)  # fmt: skip
        same = outs["pandas"].read_bytes() == outs["streamed"].read_bytes()
        print(f"{case}: outputs byte-identical: {same}")
        assert same
    ratio = results[0][5] / max(results[1][5], 1.0)
    print(f"rss_ratio_pandas_vs_streamed={ratio:.1f}")


if __name__ == "__main__":
    main()
