"""The GPU benchmarks in one run, one table: what ``bench/gpu.sh`` runs on a GPU machine.

Rows (random weights, synthetic inputs; every figure is a rate over timed repeats after
untimed warm-up, with the CUDA peak of that measurement alone):

- ``encoder``: ``TrainableSam.encode`` images/s, ViT-B and ViT-H, fp32 and bf16 autocast (SDPA
  attention, as training and evaluation run it).
- ``train step``: one finetuning step (``SamFinetuneModule.training_step`` + backward + AdamW)
  per finetune mode, batch 2 with 2 box prompts per image; ``decoder`` and ``decoder_prompt`` on
  cached embeddings (what the warm embedding cache serves: no encoder pass), the other modes on
  images through the encoder; fp32 and bf16 autocast.
- ``evaluate vs encoder``: ``bench/eval_throughput.py --pipeline`` (every ``eval.workers``),
  evaluation images/s over the encoder alone's on the same images, ViT-B and ViT-H.
- ``evaluate``: ``python evaluate.py`` end to end (start-up included) on synthetic CT slices,
  S2-S6 x the 3 jitter levels, images/s on 1 GPU and on every GPU (``trainer=ddp``).

    python bench/gpu.py --out DIR          # writes DIR/gpu_bench.md and DIR/gpu_bench.csv
    python bench/gpu.py --dry-run --out DIR  # the same code on a CPU: tiny model, tiny counts

Last line: ``encoder_bf16_vs_fp32_vit_b=<ratio>``.
"""

from __future__ import annotations

import argparse
import csv
import gc
import logging
import subprocess
import sys
import tempfile
import time
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import torch

# bench/ is on sys.path when a bench runs as a script.
from _common import final_line
from eval_processes import eval_rows

BENCH = Path(__file__).resolve().parent
MODES = ("decoder", "decoder_prompt", "lora", "encoder_last_n", "full")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    return torch.cuda.max_memory_allocated(device) / 2**20


