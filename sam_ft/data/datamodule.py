"""Lightning DataModule: cases -> case-level splits -> cached slices -> seeded dataloaders.

``setup`` finds the task's cases, splits them by case (patient), writes ``splits.json`` and
``skipped.csv`` into the run folder and preprocesses the cases of the splits it needs into the
slice cache (``data.prep_workers`` processes; the next run reads no NIfTI). The slice cache *is*
the data set: the module keeps only an index (:mod:`~sam_ft.data.slice_index`), items are read
inside the DataLoader workers and evaluation loads one case at a time
(:meth:`SamDataModule.case_entries`), so memory does not grow with the number of cases. Batches:
:func:`sam_ft.data.dataset.collate_slices`; with a frozen image encoder
(:meth:`SamDataModule.use_embedding_cache`) items carry cached ``embedding``s instead of
``image``s (every split without image augmentation).

``data`` keys read here (besides the loaders' ``min_object_pixels, split, seed, on_error,
affine_atol``): ``cache_dir`` (null = ``<run_dir>/cache``, a cache of this run only),
``prep_workers`` (processes that preprocess cases; null = the cores available),
``cache_embeddings`` (auto | true | false), ``augment`` (see :mod:`sam_ft.data.augment`),
``batch_size`` (per device), ``num_workers``, ``max_objects_per_image`` (null = all),
``pin_memory`` (default: when CUDA is available), ``embedding_dtype`` (null = the encoder's,
or float16 to halve the embedding cache).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sam_ft.data.augment import SliceAugment
from sam_ft.data.cache import SliceCache
from sam_ft.data.cache_check import index_share, index_splits, known_of, open_trusted, split_tag
from sam_ft.data.dataset import (
    PromptFn,
    ResumableLoader,
    SeededSampler,
    SliceDataset,
    collate_slices,
    tight_box_prompts,
)
from sam_ft.data.embedding_cache import CACHE_EMBEDDINGS, EMBEDDING_DTYPES, EmbeddingCache
from sam_ft.data.folder import find_cases
from sam_ft.data.preparation import (
    CaseEntry,
    load_case_entry,
    prep_pool,
    prep_workers,
)
from sam_ft.data.skips import SkipLog
from sam_ft.data.slice_index import SliceIndex
from sam_ft.data.splits import SPLITS, make_splits, write_splits
from sam_ft.data.tasks import plain_group, prepare_task, to_plain
from sam_ft.data.types import CaseFiles
from sam_ft.errors import ConfigError, DataError
from sam_ft.model.preprocess import SamTransform

log = logging.getLogger(__name__)


class SamDataModule(L.LightningDataModule):
    """Data for finetuning and evaluating SAM on one task.

    Args:
        task: the ``task`` group, checked and complete (``sam_ft.config.TaskConfig`` from
            ``parse_config``, or a dict of every key: ``data.tasks.task_options`` completes a
            partial one from Python). Nothing is filled in here.
        data: the ``data`` group, the same way (``sam_ft.config.DataConfig``, or a dict from
            ``data.tasks.data_options``).
        transform: model input / low-res target transform of the model being trained; may be
            set after preprocessing (``evaluate.py`` checks the files before building a model),
            it is first needed by :meth:`dataset`.
        train_prompt: (K, H, W) bool masks, generator -> K ``Prompt``s for training items.
        seed: run seed; fixes the order of each epoch and every item's random choices.
        run_dir: where ``splits.json`` and ``skipped.csv`` are written.
        val_prompt: prompts for val/test/predict items; default: tight box per object.
        data_dir: ``paths.data_dir``, for tasks without an explicit ``task.root``.
        progress: show progress bars (loading, target precompute, embedding cache).
        target_resolution: ``loss.resolution`` (``low`` | ``input`` | ``original``): the kind
            of training ``target`` (see ``SliceDataset``).
    """

    def __init__(
        self,
        task: Any,
        data: Any,
        transform: SamTransform | None,
        train_prompt: PromptFn,
        seed: int,
        run_dir: str | Path,
        val_prompt: PromptFn | None = None,
        data_dir: str | Path | None = None,
        progress: bool = True,
        target_resolution: str = "low",
    ) -> None:
        super().__init__()
        self.target_resolution = target_resolution
        self.task = plain_group(task, "TaskConfig", "task_options")
        self.data = plain_group(data, "DataConfig", "data_options")
        self.transform = transform
        self.train_prompt = train_prompt
        self.val_prompt = val_prompt or tight_box_prompts
        self.seed = int(seed)
        self.run_dir = Path(run_dir)
        self.data_dir = data_dir
        self.progress = progress
        self.batch_size = int(self.data["batch_size"])
        self.num_workers = int(self.data["num_workers"])
        self.max_objects = self.data.get("max_objects_per_image")
        mode = self.data["cache_embeddings"]
        dtype = self.data.get("embedding_dtype")
        if dtype is not None and dtype not in EMBEDDING_DTYPES:
            raise ConfigError(
                f"data.embedding_dtype must be null, float32, float16 or bfloat16, got {dtype!r}"
            )
        if mode not in CACHE_EMBEDDINGS:
            raise ConfigError(f"data.cache_embeddings must be auto, true or false, got {mode!r}")
        self.cache_embeddings = mode
        self.augment = SliceAugment.from_config(
            to_plain(self.data.get("augment")), int(self.data["min_object_pixels"])
        )
        self.cache_dir = Path(self.data.get("cache_dir") or self.run_dir / "cache")
        self.slice_cache = SliceCache(self.cache_dir)
        self.embedding_cache: EmbeddingCache | None = None
        self.skip_log: SkipLog | None = None
        self.splits: dict[str, list[str]] | None = None
        self.splits_path: Path | None = None
        self._assigned: dict[str, list[CaseFiles]] | None = None
        self._refs: dict[str, SliceIndex] = {}
        self._datasets: dict[str, SliceDataset] = {}
        self._embedding_request: tuple[Callable, str, torch.device | str] | None = None
        self._train_loader: ResumableLoader | None = None
        self._train_loader_state: dict[str, int] | None = None

    # ------------------------------------------------------------------------------------------
    # Setup

    def prepare_data(self) -> None:
        """Download / generate the task's files (Lightning runs this on one process per node)."""
        prepare_task(self.task, self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        """Find and split the cases (once), then preprocess and index the splits ``stage``
        needs: ``fit`` all three (so a bad test case stops the run before training, not after),
        ``validate`` val, ``test``/``predict`` test, ``None`` all."""
        needed = {"validate": ("val",), "test": ("test",), "predict": ("test",)}
        splits = needed.get(str(stage), SPLITS)
        self.prepare_splits(splits)
        self._check_usable(splits)

    def _split_cases(self) -> dict[str, list[CaseFiles]]:
        if self._assigned is None:
            root = prepare_task(self.task, self.data_dir)
            cases = find_cases(root, self.task)
            assigned = make_splits(cases, self.data)
            self.splits = {s: sorted({c.case for c in assigned[s]}) for s in SPLITS}
            self.splits_path = write_splits(assigned, self.run_dir)
            self.skip_log = SkipLog(self.run_dir)
            # Written even when empty, so "nothing was skipped" is visible in the run folder.
            self.skip_log.write()
            self._assigned = {s: list(assigned[s]) for s in SPLITS}
        return self._assigned

    def prepare_split(self, split: str) -> None:
        """Preprocess ``split``'s cases into the slice cache (parallel) and index them (once)."""
        self.prepare_splits((split,))

    def prepare_splits(self, splits: Sequence[str]) -> None:
        """Preprocess the cases of ``splits`` into the slice cache and index them (once each).

        An unchanged split opens its saved index (``sam_ft.data.cache_check``: a ``stat`` per
        entry, nothing read). Otherwise all their cases go through one pool of
        ``data.prep_workers`` processes (a pool per split would leave a core idle while the last
        case of each runs), entries whose stamp is unchanged since an earlier index excepted.
        Under DDP each rank first fills and indexes its share of the cache, then (after a
        barrier) indexes every case from the shares' indexes, so no case is read twice and
        every rank holds the same index.
        """
        todo = [s for s in dict.fromkeys(map(_split_name, splits)) if s not in self._refs]
        if not todo:
            return
        assigned = self._split_cases()
        tags = {s: split_tag(assigned[s], self.task, self.data) for s in todo}
        ready = {s: open_trusted(self.cache_dir, tags[s]) for s in todo}
        world, rank, fast = *self._distributed(), all(i is not None for i in ready.values())
        if world > 1:  # every rank takes the same path (the slow one has a barrier)
            fast = bool(self.trainer.strategy.reduce_boolean_decision(fast, all=True))
        label = ", ".join(todo)
        if fast:
            self.slice_cache.hits += sum(len(index.entries) for index in ready.values())
        else:
            tagged = [(split, case) for split in todo for case in assigned[split]]
            known = list(tags.values())
            if world > 1 and tagged:
                shares = [[c for _, c in tagged[r::world]] for r in range(world)]
                known += [split_tag(share, self.task, self.data) for share in shares]
                mine = partial(self._prepare, label=label, record=False)
                index_splits(tagged[rank::world], mine, self.cache_dir, known[len(tags) + rank])
                self.trainer.strategy.barrier(f"slice_cache_{'_'.join(todo)}")
            prepare = partial(self._prepare, label=label, record=True)
            ready = index_splits(tagged, prepare, self.cache_dir, tags, known)
        self._refs.update(ready)
        cache = self.slice_cache
        log.info("slice cache %s: %d hits, %d misses (%s)", cache.root, cache.hits, cache.misses,
                 label)  # fmt: skip

    def _check_usable(self, splits: Sequence[str]) -> None:
        """A split that had cases and lost every one to ``data.on_error=skip`` cannot be trained,
        validated or evaluated on: stop now, before training, not when it is first used."""
        assigned = self._split_cases()
        for split in map(_split_name, splits):
            if assigned[split] and not len(self._refs[split].entries):
                where = self.skip_log.path if self.skip_log is not None else self.run_dir
                raise DataError(
                    str(where),
                    f"every case of the {split} split ({len(assigned[split])}) was skipped for bad "
                    "data; fix or remove those files, or change data.split",
                )

    def _prepare(
        self,
        tagged: Sequence[tuple[str, CaseFiles]],
        label: str,
        record: bool,
        known: Mapping[str, tuple] | None = None,
        errors: dict[str, DataError] | None = None,
    ) -> list[tuple[str, CaseFiles, tuple]]:
        """(split, case, (header, facts)) of the good (split, case) pairs in order, preprocessing
        (or verifying whole) in ``data.prep_workers`` processes the entries not in ``known``
        ({entry path: (header, facts)}, unchanged since indexed). With ``record``, bad cases
        follow ``data.on_error`` and hits/misses are counted; without, they are left out (and
        put in ``errors`` by image id when given).

        Every case is read before a bad one stops the run: with ``raise`` each bad file goes to
        ``skipped.csv`` and the error names the first and counts the others, so one run lists
        every file to fix (and none of them is found hours later)."""
        root = str(self.cache_dir)
        cases = [c for _, c in tagged]
        found = known_of(cases, known or {}, self.slice_cache, self.task, self.data)
        args = [(c, self.task, self.data, root) for c, f in zip(cases, found, strict=True) if not f]
        workers = prep_workers(self.data.get("prep_workers"), len(args), self._local_ranks())
        out: list[tuple[str, CaseFiles, tuple]] = []
        bad: list[DataError] = []
        desc, quiet = f"slices ({label})", not self.progress
        with (
            tqdm(total=len(tagged), desc=desc, unit="case", disable=quiet) as bar,
            prep_pool(workers, self.slice_cache.root) as imap,
        ):
            # Ordered results, so the index (and every seeded choice) is the same for any
            # number of workers; each worker holds one case at a time.
            results = iter(imap(args))
            for (split, case), f in zip(tagged, found, strict=True):
                # An entry known unchanged is a hit read from nothing but its stamp.
                case, entry, error, hit = (case, f, None, True) if f else next(results)
                bar.update(1)
                if record:
                    self.slice_cache.hits += int(hit)
                    self.slice_cache.misses += int(not hit)
                if error is not None:
                    # A rank's first (share) pass never raises: a rank that stopped there would
                    # leave the others waiting at the barrier; the full pass raises on every rank.
                    if record:
                        bad.append(DataError(*error))
                        self.skip_log.add(case.case, bad[-1].path, bad[-1].reason)
                    elif errors is not None:
                        errors[case.image_id] = DataError(*error)
                    continue
                out.append((split, case, entry))
        if bad and self.data["on_error"] == "raise":
            more = f" (and {len(bad) - 1} more bad file(s))" if len(bad) > 1 else ""
            raise DataError(
                bad[0].path,
                f"{bad[0].reason}{more}; all are listed in {self.skip_log.path}. Nothing was "
                "trained or evaluated; fix them, or pass data.on_error=skip to leave them out",
            )
        return out

    def split_files(self, split: str) -> list[CaseFiles]:
        """The cases of ``split`` as files, in order, before any is read."""
        return list(self._split_cases()[_split_name(split)])

    def prepare_share(self, tagged: Sequence[tuple[str, CaseFiles]]) -> tuple[dict, dict]:
        """Preprocess and index only the (split, case) pairs ``tagged`` (an evaluation's share:
        nothing else is read). Returns ({image id: CaseEntry} of the good cases, {image id:
        DataError} of the bad ones, neither raised nor logged here)."""
        errors: dict[str, DataError] = {}
        prepare = partial(self._prepare, label="share", record=False, errors=errors)
        ready = index_share(tagged, prepare, self.cache_dir, self.task, self.data)
        entries = [e for index in ready.values() for e in index.case_entries()]
        return {e.image_id: e for e in entries}, errors

    def _require_split(self, split: str) -> str:
        split = _split_name(split)
        if split not in self._refs:
            raise RuntimeError(f"call SamDataModule.setup() (or prepare_split({split!r})) first")
        return split

    def records(self, split: str) -> SliceIndex:
        """The index of ``split``: columns with a row per slice, in case order (no pixel data);
        ``records(split)[i]`` is a ``SliceRef``."""
        return self._refs[self._require_split(split)]

    def case_entries(self, split: str) -> list[CaseEntry]:
        """The preprocessed cases of ``split`` ('train', 'val', 'test'; 'predict' = 'test'), in
        order; :func:`load_case_entry` reads one when it is evaluated."""
        return self._refs[self._require_split(split)].case_entries()

    def case_files(self, split: str) -> list[CaseFiles]:
        """The files of ``split``'s preprocessed cases, in :meth:`case_entries` order (what
        ``eval.mode=propagate`` reads again, for the slices without objects)."""
        files = {c.image_id: c for c in self.split_files(split)}
        return [files[e.image_id] for e in self.case_entries(split)]

    def iter_case_data(self, split: str):
        """Yield the cases of ``split`` as ``CaseData``, one at a time, read from the cache."""
        for entry in self.case_entries(split):
            yield load_case_entry(entry)

    # ------------------------------------------------------------------------------------------
    # Datasets and loaders

    def dataset(self, split: str) -> SliceDataset:
        """The ``SliceDataset`` of ``split`` (built on first use)."""
        split = _split_name(split)
        if split not in self._datasets:
            train = split == "train"
            self.prepare_split(split)
            self._datasets[split] = SliceDataset(
                self.records(split),
                self.transform,
                self.train_prompt if train else self.val_prompt,
                seed=self.seed,
                augment=self.augment if train else None,
                # The cap bounds training memory; test metrics must cover every object.
                max_objects=self.max_objects if split in ("train", "val") else None,
                with_masks=not train,
                with_image_uint8=split == "val",
                progress=self.progress,
                target_resolution=self.target_resolution,
            )
            if self._embedding_request is not None:
                self._fill_embeddings(split, *self._embedding_request)
        return self._datasets[split]

    def _distributed(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _local_ranks(self) -> int:
        """The ranks of this run on this node (they share its cores)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1
        return max(1, int(trainer.world_size) // max(1, int(trainer.num_nodes)))

    def _loader(self, split: str) -> DataLoader | list:
        ds = self.dataset(split)
        if len(ds) == 0:
            if split == "val":
                # Lightning skips validation for an empty list (e.g. data.split.val: 0).
                log.warning("the val split has no slices; validation is skipped")
                return []
            raise DataError(str(self.splits_path), f"the {split} split has no slices")
        world, rank = self._distributed()
        train = split == "train"
        sampler = SeededSampler(
            ds,
            seed=self.seed,
            shuffle=train,
            fixed_epoch=not train,
            num_replicas=world,
            rank=rank,
        )
        loader = (ResumableLoader if train else DataLoader)(
            ds,
            batch_size=self.batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=collate_slices,
            pin_memory=bool(self.data.get("pin_memory", torch.cuda.is_available())),
            persistent_workers=self.num_workers > 0 and train,
            drop_last=False,
        )
        if train:
            self._train_loader = loader
            if self._train_loader_state:  # restored before the loader existed: used once
                loader.load_state_dict(self._train_loader_state)
                self._train_loader_state = None
        return loader

    # Lightning stores the datamodule's state in every checkpoint and restores it before training
    # starts. Its own per-loader state is restored too late when ``estimated_stepping_batches``
    # (the scheduler's length) built the loader first, so the position is carried here.

    def state_dict(self) -> dict[str, Any]:
        """``{"train_loader": {"epoch", "batches_served"}}`` once training has a loader."""
        if self._train_loader is None:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        loader_state = state.get("train_loader")
        if not loader_state:
            return
        if self._train_loader is not None:
            self._train_loader.load_state_dict(loader_state)
        else:
            self._train_loader_state = loader_state

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader | list:
        return self._loader("val")

    # ------------------------------------------------------------------------------------------
    # Embedding cache

    def use_embedding_cache(
        self,
        encode: Callable[[torch.Tensor], torch.Tensor],
        fingerprint: str,
        device: torch.device | str,
    ) -> bool:
        """Serve cached image embeddings instead of images (the encoder is frozen).

        Args:
            encode: (B, 3, S, S) model input on ``device`` -> (B, C, h, w) embeddings.
            fingerprint: ``encoder_fingerprint(encoder, transform)``.
            device: where ``encode`` runs.

        Returns:
            Whether any split now serves embeddings: false when ``data.cache_embeddings`` is
            false; with ``auto``, the train split keeps images when augmentation is on.

        Raises:
            ConfigError: ``cache_embeddings: true`` together with image augmentation.
        """
        if self.cache_embeddings is False:
            return False
        if self.cache_embeddings is True and self.augment is not None:
            raise ConfigError(
                "data.cache_embeddings=true needs data.augment.enabled=false (augmented images "
                "change every step); use auto to cache only the val/test embeddings"
            )
        self._embedding_request = (encode, fingerprint, device)
        for split in list(self._datasets):
            self._fill_embeddings(split, encode, fingerprint, device)
        return True

    def _fill_embeddings(
        self, split: str, encode: Callable, fingerprint: str, device: torch.device | str
    ) -> None:
        """Encode the missing embeddings of ``split``'s dataset (once it exists) and serve them.

        Images are read from the slice cache one batch at a time; the index's digests tell which
        entries exist, so a filled cache reads no pixels.
        """
        ds = self._datasets[split]
        if ds.augment is not None or len(ds) == 0 or ds.uses_embeddings:
            return
        if self.embedding_cache is None:
            dtype = self.data.get("embedding_dtype")
            self.embedding_cache = EmbeddingCache(
                self.cache_dir, fingerprint, None if dtype is None else getattr(torch, dtype)
            )
        cache = self.embedding_cache
        world, rank = self._distributed()
        shares: list[str] = []
        if world > 1:
            # Each rank encodes (or checks) its share first; after the barrier every entry
            # exists and the full pass below checks the stamps the shares saved.
            share_digests = [ds.records.digests()[r::world] for r in range(world)]
            shares = [cache.tag(list(dict.fromkeys(d))) for d in share_digests]
            args = (encode, self.transform, self.batch_size, device, self.progress)
            cache.fill(ds.records[rank::world], *args)
            self.trainer.strategy.barrier(f"embedding_cache_{split}")
        digests = cache.fill(
            ds.records, encode, self.transform, self.batch_size, device, self.progress, shares
        )
        ds.attach_embeddings(cache, digests)
        log.info("embedding cache %s: %d encoded (%s)", cache.dir, cache.computed, split)


def _split_name(split: str) -> str:
    split = "test" if split == "predict" else split
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or 'predict', got {split!r}")
    return split
