"""``python evaluate.py``: the study's protocol for one model; also the post-training comparison."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sam_ft.config import parse_config
from sam_ft.data.datamodule import SamDataModule, load_case_entry
from sam_ft.errors import ConfigError
from sam_ft.evaluation.engine import LazyCase, evaluate_and_report
from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.training import BoxPrompts

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def split_cases(datamodule: SamDataModule, split: str) -> list[LazyCase]:
    """The cases of ``eval.split`` (``test`` (default), ``val`` or ``all``) as :class:`LazyCase`:
    only these splits are preprocessed, and each case is read from the slice cache when it is
    scored and dropped after, so memory holds one case however many there are."""
    if split not in (*SPLITS, "all"):
        raise ConfigError(f"eval.split={split!r} must be one of test, val, all")
    entries = []
    for s in SPLITS if split == "all" else (split,):
        datamodule.prepare_split(s)
        entries += datamodule.case_entries(s)
    return [LazyCase(e.image_id, partial(load_case_entry, e), e.image) for e in entries]


def compare_models(
    models: Mapping[str, TrainableSam],
    datamodule: SamDataModule,
    cfg: DictConfig,
    out_dir: Path,
    loggers: Sequence = (),
) -> dict[str, float]:
    """Evaluate every model on the same cases and prompts; write and log one report.

    Returns mean Dice per model for the box prompt without jitter (``eval/<model>/box_dice``).
    """
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for model in models.values():
        model.to(device)
    cases = split_cases(datamodule, cfg.eval.split)
    if not cases:
        raise ConfigError(f"eval.split={cfg.eval.split}: the split has no usable case")
    result = evaluate_and_report(
        dict(models),
        cases,
        task_name=cfg.task.name,
        cfg=OmegaConf.to_container(cfg.eval, resolve=True),
        out_dir=out_dir,
        seed=cfg.seed,
    )
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
    # Every option checked before anything is built, hashed or downloaded.
    parse_config(cfg, "evaluate")
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
    metrics = compare_models({label: model}, datamodule, cfg, run_dir, loggers)
    summary_md = run_dir / "summary.md"
    if summary_md.is_file():
        from rich.console import Console

        Console().print(summary_md.read_text(), markup=False)  # the report has [links](...)
    log.info("evaluation written to %s", run_dir)
    return metrics
