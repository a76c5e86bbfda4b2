"""Lightning DataModule: cases -> case-level splits -> cached slices -> seeded dataloaders.

``setup`` finds the task's cases, splits them by case (patient), writes ``splits.json`` and
``skipped.csv`` into the run folder and loads every case through the slice cache (the next epoch
and the next run read no NIfTI). The dataloaders yield the batch format of
:func:`sam_ft.data.dataset.collate_slices`. When the training module's image encoder is frozen it
calls :meth:`SamDataModule.use_embedding_cache`; items then carry cached ``embedding``s instead
of ``image``s (for every split without image augmentation).

``data`` keys read here (besides the loaders' ``min_object_pixels, split, seed, on_error,
affine_atol``): ``cache_dir`` (null = no slice cache; embeddings then go to ``<run_dir>/cache``),
``cache_embeddings`` (auto | true | false), ``augment`` (see :mod:`sam_ft.data.augment`),
``batch_size`` (per device), ``num_workers``, ``max_objects_per_image`` (null = all),
``pin_memory`` (default: when CUDA is available), ``embedding_dtype`` (null = the encoder's,
or float16 to halve the embedding cache).
"""

from __future__ import annotations

import dataclasses
import logging
import typing
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from sam_ft.data.augment import SliceAugment
from sam_ft.data.cache import CachedCase, SliceCache
from sam_ft.data.dataset import (
    PromptFn,
    ResumableLoader,
    SeededSampler,
    SliceDataset,
    collate_slices,
    tight_box_prompts,
)
from sam_ft.data.embedding_cache import EmbeddingCache
from sam_ft.data.folder import find_cases
from sam_ft.data.loading import CaseData, dataset_meta, load_case, slice_settings
from sam_ft.data.skips import SkipLog
from sam_ft.data.splits import SPLITS, make_splits, write_splits
from sam_ft.data.tasks import data_options, prepare_task, task_options, to_plain
from sam_ft.data.types import CaseFiles, SliceRecord
from sam_ft.errors import ConfigError, DataError
from sam_ft.model.preprocess import SamTransform

log = logging.getLogger(__name__)


def _case_to_entry(cd: CaseData) -> CachedCase:
    """CaseData -> cache entry: arrays stay arrays, everything else goes to JSON meta."""
    meta: dict[str, Any] = {}
    arrays: dict[str, np.ndarray] = {}
    for f in dataclasses.fields(cd):
        value = getattr(cd, f.name)
        if f.name == "slices":
            continue
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        else:
            meta[f.name] = value
    return CachedCase(list(cd.slices), meta, arrays)


def _entry_to_case(entry: CachedCase) -> CaseData:
    """Inverse of ``_case_to_entry``; JSON lists go back to tuples where the field is a tuple."""
    hints = typing.get_type_hints(CaseData)
    kwargs: dict[str, Any] = {**entry.arrays}
    for name, value in entry.meta.items():
        is_tuple = typing.get_origin(hints.get(name)) is tuple
        kwargs[name] = tuple(value) if is_tuple and isinstance(value, list) else value
    return CaseData(slices=entry.records, **kwargs)


