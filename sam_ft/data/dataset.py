"""Torch dataset over ``SliceRecord``s, its collate function and a seeded, epoch-aware sampler.

Randomness is a pure function of (seed, epoch, index): the sampler yields ``(epoch, index)``
pairs, and the dataset derives the object subset, the augmentation and the prompts of an item
from ``np.random.default_rng([seed, epoch, index, stream])``. So a resumed run, any number of
dataloader workers and any worker start method see the same order and the same prompts.

Prompts are (x, y) = (column, row) in original-image pixels; arrays are indexed (row, col).

Items are built from ``SliceRecord``s in memory or from :class:`~sam_ft.data.cache.SliceRef`s
(the slice-cache index): a ref's image and masks are read from disk when the item is built, in
the DataLoader worker, and low-resolution targets are computed per item, so the dataset holds
only the index and its memory does not grow with the number of slices.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from sam_ft.data.augment import SliceAugment
from sam_ft.data.cache import SliceRef
from sam_ft.data.embedding_cache import EmbeddingCache
from sam_ft.data.slice_index import SliceIndex
from sam_ft.data.types import SliceRecord
from sam_ft.model.backend import stack_embeddings
from sam_ft.model.preprocess import SamTransform
from sam_ft.prompts.geometry import mask_box
from sam_ft.prompts.types import Prompt

PromptFn = Callable[[np.ndarray, np.random.Generator], list[Prompt]]
"""(K, H, W) bool masks, generator -> K prompts (one per mask, original-image (x, y) coords)."""

# Independent random streams of one item, so e.g. turning augmentation on does not change
# which object subset is drawn.
_SUBSET, _AUGMENT, _PROMPT = 0, 1, 2

TENSOR_KEYS = ("image", "embedding")
LIST_KEYS = (
    "target",
    "masks",
    "prompts",
    "original_size",
    "case",
    "slice_index",
    "labels",
    "image_uint8",
)


def tight_box_prompts(masks: np.ndarray, rng: np.random.Generator | None = None) -> list[Prompt]:
    """Default val/test prompts: one tight-box ``Prompt`` per (H, W) mask of (K, H, W) ``masks``:
    ``[x_min, y_min, x_max, y_max]`` of the mask's pixels, x = column, inclusive indices.

    ``rng`` is unused (the box is deterministic); it keeps the ``PromptFn`` signature.
    """
    return [Prompt(box=mask_box(m)) for m in masks]


class SliceDataset(Dataset):
    """Items of the batch format consumed by the training module (see ``collate_slices``).

    Args:
        records: the split's slices.
        transform: model input / low-res target transform.
        prompt_fn: (K, H, W) bool masks, generator -> K ``Prompt``s.
        seed: run seed; with (epoch, index) it fixes every random choice of an item.
        augment: applied to image and masks before prompts are drawn (``None`` = identity).
        max_objects: keep at most this many objects per item (random subset); ``None`` = all.
        with_masks: add original-resolution ``masks`` (val/test).
        with_image_uint8: add the ``image_uint8`` original image (val, for overlays).
        progress: unused (kept for callers; items are built on demand, nothing precomputed).
        target_resolution: ``low``: ``target`` is the (K, S/4, S/4) low-res target; ``input`` or
            ``original`` (``loss.resolution``): ``target`` is the (K, H, W) bool mask itself, which
            the training module brings into the loss's frame.

    Index with ``(epoch, index)`` (what ``SeededSampler`` yields) or a plain ``index`` (epoch 0).
    ``records`` may be :class:`SliceRef`s or a :class:`SliceIndex` (read from the slice cache
    per item).
    """

    def __init__(
        self,
        records: Sequence[SliceRecord | SliceRef],
        transform: SamTransform,
        prompt_fn: PromptFn,
        seed: int,
        augment: SliceAugment | None = None,
        max_objects: int | None = None,
        with_masks: bool = False,
        with_image_uint8: bool = False,
        progress: bool = True,
        target_resolution: str = "low",
    ) -> None:
        if target_resolution not in ("low", "input", "original"):
            raise ValueError(
                f"target_resolution must be low, input or original, not {target_resolution!r}"
            )
        self.target_resolution = target_resolution
        # A SliceIndex stays columns (shared by forked workers without copies); others a list.
        self.records = records if isinstance(records, SliceIndex) else list(records)
        self.transform = transform
        self.prompt_fn = prompt_fn
        self.seed = int(seed)
        self.augment = augment
        self.max_objects = None if max_objects is None else int(max_objects)
        if self.max_objects is not None and self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1 or None, got {max_objects}")
        self.with_masks = with_masks
        self.with_image_uint8 = with_image_uint8
        self.embedding_cache: EmbeddingCache | None = None
        self.digests: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def uses_embeddings(self) -> bool:
        return self.embedding_cache is not None

    def attach_embeddings(self, cache: EmbeddingCache, digests: Sequence[str]) -> None:
        """Serve ``embedding`` from ``cache`` instead of ``image`` (filled for these records)."""
        if self.augment is not None:
            raise ValueError("cached embeddings cannot be used with image augmentation")
        if len(digests) != len(self.records):
            raise ValueError("one digest per record is needed")
        self.embedding_cache = cache
        # One array, not a list of str objects whose reference counts workers would copy.
        self.digests = np.asarray(digests, dtype="S64")

    def record(self, index: int, image: bool = True) -> SliceRecord:
        """The record of ``index``, read from the slice cache for a ``SliceRef`` (``image=False``
        skips reading the pixels)."""
        r = self.records[index]
        return r.load(image=image, raw=False) if isinstance(r, SliceRef) else r

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        index = int(index)
        # Pixels are needed for the model input (no cached embedding) or the val overlays.
        r = self.record(index, image=self.embedding_cache is None or self.with_image_uint8)

        def rng(stream: int) -> np.random.Generator:
            return np.random.default_rng([self.seed, int(epoch), index, stream])

        k = len(r.masks)
        keep = np.arange(k, dtype=np.int64)
        if self.max_objects is not None and k > self.max_objects:
            keep = np.sort(rng(_SUBSET).choice(k, self.max_objects, replace=False))
        image, masks = r.image, np.asarray(r.masks[keep], dtype=bool)
        if self.augment is not None:
            image, masks, kept = self.augment(image, masks, rng(_AUGMENT))
            keep = keep[kept]
        if self.target_resolution != "low":
            target = torch.from_numpy(np.ascontiguousarray(masks))
        else:
            target = self.transform.masks_to_low_res(masks)

        item: dict[str, Any] = {
            "target": target,
            "prompts": self.prompt_fn(masks, rng(_PROMPT)),
            "original_size": r.original_size,
            "case": r.case,
            "slice_index": int(r.slice_index),
            "labels": torch.as_tensor(np.asarray(r.labels)[keep], dtype=torch.long),
        }
        if len(item["prompts"]) != len(masks):
            raise ValueError(f"prompt_fn returned {len(item['prompts'])} prompts for {len(masks)}")
        if self.embedding_cache is not None:
            item["embedding"] = self.embedding_cache.load(self.digests[index].decode())
        else:
            item["image"] = self.transform.apply_image(np.ascontiguousarray(image))
        if self.with_masks:
            item["masks"] = torch.from_numpy(masks)
        if self.with_image_uint8:
            item["image_uint8"] = image
        return item


def collate_slices(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Batch items with a varying number of objects K_b.

    Returns ``image`` (B, 3, S, S) or ``embedding`` (B, C, h, w) stacked; ``target`` (list of
    (K_b, S/4, S/4) float, or of (K_b, H_b, W_b) bool masks: see ``target_resolution``),
    ``masks`` (list of (K_b, H_b, W_b) bool), ``prompts`` (list of K_b
    ``Prompt``), ``original_size`` (list of (H, W)), ``case``, ``slice_index``, ``labels`` (list
    of (K_b,) long) and ``image_uint8`` (list of (H, W, 3) uint8) as lists, where present.
    """
    if not items:
        raise ValueError("cannot collate an empty batch")
    keys = set(items[0])
    for it in items[1:]:
        if set(it) != keys:
            raise ValueError(f"items differ in keys: {sorted(keys)} vs {sorted(it)}")
    batch: dict[str, Any] = {}
    for key in TENSOR_KEYS:
        if key in keys:  # an embedding may be a dict of tensors (SAM 2): stacked per tensor
            batch[key] = stack_embeddings([it[key] for it in items])
    for key in LIST_KEYS:
        if key in keys:
            batch[key] = [it[key] for it in items]
    return batch


