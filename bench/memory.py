"""Peak memory of a finetuning step per mode (``decoder``, ``lora``, ``encoder_last_n``, ``full``).

Each (mode, batch size) runs in its own subprocess, so every peak is that mode's alone: build
the model (random weights), apply the mode, then one training step of ``SamFinetuneModule``
(``training_step`` + backward + AdamW) on a batch of model-size images with two box prompts
each. ``decoder`` trains on embeddings as the warm embedding cache serves them (no encoder pass).
On a CPU the figure is the process's peak RSS (weights, optimizer state and activations); on a
GPU it is ``torch.cuda.max_memory_allocated``. A CPU child whose RSS passes ``--max-gb`` is
stopped and reported as above the limit (the machine is shared).

    python bench/memory.py --model vit_b --batch-sizes 1,2

Last line: ``peak_mb_full_vs_decoder=<peak of full / peak of decoder at the first batch size>``.
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP. On a shared machine spinning worker threads made the decoder's
# small ops 3-5x slower whenever another process held a core; sleeping ones cost ~nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

# bench/ is on sys.path when a bench runs as a script.
from _common import final_line, machine, peak_rss_mb, print_table, set_threads

MODES = ("decoder", "lora", "encoder_last_n", "full")


def _child(model_name: str, mode: str, batch_size: int, device: str) -> dict:
    """Build, apply ``mode``, take one step; return the memory figures (MB).

    One step holds both peaks: the activations during backward and, at ``optimizer.step``, the
    AdamW state, which later steps reuse.
    """
    from functools import partial

    import numpy as np

    from sam_ft.defaults import build_from_yaml
    from sam_ft.model.builders import build_trainable_sam
    from sam_ft.prompts.types import Prompt
    from sam_ft.training.module import SamFinetuneModule

    model = build_trainable_sam(model_name).to(device)
    finetune = build_from_yaml("finetune", mode)
    counts = finetune.apply(model)
    loss = build_from_yaml("loss", "dice_ce", iou_weight=1.0)
    module = SamFinetuneModule(
        model, finetune, loss, partial(torch.optim.AdamW, lr=1e-4), None,
        multimask_output=False, mask_selection="oracle", max_nonfinite_steps=10, overlays=0,
    )  # fmt: skip
    module.train()
    optimizer = torch.optim.AdamW(finetune.param_groups(model, 1e-4))
    s = model.image_size
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, s, s, generator=gen).to(device)
    box = np.array([s * 0.25, s * 0.25, s * 0.6, s * 0.7])
    batch = {
        "prompts": [[Prompt(box=box), Prompt(box=box * 1.2)] for _ in range(batch_size)],
        "original_size": [(s, s)] * batch_size,
        # The default loss.resolution=original: targets are the masks at the image's size.
        "target": [
            (torch.rand(2, s, s, generator=gen) > 0.5).to(device) for _ in range(batch_size)
        ],
        "case": ["bench"] * batch_size,
    }
    if mode == "decoder":
        # What the warm embedding cache serves: no encoder pass in the training process.
        side = s // 16
        batch["embedding"] = torch.randn(batch_size, 256, side, side, generator=gen).to(device)
    else:
        batch["image"] = images
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() / 2**20 if cuda else peak_rss_mb()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() outside a Trainer warns; nothing is logged
        module.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
    step_s = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else peak_rss_mb()
    return {
        "mode": mode,
        "batch": batch_size,
        "trainable": counts["trainable"],
        "before_mb": before,
        "peak_mb": peak,
        "step_s": step_s,
    }


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def _run_child(args, mode: str, batch_size: int) -> dict:
    """One subprocess; stopped (and marked) when its RSS passes ``--max-gb`` on a CPU."""
    cmd = [sys.executable, __file__, "--child", mode, str(batch_size), "--model", args.model]
    cmd += ["--device", args.device, "--threads", str(args.threads)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    limit_mb, over = args.max_gb * 1024, 0.0
    while proc.poll() is None:
        rss = _rss_mb(proc.pid)
        if args.device == "cpu" and rss > limit_mb:
            over = rss
            proc.kill()
            break
        time.sleep(0.1)
    out, _ = proc.communicate()
    if over:
        return {"mode": mode, "batch": batch_size, "over_mb": over}
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{mode} batch {batch_size} failed (exit {proc.returncode})")
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--modes", default=",".join(MODES))
    p.add_argument("--batch-sizes", default="1,2")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--max-gb", type=float, default=12.0, help="stop a CPU child above this RSS")
    p.add_argument("--threads", type=int, default=0, help="0: every core (1 if --quick)")
    p.add_argument("--quick", action="store_true", help="tiny model, batch 1, two modes (tests)")
    p.add_argument("--child", nargs=2, metavar=("MODE", "BATCH"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.modes, args.batch_sizes = "tiny", "decoder,full", "1"
        args.threads = args.threads or 1
    threads = set_threads(args.threads or None)
    if args.child:
        import logging

        logging.getLogger("sam_ft").setLevel(logging.ERROR)  # the random-weights warning
        print(json.dumps(_child(args.model, args.child[0], int(args.child[1]), args.device)))
        return 0.0

    modes = args.modes.split(",")
    sizes = [int(b) for b in args.batch_sizes.split(",")]
    results = [_run_child(args, m, b) for b in sizes for m in modes]
    what = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS"
    rows = []
    for r in results:
        if "over_mb" in r:
            rows.append([r["mode"], r["batch"], "", "", f"> {args.max_gb:g} GB (stopped)", ""])
        else:
            rows.append(
                [r["mode"], r["batch"], f"{r['trainable']:,}", r["before_mb"], r["peak_mb"]]
                + [r["step_s"]]
            )
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else machine()
    print(f"machine: {device} (threads={threads})")
    print(f"model {args.model} (random weights), input {args.model} size, 2 box prompts/image")
    print_table(
        f"{what} per finetuning mode (MB)",
        ["mode", "batch", "trainable params", "after build MB", "peak MB", "step s"],
        rows,
    )
    peaks = {(r["mode"], r["batch"]): r.get("peak_mb") for r in results}
    full, dec = peaks.get(("full", sizes[0])), peaks.get(("decoder", sizes[0]))
    ratio = full / dec if full and dec else float("nan")
    final_line("peak_mb_full_vs_decoder", ratio)
    return ratio


if __name__ == "__main__":
    main()
