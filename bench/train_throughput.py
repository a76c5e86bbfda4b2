"""Decoder-only finetuning epoch time: embedding cache warm vs the frozen encoder every step.

Both runs use the product's path: the composed ``train`` config, ``SamDataModule`` (NIfTI ->
slice cache -> ``SliceDataset`` -> ``collate_slices``), ``SamFinetuneModule`` with its AdamW and
warmup-cosine schedule, and a Lightning ``Trainer``; same data, same seed, same process. The
uncached run serves images (``data.cache_embeddings=false``), so every step runs the encoder;
the cached run fills the embedding cache once in ``setup`` (timed apart) and then trains on it.
The limit is the same epoch's batches, loaded beforehand, through ``training_step`` + backward +
AdamW with no loader and no Lightning (best of ``--epochs``): a cached epoch cannot beat it.
Both runs use the default ``loss.resolution`` (``original``); the cached epoch is also timed with
each other resolution (``input``, ``low``), the cost of comparing at full resolution.

    python bench/train_throughput.py --model vit_b --images 4

Last line: ``speedup_cached_vs_uncached=<uncached epoch s / cached epoch s>``.
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP. On a shared machine spinning worker threads made the decoder's
# small ops 3-5x slower whenever another process held a core; sleeping ones cost ~nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import logging
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L

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
    timed,
    write_ct_task,
)
from hydra.utils import instantiate

from sam_ft.training.losses import RESOLUTIONS


class EpochTimer(L.Callback):
    """Wall time of every training epoch (the loader, steps and optimizer, not setup)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._t0)


def _module(cfg, model, finetune, **kwargs):
    """The ``SamFinetuneModule`` as ``train.py`` builds it."""
    from sam_ft.train import build_loss, train_multimask
    from sam_ft.training.module import SamFinetuneModule

    return SamFinetuneModule(
        model=model,
        finetune=finetune,
        loss=build_loss(cfg),
        optimizer=instantiate(cfg.optimizer),
        multimask_output=train_multimask(cfg, model),
        mask_selection=str(cfg.eval.mask_selection),
        max_nonfinite_steps=cfg.train.max_nonfinite_steps,
        **kwargs,
    )


def _fit(cfg, model, finetune, datamodule, epochs: int, run_dir: Path) -> list[float]:
    """Train ``epochs`` epochs as ``train.py`` does (no validation, no checkpoints)."""
    module = _module(cfg, model, finetune, scheduler=instantiate(cfg.scheduler), overlays=0)
    timer = EpochTimer()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        precision="32-true",
        max_epochs=epochs,
        gradient_clip_val=cfg.trainer.gradient_clip_val,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=False,
        default_root_dir=run_dir,
        callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    return timer.times


def _pure_epoch_times(cfg, model, finetune, datamodule, repeats: int) -> list[float]:
    """The epoch's own batches, loaded beforehand, through ``training_step`` + backward + AdamW:
    what a cached epoch would cost with free data loading and no Lightning (the limit)."""
    module = _module(cfg, model, finetune, overlays=0)
    module.train()
    optimizer = instantiate(cfg.optimizer)(finetune.param_groups(model, cfg.optimizer.lr))
    batches = list(datamodule.train_dataloader())

    def epoch() -> None:
        for batch in batches:
            module.training_step(batch, 0).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log() outside a Trainer warns; nothing is logged
        return repeat_time(epoch, repeats)


