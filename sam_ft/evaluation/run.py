"""``python evaluate.py``: the study's protocol for one model; also the post-training comparison."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sam_ft.data.datamodule import SamDataModule
from sam_ft.errors import ConfigError
from sam_ft.evaluation.distributed import Ranks, evaluate_cases, slice_counts, start_ranks
from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.training import BoxPrompts

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_cases(datamodule: SamDataModule, split: str) -> list:
    """Loaded cases of ``eval.split``: ``test`` (default), ``val`` or ``all``."""
    if split == "all":
        return [c for s in SPLITS for c in datamodule.case_data(s)]
    if split not in SPLITS:
        raise ConfigError(f"eval.split={split!r} must be one of test, val, all")
    return datamodule.case_data(split)


def compare_models(
    models: Mapping[str, TrainableSam],
    datamodule: SamDataModule,
    cfg: DictConfig,
    out_dir: Path,
    loggers: Sequence = (),
    ranks: Ranks | None = None,
) -> dict[str, float]:
    """Evaluate every model on the same cases and prompts; write and log one report.

    With ``ranks`` (a distributed evaluation) or ``eval.shard``, this process scores its share
    (``sam_ft.evaluation.distributed``). Returns mean Dice per model for the box prompt without
    jitter (``eval/<model>/box_dice``); empty on ranks other than 0.
    """
    device = ranks.device if ranks else "cuda" if torch.cuda.is_available() else "cpu"
    for model in models.values():
        model.to(device)

    def load_cases():
        datamodule.setup("test")
        return split_cases(datamodule, cfg.eval.split)

    # Rank 0 fills the slice cache first; the other ranks then read it.
    cases = ranks.rank_zero_first(load_cases) if ranks else load_cases()
    if not cases:
        raise ConfigError(f"eval.split={cfg.eval.split}: the split has no usable case")
    slices = slice_counts(cases, datamodule)
    result = evaluate_cases(models, cases, cfg=cfg, out_dir=out_dir, slices=slices, ranks=ranks)
    if result is None:
        return {}
    _log_report(out_dir, loggers)
    rows = result.per_object
    box = rows[(rows["prompt"] == "box") & (rows["jitter"] == "none")]
    return {f"eval/{m}/box_dice": float(g["dice"].mean()) for m, g in box.groupby("model")}


def _log_report(out_dir: Path, loggers: Sequence) -> None:
    """Summary table and plots to W&B (a table + images) and TensorBoard (text)."""
    import pandas as pd

    summary = out_dir / "summary.csv"
    if not summary.is_file():
        return
    table = pd.read_csv(summary)
    plots = sorted(str(p) for p in (out_dir / "plots").glob("*.png"))
    for logger in loggers:
        if hasattr(logger, "log_table"):
            logger.log_table(key="eval/summary", dataframe=table)
            for plot in plots:
                logger.log_image(key=f"eval/{Path(plot).stem}", images=[plot])
        elif hasattr(getattr(logger, "experiment", None), "add_text"):
            logger.experiment.add_text("eval/summary", (out_dir / "summary.md").read_text())


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """One model (zero-shot from ``model.checkpoint``, or ``ckpt_path``) on ``eval.split``."""
    # Other ranks of a distributed evaluation (trainer=ddp ...) start here, as this command.
    ranks = start_ranks(cfg.get("trainer"))
    run_dir = Path(cfg.paths.output_dir)
    ckpt = cfg.get("ckpt_path")
    # Weights a checkpoint does not set (all of them for model.checkpoint=null) are random: seed
    # them, or a resumed evaluation would score its remaining cases with another model.
    L.seed_everything(cfg.seed, verbose=False)
    model = instantiate(cfg.model, checkpoint=ckpt) if ckpt else instantiate(cfg.model)
    label = cfg.get("model_label") or ("finetuned" if ckpt else "zero_shot")
    datamodule = SamDataModule(
        task=cfg.task,
        data=cfg.data,
        transform=model.transform,
        train_prompt=BoxPrompts(),
        seed=cfg.seed,
        run_dir=run_dir,
        data_dir=cfg.paths.data_dir,
    )
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    metrics = compare_models({label: model}, datamodule, cfg, run_dir, loggers, ranks=ranks)
    summary_md = run_dir / "summary.md"
    if summary_md.is_file() and (ranks is None or ranks.rank == 0):
        from rich.console import Console

        Console().print(summary_md.read_text(), markup=False)  # the report has [links](...)
    log.info("evaluation written to %s", run_dir)
    return metrics
