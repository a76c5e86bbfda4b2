"""The evaluation's tables do not depend on the thread count (issue #28; sam_ft/reproducible.py).

A fresh Python process, started as a user starts one (no ``OMP_NUM_THREADS`` pinned, sam_ft
imported before any torch computation), scores the same cases with 1, 2 and 4 intra-op threads
(``torch.set_num_threads``): every ``per_object.csv`` and ``per_case.csv`` must be byte-identical.
``pred_iou`` is written with all its digits, so any float difference in the encoder or decoder
shows there (before the fix, 1 vs 2 threads changed it in most rows, and the Dice of some).
tests/test_eval_distributed.py: DDP ranks and shards, each with its default thread count.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = r"""
import sys
from pathlib import Path

from sam_ft.data.types import SliceRecord  # sam_ft first: it sets MKL's mode
import numpy as np
import torch

from sam_ft.evaluation.protocol.options import eval_options
from sam_ft.evaluation.protocol.engine import evaluate_models
from sam_ft.model.builders import build_sam_architecture
from sam_ft.model.trainable import TrainableSam

H, W = 96, 112


def record(case, s):
    rng = np.random.default_rng([sum(map(ord, case)), s])
    yy, xx = np.mgrid[:H, :W]
    masks = np.stack([
        (yy - 40) ** 2 + (xx - 36 - 3 * s) ** 2 < (14 + s) ** 2,
        (yy > 8) & (yy < 30) & (xx > 60) & (xx < 100),
    ])
    grey = rng.normal(60, 12, (H, W))
    for k, m in enumerate(masks):
        grey[m] += 70 + 30 * k
    image = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    return SliceRecord(
        case=case, slice_index=s, image=image, masks=masks, labels=np.array([1, 2]),
        names=["disc", "rect"], spacing=(0.8, 0.7), modality="CT",
        raw=grey.astype(np.float32), num_slices=2, slice_spacing=2.5,
    )


out, threads = Path(sys.argv[1]), [int(t) for t in sys.argv[2:]]
torch.manual_seed(0)
sam = build_sam_architecture("tiny", image_size=128)
# conf/model/tiny.yaml's settings
model = TrainableSam(
    sam, "sam", grad_checkpointing=False, encoder_bf16=True, multimask_output=True
).eval()
cases = [[record("a", s) for s in (0, 1)]]
cfg = {"prompts": ["point1", "box"], "jitter_px": [], "overlays": 0}
for n in threads:
    torch.set_num_threads(n)
    evaluate_models(
        {"zero_shot": model}, cases, task_name="t", options=eval_options(cfg),
        out_dir=out / f"threads{n}",
        seed=3, progress=False, report=False,
    )
"""


def test_tables_are_the_same_bytes_with_any_thread_count(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_CBWR")}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path), "1", "2", "4"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    dirs = [tmp_path / "threads1", tmp_path / "threads2", tmp_path / "threads4"]
    for name in ("per_object.csv", "per_case.csv"):
        want = dirs[0].joinpath(name).read_bytes()
        assert want.count(b"\n") > 4  # every prompt of every object was scored
        for d in dirs[1:]:
            assert d.joinpath(name).read_bytes() == want, f"{d.name}/{name}"