class SamDataModule(L.LightningDataModule):
    """Data for finetuning and evaluating SAM on one task.

    Args:
        task: the ``task`` config (``conf/task/*.yaml``).
        data: the ``data`` config (``conf/data/default.yaml``).
        transform: model input / low-res target transform of the model being trained.
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
        task: Mapping[str, Any],
        data: Mapping[str, Any],
        transform: SamTransform,
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
        self.task = task_options(task)
        self.data = data_options(data)
        self.transform = transform
        self.train_prompt = train_prompt
        self.val_prompt = val_prompt or tight_box_prompts
        self.seed = int(seed)
        self.run_dir = Path(run_dir)
        self.data_dir = data_dir
        self.progress = progress
        self.batch_size = int(self.data.get("batch_size", 2))
        self.num_workers = int(self.data.get("num_workers", 0))
        self.max_objects = self.data.get("max_objects_per_image")
        mode = self.data.get("cache_embeddings", "auto")
        dtype = self.data.get("embedding_dtype")
        if dtype not in (None, "float32", "float16", "bfloat16"):
            raise ConfigError(
                f"data.embedding_dtype must be null, float32, float16 or bfloat16, got {dtype!r}"
            )
        if mode not in ("auto", True, False):
            raise ConfigError(f"data.cache_embeddings must be auto, true or false, got {mode!r}")
        self.cache_embeddings = mode
        self.augment = SliceAugment.from_config(
            to_plain(self.data.get("augment")), int(self.data["min_object_pixels"])
        )
        cache_dir = self.data.get("cache_dir")
        self.slice_cache = SliceCache(cache_dir)
        self.embedding_cache: EmbeddingCache | None = None
        self.skip_log: SkipLog | None = None
        self.splits: dict[str, list[str]] | None = None
        self.splits_path: Path | None = None
        self._cases: dict[str, list[CaseData]] | None = None
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
        """Find, split and load the cases (once; later calls for other stages do nothing)."""
        if self._cases is not None:
            return
        root = prepare_task(self.task, self.data_dir)
        cases = find_cases(root, self.task)
        assigned = make_splits(cases, self.data)
        self.splits = {s: sorted({c.case for c in assigned[s]}) for s in SPLITS}
        self.splits_path = write_splits(assigned, self.run_dir)
        self.skip_log = SkipLog(self.run_dir)
        self._cases = {s: self._load(assigned[s], s) for s in SPLITS}
        # Written even when empty, so "nothing was skipped" is visible in the run folder.
        self.skip_log.write()
        if self.slice_cache.enabled:
            log.info(
                "slice cache %s: %d hits, %d misses",
                self.slice_cache.root,
                self.slice_cache.hits,
                self.slice_cache.misses,
            )
        if self._embedding_request is not None:
            self._fill_embeddings(*self._embedding_request)

    def _cache_settings(self, case: CaseFiles) -> dict[str, Any]:
        return {
            **slice_settings(self.task, self.data),
            # dataset.json names the labels and may set the modality (window, slicing axis).
            "dataset_json": dataset_meta(case, self.task),
        }

    def _load(self, cases: Sequence[CaseFiles], split: str) -> list[CaseData]:
        """Load cases through the slice cache, honouring ``data.on_error``."""
        out = []
        for case in tqdm(cases, desc=f"slices ({split})", unit="case", disable=not self.progress):
            try:
                entry = self.slice_cache.get_or_compute(
                    case,
                    self._cache_settings(case),
                    lambda case=case: _case_to_entry(load_case(case, self.task, self.data)),
                )
            except DataError as e:
                if self.data["on_error"] == "raise":
                    raise
                self.skip_log.add(case.case, e.path, e.reason)
                continue
            out.append(_entry_to_case(entry))
        return out

    def _require_setup(self) -> dict[str, list[CaseData]]:
        if self._cases is None:
            raise RuntimeError("call SamDataModule.setup() first")
        return self._cases

    def case_data(self, split: str) -> list[CaseData]:
        """Loaded cases of ``split`` ('train', 'val', 'test'; 'predict' = 'test')."""
        return self._require_setup()[_split_name(split)]

    def records(self, split: str) -> list[SliceRecord]:
        """All slices of ``split`` in case order (for the evaluation engine)."""
        return [r for cd in self.case_data(split) for r in cd.slices]

    # ------------------------------------------------------------------------------------------
    # Datasets and loaders

    def dataset(self, split: str) -> SliceDataset:
        """The ``SliceDataset`` of ``split`` (built on first use)."""
        split = _split_name(split)
        if split not in self._datasets:
            train = split == "train"
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
        return self._datasets[split]

    def _distributed(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

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

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")

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
        if self._cases is not None:
            self._fill_embeddings(encode, fingerprint, device)
        return True

    def _fill_embeddings(
        self, encode: Callable, fingerprint: str, device: torch.device | str
    ) -> None:
        root = self.data.get("cache_dir") or (self.run_dir / "cache")
        dtype = self.data.get("embedding_dtype")
        cache = EmbeddingCache(root, fingerprint, None if dtype is None else getattr(torch, dtype))
        self.embedding_cache = cache
        world, rank = self._distributed()
        for split in SPLITS:
            ds = self.dataset(split)
            if ds.augment is not None or len(ds) == 0:
                continue
            if world > 1:
                # Each rank encodes its share first; after the barrier every entry exists and
                # the full pass below only verifies.
                cache.fill(
                    ds.records[rank::world],
                    encode,
                    self.transform,
                    self.batch_size,
                    device,
                    progress=self.progress,
                )
                self.trainer.strategy.barrier("embedding_cache")
            digests = cache.fill(
                ds.records, encode, self.transform, self.batch_size, device, self.progress
            )
            ds.attach_embeddings(cache, digests)
        log.info("embedding cache %s: %d encoded", cache.dir, cache.computed)


def _split_name(split: str) -> str:
    split = "test" if split == "predict" else split
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or 'predict', got {split!r}")
    return split
