"""Peak memory of the evaluation's main process with big cases: the queue of decoded cases
waiting for their scoring bounded by count only (``workers + 1`` cases: what it was before
``eval.queue_mb``) against the default byte bound.

Each setting runs in its own subprocess: the tiny model (random weights) scores ``--cases``
synthetic CT-like cases of ``--size`` x ``--size`` x ``--slices`` (one ellipsoid object, every
slice kept), each generated when its turn comes (a ``LazyCase``), with ``--workers`` scoring
processes. The figure is the child's peak RSS (``ru_maxrss``), the main process alone (the
workers are separate processes).

    python bench/eval_queue.py --cases 6 --size 512 --slices 24 --workers 3 --queue-mb 64

Last line: ``peak_rss_bytes_bound_vs_count_bound=<ratio>``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import final_line, peak_rss_mb, print_table


def _case(i: int, size: int, slices: int):
    """A (slices, size, size) case with one ellipsoid, every slice kept (CaseData)."""
    import numpy as np

    from sam_ft.data.loading import CaseData
    from sam_ft.data.types import SliceRecord

    rng = np.random.default_rng(i)
    yy, xx = np.mgrid[:size, :size]
    r = size / 4
    disc = ((yy - size / 2) / r) ** 2 + ((xx - size / 2) / (r * 0.7)) ** 2 < 1
    label = np.repeat(disc[None].astype(np.uint8), slices, axis=0)
    records = []
    for s in range(slices):
        raw = rng.normal(0, 50, (size, size)).astype(np.float32) + 200 * label[s]
        grey = np.clip(raw / 4 + 60, 0, 255).astype(np.uint8)
        records.append(
            SliceRecord(
                case=f"case_{i:02d}",
                slice_index=s,
                image=np.repeat(grey[..., None], 3, axis=2),
                masks=label[s][None].astype(bool),
                labels=np.array([1]),
                names=["object"],
                raw=raw,
                num_slices=slices,
                image_id=f"case_{i:02d}",
            )
        )
    return CaseData(
        case=f"case_{i:02d}",
        image_id=f"case_{i:02d}",
        image_path="",
        label_path="",
        slices=records,
        label_volume=label.astype(np.int16),
        objects={"object": [1]},
        spacing=(1.0, 1.0, 1.0),
        affine=np.eye(4),
        slice_axis=0,
        modality="CT",
    )


def _child(args) -> dict:
    from functools import partial

    import torch

    from sam_ft.defaults import build_from_yaml
    from sam_ft.evaluation.protocol.cases import LazyCase
    from sam_ft.evaluation.protocol.engine import evaluate_models
    from sam_ft.evaluation.protocol.options import eval_options

    torch.manual_seed(0)
    model = build_from_yaml("model", "tiny")
    cases = [
        LazyCase(f"case_{i:02d}", partial(_case, i, args.size, args.slices))
        for i in range(args.cases)
    ]
    cfg = {
        "prompts": ["point1", "box"],
        "jitter_px": [[0, 0]],
        "workers": args.workers,
        "queue_mb": args.queue_mb,
        "overlays": 0,
    }
    start = time.perf_counter()
    evaluate_models(
        {"m": model},
        cases,
        task_name="t",
        options=eval_options(cfg),
        out_dir=args.out,
        seed=0,
        progress=False,
        report=False,
    )
    one = _case(0, args.size, args.slices)
    case_mb = (
        sum(r.image.nbytes + r.masks.nbytes + r.raw.nbytes for r in one.slices)
        + one.label_volume.nbytes
    ) / 2**20
    return {
        "peak_rss_mb": peak_rss_mb(),
        "seconds": time.perf_counter() - start,
        "case_mb": case_mb,
    }


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cases", type=int, default=6)
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--slices", type=int, default=24)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--queue-mb", type=int, default=None, help="the bound (default: the YAML's)")
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(json.dumps(_child(args)))
        return 0.0
    import tempfile

    from sam_ft.defaults import group_defaults

    bound = args.queue_mb or group_defaults("eval")["queue_mb"]
    settings = [("count bound only (before)", 10**6), (f"eval.queue_mb={bound}", bound)]
    rows, peaks = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, queue) in enumerate(settings):
            cmd = [
                sys.executable, __file__, "--child", "--cases", str(args.cases), "--size",
                str(args.size), "--slices", str(args.slices), "--workers", str(args.workers),
                "--queue-mb", str(queue), "--out", str(Path(tmp) / str(i)),
            ]  # fmt: skip
            # This checkout's sam_ft in the child, whatever the venv has installed.
            root = str(Path(__file__).resolve().parents[1])
            env = dict(
                os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])
            )
            out = subprocess.run(cmd, capture_output=True, text=True, check=True, env=env)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            peaks.append(res["peak_rss_mb"])
            rows.append([name, round(res["case_mb"]), round(res["peak_rss_mb"]),
                         round(res["seconds"], 1)])  # fmt: skip
            print(f"{name}: peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    print_table(
        f"Evaluation main process, {args.cases} cases of {args.size}x{args.size}x{args.slices}, "
        f"eval.workers={args.workers}",
        ["queue", "case MB", "peak RSS MB", "s"],
        rows,
    )
    ratio = peaks[1] / peaks[0]
    final_line("peak_rss_bytes_bound_vs_count_bound", ratio)
    return ratio


if __name__ == "__main__":
    main()
