"""Helpers shared by the benchmarks: synthetic CT volumes, the composed config, tables, timing.

The bench data are the demo generator's CT-like volumes (``sam_ft.data.demo.make_demo_case``)
upsampled in-plane to a typical CT slice size (512 x 512 by default) and written as NIfTI, so the
benches read files through the same loaders, caches and datamodule as ``train.py``. Only slices
that hold an object are kept, which makes ``--images N`` exactly the number of training slices.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
BASE_SIZE = 128  # in-plane size the demo generator draws at, before upsampling
DEPTH = 16


def slice_bench_parser(doc: str, images: int, images_help: str) -> argparse.ArgumentParser:
    """The options every bench over synthetic CT slices shares: --model, --images, --size,
    --threads, --quick (parse with ``parse_slice_bench``)."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--images", type=int, default=images, help=images_help)
    p.add_argument("--size", type=int, default=512, help="side of the CT slices (pixels)")
    p.add_argument("--threads", type=int, default=None, help="default: every core (1 if --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model, 128 px, 2 images (tests)")
    return p


def parse_slice_bench(p: argparse.ArgumentParser, argv: list[str] | None, **quick):
    """(args, threads): ``--quick`` sets the tiny model, 2 images of 128 px, 1 thread (tiny
    matmuls gain nothing from a second one) and the bench's own ``quick`` values."""
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.images, args.size = "tiny", 2, 128
        args.threads = args.threads or 1
        for key, value in quick.items():
            setattr(args, key, value)
    logging.getLogger("sam_ft").setLevel(logging.ERROR)  # the random-weights warning
    return args, set_threads(args.threads)


def set_threads(threads: int | None) -> int:
    """Use ``threads`` intra-op threads (default: every core) and return the number."""
    n = int(threads or os.cpu_count() or 1)
    torch.set_num_threads(n)
    return n


def write_ct_task(root: Path, images: int, size: int, seed: int = 0) -> Path:
    """Write synthetic CT volumes with exactly ``images`` object-holding axial slices.

    Args:
        root: task folder; gets ``imagesTr/``, ``labelsTr/``, ``dataset.json`` and
            ``splits.json`` (every case in train, so the train split holds all slices).
        images: number of slices in total (cases hold up to ``DEPTH`` slices each).
        size: in-plane side of each (size, size) slice.

    Returns:
        The ``splits.json`` path (for ``data.split.file``).
    """
    import nibabel as nib
    from scipy.ndimage import zoom

    from sam_ft.data.demo import DEMO_LABELS, make_demo_case

    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    scale = size / BASE_SIZE
    # The demo's 1.5 mm at 96 px, scaled so the body keeps its size in mm at any slice size.
    pixel = 1.5 * 96 / size
    affine = np.diag([pixel, pixel, 5.0, 1.0])
    cases, left, index = [], images, 0
    while left > 0:
        image, label = make_demo_case(index, seed, shape=(BASE_SIZE, BASE_SIZE, DEPTH))
        keep = np.flatnonzero(label.reshape(-1, DEPTH).max(axis=0) > 0)[:left]
        image, label = image[..., keep], label[..., keep]
        image = zoom(image, (scale, scale, 1), order=1).astype(np.int16)
        label = zoom(label, (scale, scale, 1), order=0).astype(np.uint8)
        name = f"bench_{index:03d}"
        nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / f"{name}.nii.gz")
        cases.append(name)
        left -= len(keep)
        index += 1
    meta = {
        "name": "bench",
        "modality": {"0": "CT"},
        "labels": {"0": "background", **{str(k): v for k, v in DEMO_LABELS.items()}},
        "numTraining": len(cases),
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    splits = root / "splits.json"
    splits.write_text(json.dumps({"train": cases, "val": [], "test": []}))
    return splits


def compose(model: str, task_root: Path, splits: Path, cache_dir: Path, extra: Sequence[str] = ()):
    """The ``train`` config for ``model`` (random weights) on the bench task."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    overrides = [
        f"model={model}",
        "model.checkpoint=null",
        "task=folder",
        f"task.root={task_root}",
        "task.modality=CT",
        "task.intensity.mode=window",
        "task.intensity.level=40",
        "task.intensity.width=400",
        f"data.split.file={splits}",
        f"data.cache_dir={cache_dir}",
        "trainer=cpu",
        "logger=none",
        *extra,
    ]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose("train", overrides=overrides)


def make_datamodule(cfg, model, run_dir: Path, progress: bool = False):
    """The ``SamDataModule`` exactly as ``sam_ft.train.train`` builds it."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sam_ft.data.datamodule import SamDataModule
    from sam_ft.data.tasks import data_options, task_options

    return SamDataModule(
        task=task_options(OmegaConf.to_container(cfg.task, resolve=True)),
        data=data_options(OmegaConf.to_container(cfg.data, resolve=True)),
        transform=model.transform,
        train_prompt=instantiate(cfg.prompt),
        seed=cfg.seed,
        run_dir=run_dir,
        progress=progress,
        # The train config's loss.resolution decides the kind of target (eval configs: none).
        target_resolution=cfg.loss.resolution if "loss" in cfg else "low",
    )


@contextmanager
def timed(out: dict, key: str):
    """Add the wall time of the block to ``out[key]`` (seconds)."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        out[key] = out.get(key, 0.0) + time.perf_counter() - t0


def repeat_time(fn: Callable[[], object], repeats: int, warmup: int = 1) -> list[float]:
    """Wall times of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB; Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain fixed-width table (copied verbatim into BENCHMARKS.md)."""
    cells = [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in cells)) for i, h in enumerate(header)]
    print(f"\n{title}")
    print("| " + " | ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in cells:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    sys.stdout.flush()


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def machine() -> str:
    """``<cpu model>, <n> cores, torch <version>, <n> threads``."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (
        f"{model}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads"
    )


def final_line(name: str, value: float) -> None:
    """The machine-readable last line: ``name=value``."""
    print(f"{name}={value:.4g}", flush=True)
