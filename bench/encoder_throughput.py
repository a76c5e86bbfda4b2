"""Image-encoder throughput: official attention vs SDPA (fp32) vs SDPA under bf16 autocast.

Random weights (no checkpoint needed: speed does not depend on the values), inference only
(``torch.no_grad``), through ``TrainableSam.encode`` so the measured path is the one training and
evaluation run. bf16 is measured on CUDA GPUs that support it only.

    python bench/encoder_throughput.py --model vit_b --batch 4 --iters 10
    python bench/encoder_throughput.py --quick        # tiny model, tiny input: a smoke test

The last line is ``sdpa_speedup_vs_original=<x>``: SDPA fp32 img/s over official fp32 img/s.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from sam_ft.model.attention import use_original_attention, use_sdpa_attention
from sam_ft.model.builders import SPECS, build_sam_architecture
from sam_ft.model.trainable import TrainableSam


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vit_b", choices=["tiny", "vit_b", "vit_l", "vit_h"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--iters", type=int, default=5, help="timed iterations per mode")
    p.add_argument("--warmup", type=int, default=1, help="untimed iterations per mode (>= 1)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    p.add_argument("--image-size", type=int, default=None, help="default: the model's own")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="tiny model, 64px input, 1 iteration")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.batch, args.iters, args.warmup, args.image_size = "tiny", 1, 1, 0, 64
    return args


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model: TrainableSam, images: torch.Tensor, iters: int, warmup: int):
    """(img/s, peak MiB or None, first output) of ``model.encode`` on ``images``.

    The first call is always untimed: it carries one-off costs (allocator, kernel selection).
    """
    device = images.device
    out = model.encode(images)  # also the first warmup iteration
    for _ in range(max(warmup - 1, 0)):
        model.encode(images)
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(iters):
        model.encode(images)
    _sync(device)  # kernels are asynchronous: time their end, not their launch
    seconds = time.perf_counter() - start
    # CPU has no per-phase peak (RSS only grows over the process): reported as n/a.
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return images.shape[0] * iters / seconds, peak, out.float()


def main(argv: list[str] | None = None) -> float:
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_num_threads(args.threads or os.cpu_count() or 1)
    size = args.image_size or SPECS[args.model].image_size
    torch.manual_seed(0)
    sam = build_sam_architecture(args.model, image_size=size)
    model = (
        TrainableSam(sam, "sam", grad_checkpointing=False, encoder_bf16=True, multimask_output=True)
        .to(device)
        .eval()
    )
    images = torch.randn(args.batch, 3, size, size, device=device)

    modes = [("original fp32", False, False), ("sdpa fp32", True, False)]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        modes.append(("sdpa bf16-autocast", True, True))
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(
        f"{args.model} encoder, input {size}x{size}, batch {args.batch}, {args.iters} iters; "
        f"{where}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"| {'mode':<18} | {'img/s':>8} | {'ms/img':>8} | {'peak MiB':>8} | {'max rel diff':>12} |"
    )
    print("|" + "|".join("-" * n for n in (20, 10, 10, 10, 14)) + "|")
    rates, reference = {}, None
    for name, sdpa, bf16 in modes:
        (use_sdpa_attention if sdpa else use_original_attention)(model.sam)
        model.encoder_bf16 = bf16
        rate, peak, out = measure(model, images, args.iters, args.warmup)
        reference = out if reference is None else reference
        diff = ((out - reference).abs().max() / reference.abs().max().clamp_min(1e-12)).item()
        peak_text = f"{peak:.0f}" if peak is not None else "n/a"
        print(
            f"| {name:<18} | {rate:>8.3g} | {1000 / rate:>8.1f} | {peak_text:>8} | {diff:>12.1e} |"
        )
        rates[name] = rate
    if "sdpa bf16-autocast" in rates:
        bf16_speedup = rates["sdpa bf16-autocast"] / rates["original fp32"]
        print(f"sdpa_bf16_speedup_vs_original={bf16_speedup:.3f}")
    speedup = rates["sdpa fp32"] / rates["original fp32"]
    print(f"sdpa_speedup_vs_original={speedup:.3f}")
    return speedup


if __name__ == "__main__":
    main()
