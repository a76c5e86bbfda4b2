"""The evaluation task: ``python evaluate.py`` / ``sam-ft-evaluate`` score one model with the
study's protocol (:func:`evaluate`; ``main`` is its Hydra entry point) through
:func:`sam_ft.evaluation.protocol.compare.compare_models`, as ``train.py`` compares its two."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sam_ft.atomic import STALE_TEMP_S, sweep_temp_files
from sam_ft.config import parse_config, run_facts, with_model
from sam_ft.data.datamodule import SamDataModule
from sam_ft.data.tasks import to_plain
from sam_ft.defaults import config_dir
from sam_ft.errors import exit_on_own_error
from sam_ft.evaluation.protocol.compare import compare_models, share_cases
from sam_ft.evaluation.protocol.distributed import start_ranks
from sam_ft.inference.card import apply_card
from sam_ft.logging_results import box_dice, log_evaluation
from sam_ft.prompts.train_sampling import BoxPrompts

log = logging.getLogger(__name__)


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """One model (zero-shot from ``model.checkpoint``, or ``ckpt_path``) on ``eval.split``."""
    # Every option checked before anything is built, hashed or downloaded.
    run = parse_config(cfg, "evaluate")
    options = run.eval
    # Other ranks of a distributed evaluation (trainer=ddp ...) start here, as this command.
    ranks = start_ranks(_container(cfg.get("trainer")))
    run_dir = Path(cfg.paths.output_dir)
    ckpt = cfg.get("ckpt_path")
    # Weights a checkpoint does not set (all of them for model.checkpoint=null) are random: seed
    # them, or a resumed evaluation would score its remaining cases with another model.
    L.seed_everything(run.seed, verbose=False)
    # A model card beside the weights fixes how they are fed.
    model_cfg = apply_card(_container(cfg.model), to_plain(run.task.intensity), ckpt)
    run = with_model(run, model_cfg)
    datamodule = SamDataModule(
        task=run.task,
        data=run.data,
        transform=None,  # the model's, set below
        train_prompt=BoxPrompts(),
        seed=run.seed,
        run_dir=run_dir,
        data_dir=cfg.paths.data_dir,
    )
    sweep_temp_files(datamodule.cache_dir, older_than_s=STALE_TEMP_S)
    # Every input file is read (into the slice cache) before any weights are: a bad one is
    # named now (data.on_error=raise), not after a model was loaded and hashed. Ranks and shards
    # read only their own share.
    shared = None
    if ranks is not None or options.shard is not None:
        shared = share_cases(datamodule, options, ranks)
    else:
        datamodule.prepare_splits(options.splits)
    model = instantiate(model_cfg, checkpoint=ckpt) if ckpt else instantiate(model_cfg)
    datamodule.transform = model.transform
    label = cfg.get("model_label") or ("finetuned" if ckpt else "zero_shot")
    loggers = eval_loggers(cfg, label)
    facts = run_facts(run, ckpt)
    result = compare_models(
        {label: model}, datamodule, options, facts, run_dir, ranks=ranks, shared=shared
    )
    metrics = {}
    if result is not None:
        scalars = log_evaluation(run_dir, result.report, loggers, result.overlays)
        metrics = {**box_dice(result.report, result.models, result.task), **scalars}
    if ranks is None or ranks.rank == 0:
        from sam_ft.console import print_evaluation

        print_evaluation(run_dir, run_dir.name)
    log.info("evaluation written to %s", run_dir)
    return metrics


def eval_loggers(cfg: DictConfig, label: str) -> list:
    """``evaluate.py``'s loggers: a W&B run named ``<model>_<task>_<label>`` (zero-shot and
    checkpoint evaluations apart), each given the resolved config with secrets scrubbed."""
    from sam_ft.training.wandb import scrub

    loggers = []
    for c in (cfg.get("logger") or {}).values():
        if not c:
            continue
        if "wandb" in str(c.get("_target_", "")) and c.get("name"):
            loggers.append(instantiate(c, name=f"{c.name}_{label}"))
        else:
            loggers.append(instantiate(c))
    if loggers:
        plain = scrub(OmegaConf.to_container(cfg, resolve=True))
        for logger in loggers:
            logger.log_hyperparams(plain)
    return loggers


def _container(node) -> dict | None:
    """A group of the Hydra config as a plain dict (resolved), None when absent."""
    return OmegaConf.to_container(node, resolve=True) if node is not None else None


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """``python evaluate.py`` / ``sam-ft-evaluate``."""
    exit_on_own_error(evaluate)(cfg)
