"""The evaluation task: ``python evaluate.py`` / ``sam-ft-evaluate`` score one model with the
study's protocol (:func:`evaluate`; ``main`` is its Hydra entry point); :func:`compare_models`
is also the comparison at the end of ``train.py``."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from sam_ft.atomic import STALE_TEMP_S, atomic_write_text, sweep_temp_files
from sam_ft.config import parse_config
from sam_ft.data.datamodule import SamDataModule, load_case_entry
from sam_ft.data.loading import load_case
from sam_ft.defaults import config_dir
from sam_ft.errors import ConfigError, DataError, exit_on_own_error
from sam_ft.evaluation.protocol.cases import LazyCase
from sam_ft.evaluation.protocol.distributed import Ranks, evaluate_cases, slice_counts, start_ranks
from sam_ft.evaluation.protocol.merge import Shard, balanced_shares, parse_shard
from sam_ft.inference.card import apply_card
from sam_ft.logging_results import box_dice, eval_loggers, log_evaluation
from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.train_sampling import BoxPrompts

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


def eval_splits(split: str) -> tuple[str, ...]:
    """The data splits of ``eval.split`` (``test`` (default), ``val`` or ``all``)."""
    if split not in (*SPLITS, "all"):
        raise ConfigError(f"eval.split={split!r} must be one of test, val, all")
    return SPLITS if split == "all" else (split,)


def split_cases(datamodule: SamDataModule, split: str, mode: str = "slices") -> list[LazyCase]:
    """The cases of ``eval.split`` as :class:`LazyCase`: only these splits are preprocessed,
    and each case is read from the slice cache when it is scored and dropped after, so memory
    holds one case however many there are. ``eval.mode=propagate`` reads each case from its
    files instead, keeping every slice's image (the cache holds only slices with objects)."""
    splits = eval_splits(split)
    datamodule.prepare_splits(splits)
    entries = [e for s in splits for e in datamodule.case_entries(s)]
    if mode == "propagate":
        from sam_ft.data.loading import load_case

        files = [f for s in splits for f in datamodule.case_files(s)]
        task, data = datamodule.task, datamodule.data
        return [
            LazyCase(f.image_id, partial(load_case, f, task, data, keep_images=True), f.image)
            for f in files
        ]
    return [LazyCase(e.image_id, partial(load_case_entry, e), e.image) for e in entries]


def share_cases(
    datamodule: SamDataModule, cfg: DictConfig, ranks: Ranks | None
) -> tuple[list[LazyCase], list[int]]:
    """This process's share of ``eval.split`` (``eval.shard=K/N``, or rank K of N of
    ``evaluate.py``'s own ranks), read and verified alone: every case of the split becomes a
    :class:`LazyCase` weighted by its source files' bytes (known from one ``stat``, so every
    share computes the same shares as ``evaluation.protocol.distributed`` will), and only the cases
    of this share are preprocessed into the slice cache; the others are never read here.

    A bad case of the share stops every rank (``data.on_error=raise``: the ranks exchange their
    errors first, so none waits for another at a barrier) or, with ``skip``, fails when its turn
    comes and the engine records it in its share's ``skipped.csv`` (merged with the others).
    """
    shard = parse_shard(cfg.eval.get("shard")) or Shard(ranks.rank, ranks.world)
    tagged = [(s, c) for s in eval_splits(cfg.eval.split) for c in datamodule.split_files(s)]
    keys = [c.image_id for _, c in tagged]
    weights = [_source_bytes(c) for _, c in tagged]
    share = balanced_shares(keys, weights, shard.count)[shard.index]
    entries, errors = datamodule.prepare_share([tagged[i] for i in share])
    if ranks is not None and torch.distributed.is_initialized():
        every: list = [None] * ranks.world
        torch.distributed.all_gather_object(every, errors)
        errors = {k: v for part in every for k, v in part.items()}
    bad = [errors[k] for k in keys if k in errors]
    if bad and datamodule.data["on_error"] == "raise":
        more = f" (and {len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise DataError(bad[0].path, f"{bad[0].reason}{more}; nothing was evaluated")
    cases = []
    propagate = str(cfg.eval.get("mode", "slices")) == "propagate"
    for _, c in tagged:
        if c.image_id in entries and propagate:  # every slice's image: from the files
            task, data = datamodule.task, datamodule.data
            load = partial(load_case, c, task, data, keep_images=True)
        elif c.image_id in entries:
            load = partial(load_case_entry, entries[c.image_id])
        else:  # a bad case of this share raises its error; another share's is never loaded
            load = partial(_fail, errors.get(c.image_id) or _NotMine(c.image_id))
        cases.append(LazyCase(c.image_id, load, str(c.image)))
    return cases, weights


