"""Evaluation over several processes: Lightning Fabric ranks, or ``eval.shard=K/N`` jobs.

``python evaluate.py trainer=ddp trainer.devices=N [trainer.num_nodes=M]
[trainer.accelerator=gpu|cpu]`` starts N x M ranks through Lightning Fabric (the launcher and
environment variables Lightning's Trainer uses; NCCL on GPUs, gloo on CPUs). Each rank scores
its share of the cases (``merge.balanced_shares``: balanced by slice count; ``evaluate.py``'s
ranks and shards by source bytes, so each reads only its own cases: ``compare.share_cases``) into
``<run dir>/.ranks/<rank>-of-<world>/``, an ordinary resumable engine folder, so a killed
distributed evaluation started again with the same world size resumes every rank where it
stopped. After a barrier, rank 0 merges the shares into the run dir: the same ``per_object.csv``,
``per_case.csv``, ``summary.csv``, ``summary.md`` and plots as one process.

``eval.shard=K/N`` scores share K of N in the run dir, without a process group (SLURM arrays,
separate machines); ``sam-ft-report merge DIR... --out DIR`` then writes the full files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sam_ft.data.loading import CaseData
from sam_ft.errors import ConfigError
from sam_ft.evaluation.protocol.cases import Case, LazyCase, case_key_of
from sam_ft.evaluation.protocol.merge import (
    Shard,
    balanced_shares,
    merge_shards_with_overlays,
    write_shard_file,
)
from sam_ft.evaluation.protocol.options import EvalOptions
from sam_ft.evaluation.protocol.scoring_pool import default_workers

log = logging.getLogger(__name__)

RANKS_DIR = ".ranks"
# A rank that finished its share waits at the barrier for the slowest one.
BARRIER_TIMEOUT = timedelta(hours=48)


class Ranks:
    """This process's place in a distributed evaluation (a launched Lightning ``Fabric``)."""

    def __init__(self, fabric) -> None:
        self.fabric = fabric

    @property
    def rank(self) -> int:
        return int(self.fabric.global_rank)

    @property
    def world(self) -> int:
        return int(self.fabric.world_size)

    @property
    def device(self):
        return self.fabric.device

    @property
    def local_world(self) -> int:
        """The ranks on this node (they share its cores)."""
        return max(1, self.world // max(1, int(self.fabric.strategy.num_nodes)))

    def barrier(self, name: str) -> None:
        self.fabric.barrier(name)

    def rank_zero_first(self, fn: Callable[[], Any]) -> Any:
        """``fn`` on rank 0, then (after a barrier) on the others: rank 0 fills shared caches,
        the others read them."""
        if self.rank == 0:
            out = fn()
            self.barrier("rank_zero_first")
            return out
        self.barrier("rank_zero_first")
        return fn()


class TrainerRanks(Ranks):
    """The ranks of a fitted Lightning ``Trainer`` (its process group), for the evaluation at
    the end of ``train.py``."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    @property
    def rank(self) -> int:
        return int(self.trainer.global_rank)

    @property
    def world(self) -> int:
        return int(self.trainer.world_size)

    @property
    def device(self):
        return self.trainer.strategy.root_device

    @property
    def local_world(self) -> int:
        return max(1, self.world // max(1, int(self.trainer.num_nodes)))

    def barrier(self, name: str) -> None:
        self.trainer.strategy.barrier(name)


def start_ranks(trainer_cfg: Mapping | None) -> Ranks | None:
    """Launch the ranks ``trainer=`` asks for (None when it is one process)."""
    if not trainer_cfg:
        return None
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    # The keys the trainer group sets; Lightning's own defaults for the others.
    kwargs = {
        k: trainer_cfg[k]
        for k in ("accelerator", "devices", "num_nodes")
        if trainer_cfg.get(k) is not None
    }
    if kwargs.get("devices") in (1, "1") and kwargs.get("num_nodes") in (None, 1, "1"):
        return None  # one process, without asking Lightning (it may check the accelerator)
    if Fabric(**kwargs, strategy="auto").world_size <= 1:  # devices=auto on one device
        return None
    fabric = Fabric(**kwargs, strategy=DDPStrategy(timeout=BARRIER_TIMEOUT))
    fabric.launch()  # starts the other local ranks (re-running this command with their rank)
    log.info("distributed evaluation: rank %d of %d", fabric.global_rank, fabric.world_size)
    return Ranks(fabric)


@dataclass(frozen=True)
class RunFacts:
    """What an evaluation's rows depend on beside its options, models and cases: the task's
    name (the ``task`` column), the prompts' seed, the model's architecture and checkpoint file
    name, how the cases were sliced (``data.loading.slice_settings``) and the split's settings
    (``data.split``). Each share records them in its ``shard.json``: only shares of one run
    merge."""

    task_name: str
    seed: int
    model_name: str
    checkpoint: str
    slicing: dict[str, Any]
    data_split: dict[str, Any]


def shard_config(
    options: EvalOptions,
    facts: RunFacts,
    models: Mapping[str, Any],
    keys: Sequence[str],
    slices: Sequence[int],
    datamodule: Any = None,
) -> dict[str, Any]:
    """What must be equal for shares to be merged: the models (each one's weights digest,
    precision and preprocessing), the data (the split's cases, their slice counts, their pixels
    where the index knows them, and how they were sliced: intensity, axis, labels), the
    evaluation protocol (``EvalOptions.protocol``) and the seed."""
    from sam_ft.model.checkpoint import weights_digest

    return {
        "models": list(models),
        "weights": {name: _model_facts(m, weights_digest) for name, m in models.items()},
        "task_name": facts.task_name,
        "model_name": facts.model_name,
        "checkpoint": Path(facts.checkpoint).name,
        "seed": facts.seed,
        "eval": options.protocol(),
        "data_split": facts.data_split,
        "data": {
            "slicing": json.loads(json.dumps(facts.slicing, default=str)),
            "cases": _cases_digest(keys, slices, datamodule),
        },
    }


def _model_facts(model: Any, digest: Callable[[Any], str]) -> dict[str, Any]:
    """A model's weights digest, precision and preprocessing (what its numbers depend on)."""
    sam = getattr(model, "sam", model)
    transform = getattr(model, "transform", None)
    precision = model.precision() if callable(getattr(model, "precision", None)) else None
    return {
        "weights_sha256": digest(sam),
        "precision": precision,
        "preprocess": getattr(transform, "mode", None),
        "image_size": getattr(transform, "image_size", None),
        "multimask_output": bool(model.multimask_output),
    }


def _indexed_splits(datamodule: Any) -> Iterator[Any]:
    """The index of each split the datamodule has prepared (none without a datamodule)."""
    records = getattr(datamodule, "records", None)
    if not callable(records):
        return
    for split in ("train", "val", "test"):
        try:
            yield records(split)
        except (RuntimeError, KeyError):  # not prepared here (another share's split)
            continue


def _cases_digest(keys: Sequence[str], slices: Sequence[int], datamodule: Any) -> str:
    """SHA-256 over the split's cases in order, each with its slice count and (from the
    datamodule's index, no pixel read) its slices' image digests: another copy of the data with
    one changed pixel, or another split, gives another digest."""
    images: dict[str, list[str]] = {}
    for refs in _indexed_splits(datamodule):
        if callable(getattr(refs, "slice_keys", None)):  # a SliceIndex: from its columns
            for key, entry in refs.slice_keys():
                images.setdefault(key, []).append(entry)
            continue
        for r in refs:
            key = str(getattr(r, "image_id", None) or r.case)
            images.setdefault(key, []).append(f"{r.slice_index}:{r.digest}")
    h = hashlib.sha256()
    for key, count in zip(keys, slices, strict=True):
        h.update(json.dumps([key, int(count), images.get(key, [])]).encode() + b"\n")
    return h.hexdigest()


def slice_counts(cases: Sequence[Case], datamodule: Any = None) -> list[int]:
    """Slices per case, the unit of encoder work, without loading a case that is not loaded:
    a loaded case's own slices, else the datamodule's index (one entry per slice)."""
    index: Counter = Counter()
    for refs in _indexed_splits(datamodule):
        if callable(per_image := getattr(refs, "slices_per_image", None)):
            index.update(per_image())  # a SliceIndex: from its entry table, no row read
            continue
        index.update(str(getattr(r, "image_id", None) or r.case) for r in refs)
    counts = []
    for case in cases:
        if isinstance(case, LazyCase):
            counts.append(index.get(case.case, 1))
        else:
            counts.append(len(case.slices if isinstance(case, CaseData) else case))
    return counts


def evaluate_cases(
    models: Mapping[str, Any],
    cases: Sequence[Case],
    *,
    options: EvalOptions,
    facts: RunFacts,
    out_dir: Path,
    slices: Sequence[int],
    ranks: Ranks | None = None,
    datamodule: Any = None,
):
    """Score ``cases`` with ``models`` into ``out_dir`` in one process, as share
    ``options.share``, or as this rank's share of a distributed run (then merged by rank 0).

    Returns the engine's ``EvalResult`` for ``out_dir`` (one process, a shard, or rank 0 after
    the merge) or None on ranks other than 0.
    """
    from sam_ft.evaluation.protocol import engine, tables

    if ranks is not None and options.workers is None:
        # The node's cores divided among its ranks (each would otherwise take them all).
        options = dataclasses.replace(options, workers=default_workers(ranks.local_world))
    shard = options.share
    if shard is not None and ranks is not None:
        raise ConfigError("eval.shard and a distributed trainer= cannot be combined")
    common = {"task_name": facts.task_name, "options": options, "seed": facts.seed}
    if shard is None and ranks is None:
        return engine.evaluate_models(dict(models), cases, out_dir=out_dir, **common)

    keys = [case_key_of(c) for c in cases]
    shard = shard or Shard(ranks.rank, ranks.world)
    share = balanced_shares(keys, slices, shard.count)[shard.index]
    where = out_dir if ranks is None else out_dir / RANKS_DIR / f"{shard.index}-of-{shard.count}"
    config = shard_config(options, facts, models, keys, slices, datamodule)
    write_shard_file(where, shard, [keys[i] for i in share], config)
    log.info(
        "evaluation share %s: %d of %d cases, %d of %d slices",
        shard.name,
        len(share),
        len(cases),
        sum(slices[i] for i in share),
        sum(slices),
    )
    mine = [cases[i] for i in share]
    if ranks is None:
        return engine.evaluate_models(dict(models), mine, out_dir=where, **common)

    engine.evaluate_models(dict(models), mine, out_dir=where, report=False, **common)
    ranks.barrier("evaluation_shares")
    if ranks.rank != 0:
        return None
    parts = [out_dir / RANKS_DIR / f"{r}-of-{ranks.world}" for r in range(ranks.world)]
    report, overlays = merge_shards_with_overlays(parts, out_dir)
    skipped = tables.read_table(out_dir / tables.SKIPPED_CSV, tables.SKIPPED_COLUMNS)
    return engine.EvalResult(out_dir, list(models), facts.task_name, skipped, overlays, report)
