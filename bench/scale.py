"""Peak memory of the command line as the task grows: ``train.py`` and ``evaluate.py`` on N cases.

Writes N synthetic CT volumes (``--side`` x ``--side`` x ``--slices``, int16 NIfTI, an object in
most slices) and runs, each in its own process through the real entry points (Hydra):

* ``train.py model=tiny finetune=decoder`` (frozen encoder: cached embeddings), 1 epoch, every
  case in the train split, no final evaluation;
* ``evaluate.py model=tiny eval.prompts=[box]``, every case in the test split;

(``--ddp``: ``train.py`` on two CPU DDP ranks, ``trainer=ddp trainer.devices=2``);

for each N of ``--cases`` (default 4 and 16). Each run's peak RSS is the largest resident set of
its process tree (the entry point and its preprocessing / loader workers), read from
``getrusage(RUSAGE_CHILDREN)`` of a fresh wrapper process. ``held_mb`` is what the data of the N
cases take when held in RAM (each kept slice's RGB image, float32 intensities and masks, plus
the label volume): the memory a loader that keeps every case would add.

glibc's malloc raises its mmap threshold each time a large block is freed, after which large
arrays come from the heap and their pages are kept after ``free``: the same run's peak RSS then
varies by +-70 MB from run to run, more than the growth measured. The runs pin the threshold
(``MALLOC_MMAP_THRESHOLD_=131072``, glibc's initial value), so that arrays of 128 KiB and more
are always returned to the system and the peak measures what the program holds (+-5 MB).

    python bench/scale.py                     # N = 4 and 16 of 512 x 512 x 150
    python bench/scale.py --quick             # the test's size: N = 2 and 6 of 512 x 512 x 12

``python bench/scale.py index [--quick]``: start-up on an unchanged slice cache and index memory
at 10k vs 100k entries (``bench/scale_index.py``).

Last line: ``rss_growth_16_vs_4=<max over train/evaluate of peak(N large) / peak(N small)>``
(target <= 1.15: memory does not grow with the number of cases).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]

# Runs the command given as arguments; prints its process tree's peak RSS (KiB on Linux).
_WRAPPER = (
    "import resource, subprocess, sys\n"
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
    "sys.exit(rc)\n"
)


def write_volumes(root: Path, n: int, side: int, slices: int, seed: int = 0) -> float:
    """N CT-like volumes (int16 HU, 0.8 x 0.8 x 2.5 mm) with an organ (label 1) in ~90% of
    the slices and a lesion (label 2) inside it; returns the MB the kept slices and label
    volumes take when held in RAM."""
    import nibabel as nib

    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:side, :side] / side
    held = 0
    for i in range(n):
        image = np.full((side, side, slices), -1000, dtype=np.int16)
        label = np.zeros((side, side, slices), dtype=np.uint8)
        body = (yy - 0.5) ** 2 + (xx - 0.5) ** 2 < 0.42**2
        cy, cx = 0.45 + 0.1 * rng.random(), 0.4 + 0.1 * rng.random()
        lo, hi = int(0.05 * slices), max(int(0.95 * slices), int(0.05 * slices) + 1)
        for z in range(slices):
            noise = rng.normal(40, 15, (side, side)).astype(np.int16)
            image[..., z] = np.where(body, noise, -1000)
            if lo <= z < hi:
                r = 0.18 * (1 - abs(2 * (z - lo) / (hi - lo) - 1) * 0.5)
                organ = (yy - cy) ** 2 / 1.2 + (xx - cx) ** 2 < r**2
                lesion = (yy - cy) ** 2 + (xx - cx - r / 3) ** 2 < (r / 3) ** 2
                label[..., z][organ] = 1
                label[..., z][lesion & organ] = 2
                image[..., z][organ] += 60
                image[..., z][lesion & organ] -= 40
                objects = int(organ.any()) + int((lesion & organ).any())
                # RGB uint8 + float32 intensities + one bool mask per object, per kept slice.
                held += side * side * (3 + 4 + objects)
        held += label.nbytes
        affine = np.diag([0.8, 0.8, 2.5, 1.0])
        name = f"scale_{i:03d}"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{name}.nii")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii")
    labels = {"0": "background", "1": "organ", "2": "lesion"}
    meta = {"name": "scale", "modality": {"0": "CT"}, "labels": labels}
    (root / "dataset.json").write_text(json.dumps(meta))
    return held / 2**20


def _split_file(root: Path, split: str) -> Path:
    cases = sorted(p.name.removesuffix(".nii") for p in (root / "imagesTr").iterdir())
    path = root / f"split_{split}.json"
    path.write_text(json.dumps({s: cases if s == split else [] for s in ("train", "val", "test")}))
    return path


def run_cli(script: str, overrides: list[str], cwd: Path) -> tuple[float, float]:
    """(peak RSS in MB of the process tree, wall seconds) of ``python <script> overrides``."""
    env = dict(os.environ, WANDB_MODE="offline", HYDRA_FULL_ERROR="1")
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # why: see the module docstring
    env.pop("WANDB_API_KEY", None)
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", _WRAPPER, sys.executable, str(ROOT / script), *overrides],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        # Rerun with output, so the failure is visible.
        again = subprocess.run(
            [sys.executable, str(ROOT / script), *overrides], cwd=cwd, env=env, text=True,
            capture_output=True,
        )  # fmt: skip
        raise SystemExit(f"{script} failed:\n{again.stderr[-4000:]}")
    return int(proc.stdout.strip().splitlines()[-1]) / 1024, seconds


def measure(
    n: int, side: int, slices: int, work: Path, workers: int | None, ddp: bool = False
) -> list[dict]:
    root = work / f"task_{n}"
    held = write_volumes(root, n, side, slices)
    common = [
        "model=tiny",
        "task=folder",
        f"task.root={root}",
        "task.intensity.mode=window",
        "task.intensity.level=40",
        "task.intensity.width=400",
        f"data.cache_dir={work / f'cache_{n}'}",
    ]
    if workers is not None:
        common.append(f"data.prep_workers={workers}")
    rows = []
    train = [
        *common,
        "finetune=decoder",
        f"data.split.file={_split_file(root, 'train')}",
        # DDP: two CPU ranks; the peak is the larger rank's (rank 1 is rank 0's child).
        *(DDP if ddp else ["trainer=cpu"]),
        "trainer.max_epochs=1",
        "train.evaluate=false",
        "callbacks.model_checkpoint.save_top_k=0",
        f"hydra.run.dir={work / f'train_{n}'}",
    ]
    evaluate = [
        *common,
        f"data.split.file={_split_file(root, 'test')}",
        "eval.prompts=[box]",
        "eval.jitter_px=[]",
        "eval.overlays=0",
        "logger=none",
        f"hydra.run.dir={work / f'eval_{n}'}",
    ]
    for name, script, overrides in (
        ("train", "train.py", train),
        ("evaluate", "evaluate.py", evaluate),
    ):
        peak, seconds = run_cli(script, overrides, work)
        rows.append(
            {"run": name, "cases": n, "peak_mb": peak, "held_mb": held, "s": seconds,
             "s_per_case": seconds / n}
        )  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["index"]:  # start-up and index memory at 10k vs 100k cache entries
        sys.path.insert(0, str(Path(__file__).parent))
        import scale_index

        return scale_index.main(argv[1:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", default="4,16", help="the two task sizes N (small,large)")
    p.add_argument("--side", type=int, default=512)
    p.add_argument("--slices", type=int, default=150)
    p.add_argument("--prep-workers", type=int, default=None, help="data.prep_workers")
    p.add_argument("--ddp", action="store_true", help="train.py on 2 CPU DDP ranks")
    p.add_argument("--work", default=None, help="folder for volumes and runs (default: tmp)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.add_argument("--quick", action="store_true", help="N = 2 and 6 of 512 x 512 x 12 (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.cases, args.slices = "2,6", 12
    small, large = (int(v) for v in args.cases.split(","))
    from _common import final_line, machine, print_table

    with tempfile.TemporaryDirectory(prefix="sam_ft_scale_") as tmp:
        work = Path(args.work or tmp)
        work.mkdir(parents=True, exist_ok=True)
        rows = [
            r
            for n in (small, large)
            for r in measure(n, args.side, args.slices, work, args.prep_workers, args.ddp)
        ]
    print(f"machine: {machine()}")
    print_table(
        f"peak RSS per run ({args.side}x{args.side}x{args.slices} int16 volumes)",
        ["run", "cases", "peak RSS MB", "data held MB", "s", "s/case"],
        [[r["run"], r["cases"], r["peak_mb"], r["held_mb"], r["s"], r["s_per_case"]] for r in rows],
    )
    growth = {
        run: next(r["peak_mb"] for r in rows if (r["run"], r["cases"]) == (run, large))
        / next(r["peak_mb"] for r in rows if (r["run"], r["cases"]) == (run, small))
        for run in ("train", "evaluate")
    }
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": rows, "growth": growth}))
    final_line("rss_growth_16_vs_4", max(growth.values()))
    return growth


if __name__ == "__main__":
    main()