def _source_bytes(case) -> int:
    """Bytes of a case's source files (a DICOM folder's files summed): its share weight."""
    total = 0
    for path in (case.image, case.label, *case.label_parts):
        if path is None:
            continue
        p = Path(path)
        files = [f for f in p.rglob("*") if f.is_file()] if p.is_dir() else [p]
        total += sum(f.stat().st_size for f in files if f.exists())
    return max(total, 1)


class _NotMine(RuntimeError):
    def __init__(self, image_id: str) -> None:
        super().__init__(f"case {image_id} belongs to another share; it is not read here")


def _fail(error: Exception):
    raise error


def compare_models(
    models: Mapping[str, TrainableSam],
    datamodule: SamDataModule,
    cfg: DictConfig,
    out_dir: Path,
    loggers: Sequence = (),
    ranks: Ranks | None = None,
    shared: tuple[list[LazyCase], list[int]] | None = None,
) -> dict[str, float]:
    """Evaluate every model on the same cases and prompts; write and log one report.

    With ``ranks`` (a distributed evaluation) or ``eval.shard``, this process scores its share
    (``sam_ft.evaluation.protocol.distributed``; ``shared``: its :func:`share_cases`, when prepared
    already). Returns mean Dice per model for the box prompt without
    jitter (``eval/<model>/box_dice``) and the scalars logged to the run
    (``sam_ft.logging_results.evaluation_scalars``); empty on ranks other than 0.
    """
    device = ranks.device if ranks else "cuda" if torch.cuda.is_available() else "cpu"
    mode = str(cfg.eval.get("mode", "slices"))
    if mode == "propagate":
        # Its own rows beside the slices mode's in one folder (sam-ft-report, comparisons).
        models = {f"{name}_propagate": model for name, model in models.items()}
    for model in models.values():
        model.to(device)
    own_ranks = ranks is not None and getattr(datamodule, "trainer", None) is None
    if shared is not None:
        cases, slices = shared
    elif own_ranks or (ranks is None and parse_shard(cfg.eval.get("shard")) is not None):
        # evaluate.py's ranks, or a shard: each process reads and verifies only its share (a
        # Trainer's datamodule, in train.py, has indexed every split on every rank already).
        cases, slices = share_cases(datamodule, cfg, ranks)
    else:
        cases = split_cases(datamodule, cfg.eval.split, mode)
        slices = slice_counts(cases, datamodule)
    if not cases:
        raise ConfigError(f"eval.split={cfg.eval.split}: the split has no usable case")
    result = evaluate_cases(
        models, cases, cfg=cfg, out_dir=out_dir, slices=slices, ranks=ranks, datamodule=datamodule
    )
    if result is None:
        return {}
    _write_run_info(out_dir, models, cfg)
    _warn_skipped(out_dir)
    scalars = log_evaluation(out_dir, result.report, loggers, result.overlays)
    return {**box_dice(result.report, result.models, result.task), **scalars}


RUN_INFO = "run_info.json"