def _rate(fn, items: int, iters: int, warmup: int, device: torch.device) -> float:
    """Items per second of ``fn`` over ``iters`` timed calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)  # kernels are asynchronous: time their end, not their launch
    return items * iters / (time.perf_counter() - start)


def encoder_rows(
    model_name: str, batch: int, iters: int, device: torch.device, precision: str
) -> list[dict]:
    from sam_ft.model.builders import build_trainable_sam

    torch.manual_seed(0)
    model = build_trainable_sam(model_name).to(device).eval()
    images = torch.randn(batch, 3, model.image_size, model.image_size, device=device)
    model.encoder_bf16 = precision == "bf16"
    _reset_peak(device)
    with torch.inference_mode():
        rate = _rate(partial(model.encode, images), batch, iters, 1, device)
    return [_row("encoder", model_name, "-", precision, batch, rate, "images/s", device)]


def _train_batch(model, batch: int, mode: str, device: torch.device) -> dict:
    from sam_ft.prompts.types import Prompt

    s = model.image_size
    gen = torch.Generator().manual_seed(0)
    box = np.array([s * 0.25, s * 0.25, s * 0.6, s * 0.7])
    out = {
        "prompts": [[Prompt(box=box), Prompt(box=box * 1.2)] for _ in range(batch)],
        "original_size": [(s, s)] * batch,
        # The default loss.resolution=original: targets are the masks at the image's size.
        "target": [(torch.rand(2, s, s, generator=gen) > 0.5).to(device)] * batch,
        "case": ["bench"] * batch,
    }
    if mode in ("decoder", "decoder_prompt"):
        side = s // 16
        out["embedding"] = torch.randn(batch, 256, side, side, generator=gen).to(device)
    else:
        out["image"] = torch.randn(batch, 3, s, s, generator=gen).to(device)
    return out


def train_rows(
    model_name: str, batch: int, iters: int, device: torch.device, mode: str, precision: str
) -> list[dict]:
    from functools import partial

    from sam_ft.defaults import build_from_yaml
    from sam_ft.model.builders import build_trainable_sam
    from sam_ft.training.module import SamFinetuneModule

    torch.manual_seed(0)
    model = build_trainable_sam(model_name).to(device)
    finetune = build_from_yaml("finetune", mode)
    finetune.apply(model)
    loss = build_from_yaml("loss", "dice_ce", iou_weight=1.0)
    module = SamFinetuneModule(
        model, finetune, loss, partial(torch.optim.AdamW, lr=1e-4), None,
        multimask_output=False, mask_selection="oracle", max_nonfinite_steps=10, overlays=0,
    )  # fmt: skip
    module.train()
    optimizer = torch.optim.AdamW(finetune.param_groups(model, 1e-4))
    data = _train_batch(model, batch, mode, device)
    bf16 = precision == "bf16"

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = module.training_step(data, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    _reset_peak(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() outside a Trainer warns
        rate = _rate(step, 1, iters, 2, device)
    return [_row("train step", model_name, mode, precision, batch, rate, "steps/s", device)]


def pipeline_rows(models: list[str], images: int, size: int, device: str) -> list[dict]:
    """``bench/eval_throughput.py --pipeline`` (issue #20): evaluation images/s with every
    ``eval.workers`` against the encoder alone on the same images (target >= 0.8)."""
    rows = []
    for name in models:  # one model per call from main(): a failure costs its row only
        cmd = [sys.executable, str(BENCH / "eval_throughput.py"), "--pipeline", "--model", name]
        cmd += ["--device", device, "--workers", "auto", "--images", str(images)]
        cmd += ["--size", str(size), "--threads", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        last = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
        if proc.returncode != 0 or not last.startswith("eval_vs_encoder_rate="):
            raise RuntimeError(f"eval_throughput.py --pipeline failed: {_last_line(proc.stderr)}")
        rate = float(last.split("=", 1)[1])
        rows.append(
            {
                "bench": "evaluate vs encoder",
                "model": name,
                "mode": "eval.workers=auto",
                "precision": "auto",
                "batch": images,
                "rate": rate,
                "unit": "x encoder images/s",
                "peak_mib": float("nan"),
            }
        )
    return rows


def _row(bench, model, mode, precision, batch, rate, unit, device) -> dict:
    return {
        "bench": bench,
        "model": model,
        "mode": mode,
        "precision": precision,
        "batch": batch,
        "rate": rate,
        "unit": unit,
        "peak_mib": _peak_mib(device),
    }


def write_table(rows: list[dict], out: Path, header: str) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    with (out / "gpu_bench.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    columns = "| bench | model | mode | precision | batch | rate | unit | peak CUDA MiB |"
    lines = [header, "", columns]
    lines.append("|---|---|---|---|---:|---:|---|---:|")
    for r in rows:
        peak = "n/a" if np.isnan(r["peak_mib"]) else f"{r['peak_mib']:.0f}"
        lines.append(
            f"| {r['bench']} | {r['model']} | {r['mode']} | {r['precision']} | {r['batch']} "
            f"| {r['rate']:.3g} | {r['unit']} | {peak} |"
        )
    path = out / "gpu_bench.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _last_line(text: str) -> str:
    lines = [line for line in str(text).strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _failed_row(label: tuple[str, str, str, str], batch: int, err: BaseException) -> dict:
    """The row of a measurement that failed: its cause in ``unit``, no rate."""
    oom = isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()
    cause = "out of memory" if oom else f"{type(err).__name__}: {_last_line(str(err))}"
    bench, model, mode, precision = label
    return {
        "bench": bench, "model": model, "mode": mode, "precision": precision, "batch": batch,
        "rate": float("nan"), "unit": f"FAILED ({cause})", "peak_mib": float("nan"),
    }  # fmt: skip


def _jobs(args, models: list[str], device: torch.device, size: int, gpus: int, work: Path):
    """(label, batch, measurement) per row, in the order they run."""
    for name in models:
        for precision in ("fp32", "bf16"):
            yield (
                ("encoder", name, "-", precision),
                args.encoder_batch,
                partial(encoder_rows, name, args.encoder_batch, args.iters, device, precision),
            )
    for name in models:
        for mode in MODES:
            for precision in ("fp32", "bf16"):
                yield (
                    ("train step", name, mode, precision),
                    args.train_batch,
                    partial(
                        train_rows, name, args.train_batch, args.iters, device, mode, precision
                    ),
                )
    for name in models:
        yield (
            ("evaluate vs encoder", name, "eval.workers=auto", "auto"),
            args.eval_images,
            partial(pipeline_rows, [name], args.eval_images, size, device.type),
        )
    yield (
        ("evaluate", args.eval_model, "1 process", "auto"),
        args.eval_images,
        partial(eval_rows, args.eval_model, args.eval_images, size, gpus, work, device.type),
    )
    # fmt: skip


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for gpu_bench.md / .csv")
    p.add_argument("--models", default=None, help="default vit_b,vit_h (tiny in a dry run)")
    p.add_argument("--iters", type=int, default=10, help="timed repeats per measurement")
    p.add_argument("--encoder-batch", type=int, default=4)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--eval-images", type=int, default=64, help="synthetic CT slices evaluated")
    p.add_argument("--eval-model", default="vit_b")
    p.add_argument("--dry-run", action="store_true", help="CPU, tiny model, tiny counts (tests)")
    args = p.parse_args(argv)
    logging.getLogger("sam_ft").setLevel(logging.ERROR)  # the random-weights warning

    if args.dry_run:
        device, models, gpus = torch.device("cpu"), (args.models or "tiny").split(","), 1
        args.iters, args.encoder_batch, args.train_batch = 1, 1, 1
        args.eval_images, args.eval_model, size = 2, "tiny", 128
        torch.set_num_threads(1)
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench/gpu.py: no CUDA GPU visible to torch; use --dry-run on a CPU")
        device, models = torch.device("cuda"), (args.models or "vit_b,vit_h").split(",")
        gpus, size = torch.cuda.device_count(), 512
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (dry run)"
    header = (
        f"GPU benchmarks: {where} x {gpus}, torch {torch.__version__}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; random weights"
    )
    print(header, flush=True)
    # Each row is measured alone and written at once (table and CSV rewritten, the row printed):
    # a failure (an out-of-memory error: ViT-H full in fp32 may not fit) costs that row only, and
    # a run stopped at its time limit keeps every row measured before.
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as work:
        for label, batch, measure in _jobs(args, models, device, size, gpus, Path(work)):
            try:
                got = measure()
            except (Exception, SystemExit) as err:  # one row lost, the others go on
                got = [_failed_row(label, batch, err)]
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            for r in got:
                rows.append(r)
                print("row: " + ", ".join(f"{k}={v}" for k, v in r.items()), flush=True)
            write_table(rows, args.out, header)
    print((args.out / "gpu_bench.md").read_text())
    first = [r for r in rows if r["bench"] == "encoder" and r["model"] == models[0]]
    enc = {r["precision"]: r["rate"] for r in first}
    ratio = enc.get("bf16", float("nan")) / enc.get("fp32", float("nan"))
    final_line(f"encoder_bf16_vs_fp32_{models[0]}", ratio)
    return ratio


if __name__ == "__main__":
    main()
