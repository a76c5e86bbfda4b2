"""Data loading rate vs the training step rate it has to feed.

Measured on the product's ``SamDataModule`` over synthetic CT volumes written as NIfTI:

* cold: ``setup`` with an empty slice cache (read NIfTI, window, slice, write the cache);
* slice cache: ``setup`` again in a new DataModule (indexes the cached entries from their
  headers, no NIfTI, no pixels);
* per epoch: the train ``DataLoader`` (``data.num_workers=0``, the default) serving cached
  embeddings (decoder finetuning) or images (encoder finetuning or augmentation), each item
  read from the slice cache with its low-res training target made on the spot.

The rate to feed is the cached decoder-only training step (``training_step`` + backward +
AdamW), the fastest consumer there is; the image path feeds steps that also run the encoder, so
the decoder step rate bounds it from above as well. The embedding cache is filled by a stand-in
encoder that returns zeros of the real embedding shape, so its files have the real size.

    python bench/data_throughput.py --model vit_b --images 32

Last line: ``data_headroom=<slowest per-epoch loader items/s / decoder step items/s>`` (above 1:
loading is never the bottleneck).
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP. On a shared machine spinning worker threads made the decoder's
# small ops 3-5x slower whenever another process held a core; sleeping ones cost ~nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import tempfile
import time
import warnings
from pathlib import Path

import torch

# bench/ is on sys.path when a bench runs as a script.
from _common import (
    compose,
    final_line,
    machine,
    make_datamodule,
    median,
    parse_slice_bench,
    print_table,
    repeat_time,
    slice_bench_parser,
    write_ct_task,
)
from hydra.utils import instantiate


def _loader_rate(datamodule) -> tuple[float, int]:
    """(items/s, items) of one pass over the train DataLoader."""
    loader = datamodule.train_dataloader()
    t0, items = time.perf_counter(), 0
    for batch in loader:
        items += len(batch["case"])
    return items / (time.perf_counter() - t0), items


def _step_time(cfg, model, batch: dict, repeats: int) -> float:
    """Median seconds of one decoder-only training step on ``batch`` (embeddings given)."""
    from sam_ft.train import build_loss
    from sam_ft.training.module import SamFinetuneModule

    finetune = instantiate(cfg.finetune)
    finetune.apply(model)
    module = SamFinetuneModule(
        model,
        finetune,
        build_loss(cfg),
        instantiate(cfg.optimizer),
        None,
        multimask_output=False,
        mask_selection=str(cfg.eval.mask_selection),
        max_nonfinite_steps=cfg.train.max_nonfinite_steps,
        overlays=0,
    )
    module.train()
    optimizer = instantiate(cfg.optimizer)(finetune.param_groups(model, cfg.optimizer.lr))

    def step() -> None:
        module.training_step(batch, 0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() outside a Trainer warns; nothing is logged
        return median(repeat_time(step, repeats))


def main(argv: list[str] | None = None) -> float:
    p = slice_bench_parser(__doc__, 32, "slices in the task")
    p.add_argument("--batch-size", type=int, default=2)
    args, threads = parse_slice_bench(p, argv)

    tmp = Path(tempfile.mkdtemp(prefix="bench_data_"))
    splits = write_ct_task(tmp / "task", args.images, args.size)
    cfg = compose(
        args.model, tmp / "task", splits, tmp / "cache", [f"data.batch_size={args.batch_size}"]
    )
    model = instantiate(cfg.model)
    t: dict[str, float] = {}

    cold = make_datamodule(cfg, model, tmp / "run_cold")
    t0 = time.perf_counter()
    cold.setup("fit")
    t["cold"] = time.perf_counter() - t0
    n = len(cold.records("train"))

    warm = make_datamodule(cfg, model, tmp / "run_warm")
    t0 = time.perf_counter()
    warm.setup("fit")
    t["warm"] = time.perf_counter() - t0
    rate_images, _ = _loader_rate(warm)

    side = model.image_size // 16
    channels = model.sam.prompt_encoder.embed_dim

    def stand_in_encoder(images: torch.Tensor) -> torch.Tensor:
        return torch.zeros(len(images), channels, side, side)

    cached = make_datamodule(cfg, model, tmp / "run_cached")
    cached.use_embedding_cache(stand_in_encoder, "bench-stand-in", "cpu")
    cached.setup("fit")
    rate_embeddings, _ = _loader_rate(cached)

    batch = next(iter(cached.train_dataloader()))
    batch["embedding"] = torch.randn_like(batch["embedding"])
    step = _step_time(cfg, model, batch, repeats=3 if args.quick else 5)
    rate_step = len(batch["case"]) / step
    headroom = min(rate_embeddings, rate_images) / rate_step

    print(f"machine: {machine()} (threads={threads})")
    print(
        f"data: {n} synthetic CT slices {args.size}x{args.size} (NIfTI), model input "
        f"{model.image_size}, batch {args.batch_size}, data.num_workers=0"
    )
    rows = [
        ["cold: NIfTI -> slices (+ slice cache write)", n / t["cold"], "once per task"],
        ["slice cache hit: index from entry headers", n / t["warm"], "once per run"],
        ["loader, cached embeddings (decoder finetuning)", rate_embeddings, "every epoch"],
        ["loader, images -> model input (encoder modes)", rate_images, "every epoch"],
        ["decoder-only training step (to feed)", rate_step, "every epoch"],
    ]
    print_table(
        "slices per second",
        ["stage", "slices/s", "when", "x step rate"],
        [[a, b, c, b / rate_step] for a, b, c in rows],
    )
    final_line("data_headroom", headroom)
    return headroom


if __name__ == "__main__":
    main()
