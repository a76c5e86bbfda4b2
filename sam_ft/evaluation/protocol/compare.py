"""Models compared on one split: the cases of ``eval.split`` (or this process's share of them)
taken from a prepared :class:`~sam_ft.data.datamodule.SamDataModule`, scored by every model
with the same prompts into one folder, and the run's ``run_info.json`` beside the tables. The
evaluate task scores one model with it; the train task, the zero-shot and the finetuned ones."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from functools import partial
from pathlib import Path

import torch

from sam_ft.atomic import atomic_write_text
from sam_ft.data.datamodule import SamDataModule, load_case_entry
from sam_ft.data.loading import load_case
from sam_ft.errors import ConfigError, DataError
from sam_ft.evaluation.protocol.cases import LazyCase
from sam_ft.evaluation.protocol.distributed import Ranks, RunFacts, evaluate_cases, slice_counts
from sam_ft.evaluation.protocol.engine import EvalResult
from sam_ft.evaluation.protocol.merge import Shard, balanced_shares
from sam_ft.evaluation.protocol.options import EvalOptions
from sam_ft.model.backend import SegmentBackend

log = logging.getLogger(__name__)

RUN_INFO = "run_info.json"


def split_cases(datamodule: SamDataModule, options: EvalOptions) -> list[LazyCase]:
    """The cases of ``eval.split`` as :class:`LazyCase`: only these splits are preprocessed,
    and each case is read from the slice cache when it is scored and dropped after, so memory
    holds one case however many there are. ``eval.mode=propagate`` reads each case from its
    files instead, keeping every slice's image (the cache holds only slices with objects)."""
    splits = options.splits
    datamodule.prepare_splits(splits)
    entries = [e for s in splits for e in datamodule.case_entries(s)]
    if options.mode == "propagate":
        files = [f for s in splits for f in datamodule.case_files(s)]
        task, data = datamodule.task, datamodule.data
        return [
            LazyCase(f.image_id, partial(load_case, f, task, data, keep_images=True), f.image)
            for f in files
        ]
    return [LazyCase(e.image_id, partial(load_case_entry, e), e.image) for e in entries]


def share_cases(
    datamodule: SamDataModule, options: EvalOptions, ranks: Ranks | None
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
    shard = options.share or Shard(ranks.rank, ranks.world)
    tagged = [(s, c) for s in options.splits for c in datamodule.split_files(s)]
    keys = [c.image_id for _, c in tagged]
    weights = [_source_bytes(c) for _, c in tagged]
    share = balanced_shares(keys, weights, shard.count)[shard.index]
    entries, errors = datamodule.prepare_share([tagged[i] for i in share])
    if ranks is not None and torch.distributed.is_initialized():
        every: list = [None] * ranks.world
        torch.distributed.all_gather_object(every, errors)
        errors = {k: v for part in every for k, v in part.items()}
    bad = [errors[k] for k in keys if k in errors]
    if bad and options.on_error == "raise":
        more = f" (and {len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
        raise DataError(bad[0].path, f"{bad[0].reason}{more}; nothing was evaluated")
    cases = []
    for _, c in tagged:
        if c.image_id in entries and options.mode == "propagate":  # every slice's image
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
    models: Mapping[str, SegmentBackend],
    datamodule: SamDataModule,
    options: EvalOptions,
    facts: RunFacts,
    out_dir: Path,
    ranks: Ranks | None = None,
    shared: tuple[list[LazyCase], list[int]] | None = None,
) -> EvalResult | None:
    """Evaluate every model on the same cases and prompts into ``out_dir`` (the tables, the
    report, ``run_info.json``).

    With ``ranks`` (a distributed evaluation) or ``eval.shard``, this process scores its share
    (``sam_ft.evaluation.protocol.distributed``; ``shared``: its :func:`share_cases`, when
    prepared already). Returns the engine's result, None on ranks other than 0.
    """
    device = ranks.device if ranks else "cuda" if torch.cuda.is_available() else "cpu"
    if options.mode == "propagate":
        # Its own rows beside the slices mode's in one folder (sam-ft-report, comparisons).
        models = {f"{name}_propagate": model for name, model in models.items()}
    for model in models.values():
        model.to(device)
    own_ranks = ranks is not None and getattr(datamodule, "trainer", None) is None
    if shared is not None:
        cases, slices = shared
    elif own_ranks or (ranks is None and options.shard is not None):
        # evaluate.py's ranks, or a shard: each process reads and verifies only its share (a
        # Trainer's datamodule, in train.py, has indexed every split on every rank already).
        cases, slices = share_cases(datamodule, options, ranks)
    else:
        cases = split_cases(datamodule, options)
        slices = slice_counts(cases, datamodule)
    if not cases:
        raise ConfigError(f"eval.split={options.split}: the split has no usable case")
    result = evaluate_cases(
        models,
        cases,
        options=options,
        facts=facts,
        out_dir=out_dir,
        slices=slices,
        ranks=ranks,
        datamodule=datamodule,
    )
    if result is None:
        return None
    _write_run_info(out_dir, models, options)
    _warn_skipped(out_dir)
    return result


def _write_run_info(
    out_dir: Path, models: Mapping[str, SegmentBackend], options: EvalOptions
) -> None:
    """``run_info.json``: how each model's numbers were computed (precision, mask outputs,
    preprocessing, mask selection) and its image encoder's median time per image where this
    process encoded images (``sam_ft.evaluation.protocol.timing``), merged with the entries of
    models evaluated earlier into the same folder (the report covers them too)."""
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
            "multimask_output": bool(model.multimask_output),
            "preprocess": model.transform.mode,
            "mask_selection": options.mask_selection,
            **timed,
        }
        log.info("model %s: precision %s", name, entries[name]["precision"])
    atomic_write_text(path, json.dumps(info, indent=2, sort_keys=True) + "\n")


def _warn_skipped(out_dir: Path) -> None:
    """A warning naming the cases skipped for bad data (their number reaches every logger
    through ``logging_results.log_evaluation``, as ``eval/skipped``)."""
    from sam_ft.evaluation.reports.summary import read_skipped

    skipped = read_skipped(out_dir).drop_duplicates(subset=["case"])
    if len(skipped):
        log.warning(
            "%d case(s) skipped for bad data (%s): %s",
            len(skipped),
            out_dir / "skipped.csv",
            ", ".join(skipped["case"].astype(str)),
        )