def main(argv: list[str] | None = None) -> float:
    p = slice_bench_parser(__doc__, 4, "training slices (one epoch)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--epochs", type=int, default=3, help="cached epochs (median reported)")
    args, threads = parse_slice_bench(p, argv, epochs=2)
    L.seed_everything(0, verbose=False)
    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)

    tmp = Path(tempfile.mkdtemp(prefix="bench_train_"))
    splits = write_ct_task(tmp / "task", args.images, args.size)
    extra = [f"data.batch_size={args.batch_size}", "finetune=decoder"]
    cfg = compose(args.model, tmp / "task", splits, tmp / "cache", extra)
    model = instantiate(cfg.model)
    finetune = instantiate(cfg.finetune)
    finetune.apply(model)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    t: dict[str, float] = {}

    # Uncached: images in every batch, the frozen encoder runs in every training step.
    cfg_images = compose(
        args.model, tmp / "task", splits, tmp / "cache", [*extra, "data.cache_embeddings=false"]
    )
    dm_images = make_datamodule(cfg_images, model, tmp / "run_images")
    with timed(t, "setup_images"):
        dm_images.setup("fit")
    uncached = _fit(cfg, model, finetune, dm_images, 1, tmp / "run_images")

    # Cached: same data and initial weights; setup fills the embedding cache (timed apart).
    from sam_ft.train import _frozen_encoder

    model.load_state_dict(initial)
    dm_cached = make_datamodule(cfg, model, tmp / "run_cached")
    dm_cached.use_embedding_cache(*_frozen_encoder(model))
    with timed(t, "setup_cached"):
        dm_cached.setup("fit")
        # A split's embeddings are encoded when its dataset is first built (the loader).
        for split in ("train", "val"):
            dm_cached.dataset(split)
    cached = _fit(cfg, model, finetune, dm_cached, args.epochs, tmp / "run_cached")
    pure = _pure_epoch_times(cfg, model, finetune, dm_cached, repeats=args.epochs)

    # The cost of loss.resolution: cached epochs with each other choice (caches are warm).
    by_resolution = {cfg.loss.resolution: median(cached)}
    for res in [r for r in RESOLUTIONS if r != cfg.loss.resolution]:
        cfg_res = compose(
            args.model, tmp / "task", splits, tmp / "cache", [*extra, f"loss.resolution={res}"]
        )
        model.load_state_dict(initial)
        dm_res = make_datamodule(cfg_res, model, tmp / f"run_{res}")
        dm_res.use_embedding_cache(*_frozen_encoder(model))
        dm_res.setup("fit")
        times = _fit(cfg_res, model, finetune, dm_res, args.epochs, tmp / f"run_{res}")
        by_resolution[res] = median(times)

    n, steps = args.images, -(-args.images // args.batch_size)
    t_uncached, t_cached = uncached[0], median(cached)
    t_limit = min(pure)  # the least disturbed run: a limit
    speedup = t_uncached / t_cached
    limit = t_uncached / t_limit
    print(f"machine: {machine()} (threads={threads})")
    print(
        f"data: {n} synthetic CT slices {args.size}x{args.size} (NIfTI, demo generator), "
        f"model {args.model} (random weights), finetune=decoder, batch {args.batch_size}, "
        f"box prompts, {steps} steps/epoch, loss.resolution={cfg.loss.resolution}"
    )
    rows = [
        ["uncached (encoder every step)", t_uncached, t_uncached / n, 1.0],
        [f"cached, warm (median of {len(cached)})", t_cached, t_cached / n, speedup],
        ["pure decoder steps, same batches (limit)", t_limit, t_limit / n, limit],
    ]
    print_table(
        "decoder-only finetuning, one epoch",
        ["run", "epoch s", "s / image", "speedup vs uncached"],
        rows,
    )
    print_table(
        "one-off costs (not in the epoch times)",
        ["what", "s"],
        [
            ["setup, images (NIfTI -> slice cache, training targets)", t["setup_images"]],
            ["setup, cached (slice cache hit + encoding every slice once)", t["setup_cached"]],
        ],
    )
    low = by_resolution["low"]
    print_table(
        f"loss.resolution, cached epoch (median of {args.epochs}; default {cfg.loss.resolution})",
        ["loss.resolution", "epoch s", "s / image", "x low", "speedup vs uncached"],
        [
            [res, by_resolution[res], by_resolution[res] / n, by_resolution[res] / low,
             t_uncached / by_resolution[res]]
            for res in RESOLUTIONS
        ],
    )  # fmt: skip
    print(f"cached epochs (s): {', '.join(f'{x:.3g}' for x in cached)}")
    print(f"pure-step epochs (s): {', '.join(f'{x:.3g}' for x in pure)}")
    print(f"cached epoch reaches {t_limit / t_cached:.0%} of the pure-step limit")
    final_line("speedup_cached_vs_uncached", speedup)
    return speedup


if __name__ == "__main__":
    main()
