"""Start-up and index memory at 10k vs 100k slice-cache entries (``python bench/scale.py index``).

Writes N synthetic one-slice entries (``--side`` x ``--side`` RGB images, one object, float32
intensities: a 2D-image data set; the sources do not exist, which only the cache key sees) into
a slice cache, then through the real ``SamDataModule.prepare_splits`` (``data.prep_workers=1``,
one process, so the seconds are CPU seconds):

* ``first start``: no saved index: every entry verified whole, the index built and saved;
* ``old check``: what every start did before (the code removed, replayed here): per entry its
  key, a read of every member to its end (zip CRC) and one ``SliceRef`` dataclass per slice;
* ``unchanged start``: a new datamodule on the unchanged cache (the saved index, one ``stat``
  per entry); ``ratio`` = old check / unchanged start, in the same run.

Index memory: the columns' bytes (memory-mapped: shared by ranks and workers through the page
cache) against the old list of ``SliceRef``s (``tracemalloc``); and the private memory
(``Private_Dirty`` of ``/proc/<pid>/smaps_rollup``: pages copied or allocated, not the clean
pages of a mapped file) a DataLoader worker adds while it builds every item's ``SliceRef`` (what
``SliceDataset.record`` does before it reads pixels) over the whole index, for each.

    python bench/scale.py index                    # N = 10k and 100k, 32 x 32 images
    python bench/scale.py index --quick            # N = 100 and 400 (tests)

Last line: ``startup_ratio_old_vs_new=<old check / unchanged start at the larger N>`` (target
>= 50).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASK = {"name": "scale_index", "modality": "CT", "intensity": {"mode": "minmax"}}


def _groups() -> tuple[dict, dict]:
    """TASK and the default data group, complete (the loaders read no default)."""
    from sam_ft.data.tasks import data_options, task_options

    return task_options(TASK), data_options({})


def _write_some(args: tuple) -> None:
    cache_dir, start, stop, side = args
    from sam_ft.data.cache import CachedCase, SliceCache, slice_cache_key
    from sam_ft.data.preparation import case_settings
    from sam_ft.data.types import SliceRecord

    cache = SliceCache(cache_dir)
    rng = np.random.default_rng(start)
    for case in _cases(cache_dir, start, stop):
        image = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        mask = np.zeros((1, side, side), dtype=bool)
        mask[0, side // 4 : side // 2, side // 4 : 3 * side // 4] = True
        record = SliceRecord(
            case.case, -1, image, mask, np.array([1]), ["organ"], (0.8, 0.8), "CT",
            image[..., 0].astype(np.float32), image_id=case.image_id,
        )  # fmt: skip
        key = slice_cache_key(case, case_settings(case, *_groups()))
        cache.save(case.image_id, key, CachedCase([record], {"slice_axis": 2}, {}))


def _cases(cache_dir: str, start: int, stop: int) -> list:
    from sam_ft.data.types import CaseFiles

    src = Path(cache_dir).parent / "sources"  # never written: the keys stamp them "missing"
    return [
        CaseFiles(f"s{i:06d}", str(src / f"s{i:06d}.png"), str(src / f"s{i:06d}_label.png"))
        for i in range(start, stop)
    ]


def write_entries(cache_dir: Path, n: int, side: int, processes: int) -> float:
    """N one-slice entries, written by ``processes`` processes; returns the seconds taken."""
    t0 = time.perf_counter()
    chunks = [(str(cache_dir), i, min(n, i + 2000), side) for i in range(0, n, 2000)]
    with mp.get_context("fork").Pool(processes) as pool:
        list(pool.imap_unordered(_write_some, chunks))
    return time.perf_counter() - t0


def _datamodule(cache_dir: Path, run_dir: Path, cases: list):
    from sam_ft.data.datamodule import SamDataModule
    from sam_ft.data.skips import SkipLog
    from sam_ft.data.tasks import data_options, task_options
    from sam_ft.prompts.train_sampling import BoxPrompts

    data = {"cache_dir": str(cache_dir), "prep_workers": 1, "num_workers": 0}
    dm = SamDataModule(
        task_options(TASK), data_options(data), None, BoxPrompts(), 0, run_dir, progress=False
    )
    # The split's cases as find_cases + make_splits would give them (no source files here).
    dm._assigned = {"train": cases, "val": [], "test": []}
    dm.skip_log = SkipLog(run_dir)
    return dm


def old_check(cache_dir: Path, cases: list) -> tuple[float, list]:
    """The check every start did before the index (per entry: key, every member read to its
    end, a ``SliceRef`` per slice); returns (seconds, the refs)."""
    from sam_ft.data.cache import SliceCache, SliceRef, _verified_header, slice_cache_key
    from sam_ft.data.preparation import case_settings

    cache = SliceCache(cache_dir)
    t0 = time.perf_counter()
    refs = []
    for case in cases:
        key = slice_cache_key(case, case_settings(case, *_groups()))
        path = cache.path(case.image_id, key)
        header = _verified_header(path, key)
        for i, s in enumerate(header["slices"]):
            shape = tuple(int(v) for v in s["image_shape"])
            refs.append(
                SliceRef(
                    str(path), i, s["case"], int(s["slice_index"]),
                    np.asarray(s["labels"], dtype=np.int64), list(s["names"]),
                    (shape[0], shape[1]), shape, tuple(s["masks_shape"]), s["digest"],
                    tuple(s["spacing"]), s["modality"], int(s["num_slices"]),
                    float(s["slice_spacing"]), s["image_id"], bool(s["has_raw"]),
                )
            )  # fmt: skip
    return time.perf_counter() - t0, refs


def _private_kb() -> int:
    """This process's private dirty memory (KiB): the pages it copied or allocated, not those it
    shares with its parent or reads from the page cache (a memory-mapped file's clean pages)."""
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("Private_Dirty:"):
            return int(line.split()[1])
    raise RuntimeError("no Private_Dirty in /proc/self/smaps_rollup")


class _Touch:
    """A dataset whose item ``i`` builds record ``i``'s ``SliceRef`` (as ``SliceDataset.record``
    does before it reads the pixels) and returns the worker's private memory."""

    def __init__(self, records) -> None:
        self.records = records

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> int:
        ref = self.records[i]
        assert len(ref.labels) == 1 and ref.digest
        return _private_kb() if i % 997 == 0 or i == len(self) - 1 else -1


def worker_growth_mb(records, workers: int = 2) -> float:
    """Largest private-memory growth (MB) of a DataLoader worker over one pass of ``records``."""
    from torch.utils.data import DataLoader

    loader = DataLoader(_Touch(records), batch_size=None, num_workers=workers, shuffle=False)
    seen = [kb for kb in loader if kb >= 0]
    # Items are dealt to the workers in turn: worker w served items w, w + workers, ...
    first = seen[:workers]
    return (max(seen) - min(first)) / 1024


def measure(n: int, side: int, work: Path, processes: int) -> dict:
    cache_dir = work / f"cache_{n}"
    if (cache_dir / "index").exists():  # a kept --work folder: measured on fresh entries only
        shutil.rmtree(cache_dir)
    write_s = write_entries(cache_dir, n, side, processes)
    cases = _cases(str(cache_dir), 0, n)
    entry_kb = os.path.getsize(next((cache_dir / "slices").iterdir())) / 1024
    first = _datamodule(cache_dir, work / f"run_{n}_a", cases)
    t0 = time.perf_counter()
    first.prepare_splits(["train"])
    first_s = time.perf_counter() - t0
    old_s, refs = old_check(cache_dir, cases)
    again = _datamodule(cache_dir, work / f"run_{n}_b", cases)
    t0 = time.perf_counter()
    again.prepare_splits(["train"])
    new_s = time.perf_counter() - t0
    assert again.slice_cache.hits == n and again.slice_cache.misses == 0
    index = again.records("train")
    assert [r.digest for r in index[:5]] == [r.digest for r in refs[:5]]
    tracemalloc.start()
    _, copy = old_check(cache_dir, cases[: min(n, 5000)])
    per_ref = tracemalloc.get_traced_memory()[0] / len(copy)
    tracemalloc.stop()
    del copy
    names = ("rows", "entries", "labels", "names", "text", "offsets")
    columns = sum(np.asarray(getattr(index, k)).nbytes for k in names)
    return {
        "entries": n, "entry_kb": entry_kb, "write_s": write_s, "first_start_s": first_s,
        "old_check_s": old_s, "unchanged_start_s": new_s, "ratio": old_s / new_s,
        "index_mb": columns / 2**20, "old_refs_mb": per_ref * n / 2**20,
        "worker_new_mb": worker_growth_mb(index), "worker_old_mb": worker_growth_mb(refs),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--entries", default="10000,100000", help="the two cache sizes (small,large)")
    p.add_argument("--side", type=int, default=32, help="image side (pixels)")
    p.add_argument("--processes", type=int, default=2, help="processes writing the entries")
    p.add_argument("--work", default=None, help="folder for the caches (default: tmp)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quick", action="store_true", help="N = 100 and 400 (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.entries = "100,400"
    sizes = [int(v) for v in args.entries.split(",")]
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import final_line, machine, print_table

    with tempfile.TemporaryDirectory(prefix="sam_ft_scale_index_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [measure(n, args.side, work, args.processes) for n in sizes]
    print(f"machine: {machine()}")
    print_table(
        f"start-up on an unchanged slice cache ({args.side}x{args.side} one-slice entries)",
        ["entries", "entry KiB", "first start s", "old check s", "unchanged start s", "ratio"],
        [[r["entries"], r["entry_kb"], r["first_start_s"], r["old_check_s"],
          r["unchanged_start_s"], r["ratio"]] for r in rows],
    )  # fmt: skip
    print_table(
        "index memory (MB): per process, and added per DataLoader worker by one pass",
        ["entries", "columns", "old SliceRefs", "worker (columns)", "worker (old SliceRefs)"],
        [[r["entries"], r["index_mb"], r["old_refs_mb"], r["worker_new_mb"], r["worker_old_mb"]]
         for r in rows],
    )  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(rows))
    final_line("startup_ratio_old_vs_new", rows[-1]["ratio"])
    return {"rows": rows}


if __name__ == "__main__":
    main()
