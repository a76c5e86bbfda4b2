"""The training task: ``python train.py`` / ``sam-ft-train`` finetune, export, then compare the
finetuned model with the zero-shot one (``train``; ``main`` is its Hydra entry point)."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from sam_ft.atomic import STALE_TEMP_S, sweep_temp_files
from sam_ft.config import RunConfig, parse_config, run_facts
from sam_ft.data.datamodule import SamDataModule
from sam_ft.defaults import config_dir
from sam_ft.errors import ConfigError, exit_on_own_error
from sam_ft.evaluation.protocol.compare import compare_models
from sam_ft.evaluation.protocol.distributed import TrainerRanks
from sam_ft.inference.card import (
    evaluation_summary,
    predicted_headline,
    trained_facts,
    update_card_evaluation,
    write_model_card,
)
from sam_ft.logging_results import box_dice, log_evaluation, log_exported_model, sweep_objective
from sam_ft.model.builders import weights_loaded_later
from sam_ft.model.checkpoint import (
    export_official,
    load_weights,
    read_state_dict,
    weights_digest,
)
from sam_ft.training.callbacks import preempted_error, requeue_if_submitit
from sam_ft.training.checkpoints import AtomicCheckpointIO, resolve_ckpt_path
from sam_ft.training.module import SamFinetuneModule
from sam_ft.training.options import resolve_precision
from sam_ft.training.wandb import scrub

log = logging.getLogger(__name__)


IOU_HEAD_SELECTIONS = ("predicted_iou", "auto")
"""``eval.mask_selection`` modes that pick masks with the IoU head, which must then be trained."""


def build_loss(cfg: DictConfig) -> torch.nn.Module:
    """``loss`` config -> the loss; ``iou_weight: null`` becomes 1.0 when
    ``eval.mask_selection`` reads the IoU head (``IOU_HEAD_SELECTIONS``), else 0.0."""
    if cfg.loss.iou_weight is not None:
        return instantiate(cfg.loss)
    selection = str(cfg.eval.mask_selection)
    return instantiate(cfg.loss, iou_weight=1.0 if selection in IOU_HEAD_SELECTIONS else 0.0)


def train_multimask(cfg: DictConfig, model) -> bool | str:
    """``train.multimask``: null = 3 masks (loss on the best) when ``eval.mask_selection`` is
    ``predicted_iou`` (the IoU head then learns to rank the masks it picks among), ``"auto"``
    (each prompt decoded as ``eval.mask_selection=auto`` decodes it: 3 masks for a lone point,
    1 otherwise) when it is ``auto``, else one mask as the paper's code trains. A model without
    multimask output (MedSAM) and ``loss=cosmos_official`` (the official single-mask loss) train
    one mask.

    Raises:
        ConfigError: ``train.multimask=true`` for a model with a single mask output or with
            ``loss=cosmos_official``.
    """
    value = cfg.get("train", {}).get("multimask")
    model_multimask = bool(model.multimask_output)
    single_loss = cfg.get("loss", {}).get("kind") == "cosmos_official"
    if value is None:
        if not model_multimask or single_loss:
            return False
        selection = str(cfg.eval.get("mask_selection"))
        return {"predicted_iou": True, "auto": "auto"}.get(selection, False)
    if bool(value) and not model_multimask:
        raise ConfigError(
            f"train.multimask=true, but model {cfg.model.name} has a single mask output "
            "(model.multimask_output=false); drop train.multimask or set it to false"
        )
    if bool(value) and single_loss:
        raise ConfigError(
            "train.multimask=true, but loss=cosmos_official is the official single-mask loss; "
            "drop train.multimask or set it to false"
        )
    return bool(value)


def build_trainer(cfg: DictConfig, run_dir: Path) -> L.Trainer:
    """The configured Trainer; its checkpoints are written by :class:`AtomicCheckpointIO`."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values() if c]
    if not loggers:
        # logger=none: the learning-rate monitor has nothing to write to (Lightning refuses it).
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    plain = scrub(OmegaConf.to_container(cfg, resolve=True))
    for logger in loggers:
        logger.log_hyperparams(plain)
    return instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision),
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[AtomicCheckpointIO()],
    )


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, export ``sam_finetuned.pth``, evaluate zero-shot vs finetuned; return final metrics."""
    # Every option checked before anything is built, hashed or downloaded.
    run = parse_config(cfg, "train")
    run_dir = Path(cfg.paths.output_dir)
    _sweep_run_dir(run_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), run_dir)
    L.seed_everything(cfg.seed, workers=True)

    model = instantiate(cfg.model)
    # The zero-shot baseline is this model before finetuning, bit for bit (random weights
    # included): built again at the end the same way, and checked against this digest (64
    # characters held through the run, not a copy of the weights).
    initial = weights_digest(model.sam) if cfg.train.evaluate else None
    finetune = instantiate(cfg.finetune)
    finetune.apply(model)
    prompt = instantiate(cfg.prompt)
    loss = build_loss(cfg)
    datamodule = SamDataModule(
        task=run.task,
        data=run.data,
        transform=model.transform,
        train_prompt=prompt,
        seed=cfg.seed,
        run_dir=run_dir,
        data_dir=cfg.paths.data_dir,
        target_resolution=loss.resolution,
    )
    module = SamFinetuneModule(
        model=model,
        finetune=finetune,
        loss=loss,
        optimizer=instantiate(cfg.optimizer),
        scheduler=instantiate(cfg.scheduler) if cfg.get("scheduler") else None,
        multimask_output=train_multimask(cfg, model),
        mask_selection=str(cfg.eval.mask_selection),
        iterative_rounds=getattr(prompt, "rounds", 0),
        max_nonfinite_steps=cfg.train.max_nonfinite_steps,
        overlays=cfg.train.overlays,
    )
    # A shared cache: only temp files no live writer could still be writing.
    sweep_temp_files(datamodule.cache_dir, older_than_s=STALE_TEMP_S)
    trainer = build_trainer(cfg, run_dir)
    if model.encoder_frozen:
        datamodule.use_embedding_cache(*_frozen_encoder(model))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SIGTERMException:
        requeue_if_submitit(trainer)  # exits there when submitit sent the signal
        raise preempted_error(trainer) from None
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    # Under DDP every rank scores its share of the final evaluation (rank 0 merges).
    ranks = TrainerRanks(trainer) if trainer.world_size > 1 and cfg.train.evaluate else None
    if not trainer.is_global_zero and ranks is None:
        return metrics

    # One model copy per rank from here on: the trained one's weights and optimizer state are
    # released (the best checkpoint holds them) before the evaluated models are built.
    _release_training_memory(trainer, model)
    finetuned, exported, card = _export(cfg, trainer, module, datamodule, run_dir)
    if cfg.train.evaluate:
        metrics.update(
            _compare_with_zero_shot(cfg, run, initial, finetuned, datamodule, trainer, ranks, card)
        )
    if not trainer.is_global_zero:
        return metrics
    log_exported_model(trainer.loggers, exported, cfg.run_name)
    _print_summary(run_dir, exported)
    return metrics


def _release_training_memory(trainer: L.Trainer, model: torch.nn.Module) -> None:
    """Free the trained model's tensors (its storage moved to the meta device: every reference
    to it stays valid, none holds memory) and the optimizer's state (AdamW: two more copies of
    the trained weights)."""
    for optimizer in trainer.optimizers:
        optimizer.state.clear()
    model.to_empty(device="meta")


def _sweep_run_dir(run_dir: Path) -> None:
    """Temp files of a process killed mid-write (this run dir's earlier attempt), never read.
    Rank 0 only: it starts before the others, which could sweep a file it is writing. The run's
    own folders only: a run dir may hold other runs' folders."""
    if rank_zero_only.rank == 0:
        sweep_temp_files(run_dir, recursive=False)
        for folder in ("checkpoints", "eval"):
            sweep_temp_files(run_dir / folder)


def _export(cfg, trainer, module, datamodule, run_dir: Path):
    """The best checkpoint as a model, exported with its card by rank 0: (finetuned model,
    ``sam_finetuned.pth``, its card or None on other ranks)."""
    best = _best_checkpoint(trainer)
    with weights_loaded_later():
        finetuned = instantiate(cfg.model, checkpoint=None)
    load_weights(finetuned.sam, read_state_dict(best), str(best), cfg.model.name)
    exported, card = run_dir / "sam_finetuned.pth", None
    if trainer.is_global_zero:
        exported = export_official(finetuned, exported)
        card = write_model_card(
            # "auto" decodes most prompts (boxes, several points) with the single mask: not "3 masks
            # per prompt", so predict keeps its single-mask default for such a checkpoint.
            exported,
            OmegaConf.to_container(cfg, resolve=True),
            multimask_output=module.multimask_output is True,
            facts=trained_facts(datamodule),
        )
        log.info("exported %s (from %s), card %s", exported, best, card)
    return finetuned, exported, card


def _compare_with_zero_shot(
    cfg: DictConfig,
    run: RunConfig,
    initial: str,
    finetuned,
    datamodule: SamDataModule,
    trainer: L.Trainer,
    ranks: TrainerRanks | None,
    card: Path | None,
) -> dict[str, float]:
    """Evaluate the zero-shot model (the initial weights, whose digest is ``initial``) and the
    finetuned one into ``<run dir>/eval``; the results go into the model ``card`` too (rank 0
    only has one)."""
    run_dir = Path(cfg.paths.output_dir)
    zero_shot = _initial_model(cfg, initial)
    result = compare_models(
        {"zero_shot": zero_shot, "finetuned": finetuned},
        datamodule,
        run.eval,
        run_facts(run, cfg.get("ckpt_path")),
        run_dir / "eval",
        ranks=ranks,
    )
    if result is None:
        return {}
    scalars = log_evaluation(run_dir / "eval", result.report, trainer.loggers, result.overlays)
    summary = {**box_dice(result.report, result.models, result.task), **scalars}
    if card is not None:
        summary_csv = run_dir / "eval" / "summary.csv"
        headline = predicted_headline(run_dir / "eval", card, str(cfg.eval.mask_selection))
        update_card_evaluation(card, evaluation_summary(summary, summary_csv), headline)
    return summary


def _initial_model(cfg: DictConfig, digest: str):
    """The model as ``train`` built it before finetuning: built again from the same config and
    seed (the checkpoint file again; random weights drawn again), and checked bit for bit.

    Raises:
        ConfigError: the weights differ from the run's start (the checkpoint file was replaced
            during the run).
    """
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    with weights_loaded_later():  # any random-weights warning was given at the start
        model = instantiate(cfg.model)
    if weights_digest(model.sam) != digest:
        raise ConfigError(
            f"model.checkpoint={cfg.model.checkpoint}: the initial weights changed during the run "
            "(the file was replaced?); the zero-shot baseline would not be the model finetuned. "
            "Evaluate the exported sam_finetuned.pth and the zero-shot model with evaluate.py"
        )
    return model


def _frozen_encoder(model):
    """(encode, fingerprint, device) for filling the embedding cache with the frozen encoder.

    ``model.encode`` runs in bf16 on GPUs that support it; such embeddings get their own cache
    key, so they never mix with full-precision ones.
    """
    from sam_ft.data.embedding_cache import encoder_fingerprint
    from sam_ft.model.backend import map_embedding

    device = "cuda" if torch.cuda.is_available() else "cpu"
    fingerprint = encoder_fingerprint(model.encoder_state(), model.transform)
    if model.encodes_in_bf16(device):
        fingerprint += "-bf16"

    @torch.no_grad()
    def encode(images: torch.Tensor):
        model.to(device)
        return map_embedding(lambda t: t.float(), model.encode(images.to(device)))

    return encode, fingerprint, device


def _best_checkpoint(trainer: L.Trainer) -> Path:
    cb = trainer.checkpoint_callback
    for candidate in (getattr(cb, "best_model_path", ""), getattr(cb, "last_model_path", "")):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    raise ConfigError("training produced no checkpoint (callbacks.model_checkpoint disabled?)")


def _print_summary(run_dir: Path, exported: Path) -> None:
    from sam_ft.console import in_multirun, print_evaluation

    if not in_multirun():
        print(f"run dir      {run_dir}")
        print(f"checkpoints  {run_dir / 'checkpoints'}")
        print(f"weights      {exported}  (model card: {exported.with_suffix('.json').name})")
    print_evaluation(run_dir / "eval", run_dir.name)


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    """``python train.py`` / ``sam-ft-train``."""
    metrics = exit_on_own_error(train)(cfg)
    # Hydra sweepers optimise the returned value: the finetuned model's evaluated box Dice.
    return sweep_objective(metrics)