class SeededSampler(DistributedSampler):
    """Yields ``(epoch, index)`` pairs in an order that is a function of (seed, epoch) only.

    A ``DistributedSampler`` subclass so Lightning keeps it under DDP (rather than wrapping it)
    and calls ``set_epoch`` on it each epoch. With ``num_replicas > 1`` each rank takes every
    ``num_replicas``-th item of the shared order (padded by repetition to equal length).

    Args:
        dataset: the dataset (only its length is used).
        seed: run seed.
        shuffle: shuffle per epoch (train); ``False`` keeps 0..n-1 (val/test).
        fixed_epoch: ignore ``set_epoch`` and always use epoch 0 (val: the same prompts every
            epoch, so validation scores are comparable between epochs).
        num_replicas, rank: distributed layout (1, 0 on one device).
        drop_last: drop the tail instead of padding when splitting between ranks.
    """

    def __init__(
        self,
        dataset: Dataset,
        seed: int,
        shuffle: bool = True,
        fixed_epoch: bool = False,
        num_replicas: int = 1,
        rank: int = 0,
        drop_last: bool = False,
    ) -> None:
        super().__init__(
            dataset,
            num_replicas=num_replicas,
            rank=rank,
            shuffle=shuffle,
            seed=int(seed),
            drop_last=drop_last,
        )
        self.fixed_epoch = fixed_epoch
        self.start = 0
        """Items of this rank to skip at the next ``__iter__`` (mid-epoch resume); then 0 again."""

    def order(self, epoch: int) -> np.ndarray:
        """All indices (before the rank split) in the order of ``epoch``."""
        n = len(self.dataset)
        if not self.shuffle:
            return np.arange(n)
        return np.random.default_rng([self.seed, int(epoch)]).permutation(n)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = 0 if self.fixed_epoch else int(self.epoch)
        order = self.order(epoch).tolist()
        if self.drop_last:
            order = order[: self.total_size]
        elif order:
            pad = self.total_size - len(order)
            order += (order * (pad // len(order) + 1))[:pad]
        start, self.start = self.start, 0
        for index in order[self.rank : self.total_size : self.num_replicas][start:]:
            yield epoch, int(index)


class ResumableLoader(DataLoader):
    """A ``DataLoader`` that Lightning can resume mid-epoch.

    Lightning saves ``state_dict()`` in every checkpoint and calls ``load_state_dict`` before
    iterating again on resume (any object with both methods counts as resumable). The state is
    the number of batches served in the current epoch; since items are pure functions of (seed,
    epoch, index), skipping that many batches of the sampler's order is all a resume needs: the
    resumed epoch sees exactly the batches the killed run had not trained on yet.
    Needs a ``SeededSampler`` as ``sampler``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, SeededSampler):
            raise TypeError("ResumableLoader needs a SeededSampler")
        self._served = 0
        self._resume_at: tuple[int, int] | None = None
        """(epoch, batches served in it) of the checkpoint being resumed, used once."""

    def __iter__(self) -> Iterator[dict[str, Any]]:
        skip, self._resume_at = self._resume_at, None
        # Only within the epoch the checkpoint was taken in: a checkpoint taken after an epoch's
        # last batch (``len(self)`` or ``trainer.limit_train_batches`` of them) resumes with the
        # next epoch, whose ``set_epoch`` came before this call, from its start.
        served = skip[1] if skip is not None and skip[0] == int(self.sampler.epoch) else 0
        self.sampler.start = served * int(self.batch_size or 1)
        self._served = served
        for batch in super().__iter__():
            self._served += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches_served": self._served}

    def load_state_dict(self, state: dict[str, int]) -> None:
        served = int(state.get("batches_served", 0))
        self._resume_at = (int(state.get("epoch", 0)), served if served < len(self) else 0)