def _write_run_info(out_dir: Path, models: Mapping[str, TrainableSam], cfg: DictConfig) -> None:
    """``run_info.json``: how each model's numbers were computed (precision, mask outputs,
    preprocessing, mask selection) and its image encoder's median time per image where this
    process encoded images (``sam_ft.evaluation.protocol.timing``), merged with the entries of
    models evaluated earlier into the same folder (the report covers them too)."""
    import json

    from sam_ft.evaluation.protocol.timing import device_label, encoder_seconds

    path = Path(out_dir) / RUN_INFO
    info = json.loads(path.read_text()) if path.is_file() else {}
    entries = info.setdefault("models", {})
    for name, model in models.items():
        timed = {}
        if (seconds := encoder_seconds(model)) is not None:  # none on a resumed, finished run
            device = next(model.parameters()).device
            timed = {"encoder_seconds_per_image": seconds[0], "encoder_images_timed": seconds[1],
                     "encoder_device": device_label(device)}  # fmt: skip
        entries[name] = {
            **{k: v for k, v in entries.get(name, {}).items() if k.startswith("encoder_")},
            "precision": model.precision(),
            "multimask_output": bool(getattr(model, "multimask_output", True)),
            "preprocess": model.transform.mode,
            "mask_selection": str(cfg.eval.mask_selection),
            **timed,
        }
        log.info("model %s: precision %s", name, entries[name]["precision"])
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True) + "\n")


def _warn_skipped(out_dir: Path) -> None:
    """A warning naming the cases skipped for bad data (their number reaches every logger
    through :func:`log_evaluation`, as ``eval/skipped``)."""
    from sam_ft.evaluation.reports.summary import read_skipped

    skipped = read_skipped(out_dir).drop_duplicates(subset=["case"])
    if len(skipped):
        log.warning(
            "%d case(s) skipped for bad data (%s): %s",
            len(skipped),
            out_dir / "skipped.csv",
            ", ".join(skipped["case"].astype(str)),
        )


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """One model (zero-shot from ``model.checkpoint``, or ``ckpt_path``) on ``eval.split``."""
    # Every option checked before anything is built, hashed or downloaded.
    parse_config(cfg, "evaluate")
    # Other ranks of a distributed evaluation (trainer=ddp ...) start here, as this command.
    ranks = start_ranks(cfg.get("trainer"))
    run_dir = Path(cfg.paths.output_dir)
    ckpt = cfg.get("ckpt_path")
    # Weights a checkpoint does not set (all of them for model.checkpoint=null) are random: seed
    # them, or a resumed evaluation would score its remaining cases with another model.
    L.seed_everything(cfg.seed, verbose=False)
    apply_card(cfg, ckpt)  # a model card beside the weights fixes how they are fed
    datamodule = SamDataModule(
        task=cfg.task,
        data=cfg.data,
        transform=None,  # the model's, set below
        train_prompt=BoxPrompts(),
        seed=cfg.seed,
        run_dir=run_dir,
        data_dir=cfg.paths.data_dir,
    )
    sweep_temp_files(datamodule.cache_dir, older_than_s=STALE_TEMP_S)
    # Every input file is read (into the slice cache) before any weights are: a bad one is
    # named now (data.on_error=raise), not after a model was loaded and hashed. Ranks and shards
    # read only their own share.
    shared = None
    if ranks is not None or parse_shard(cfg.eval.get("shard")) is not None:
        shared = share_cases(datamodule, cfg, ranks)
    else:
        datamodule.prepare_splits(eval_splits(cfg.eval.split))
    model = instantiate(cfg.model, checkpoint=ckpt) if ckpt else instantiate(cfg.model)
    datamodule.transform = model.transform
    label = cfg.get("model_label") or ("finetuned" if ckpt else "zero_shot")
    loggers = eval_loggers(cfg, label)
    metrics = compare_models(
        {label: model}, datamodule, cfg, run_dir, loggers, ranks=ranks, shared=shared
    )
    if ranks is None or ranks.rank == 0:
        from sam_ft.console import print_evaluation

        print_evaluation(run_dir, run_dir.name)
    log.info("evaluation written to %s", run_dir)
    return metrics


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """``python evaluate.py`` / ``sam-ft-evaluate``."""
    exit_on_own_error(evaluate)(cfg)
