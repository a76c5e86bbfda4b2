"""Dataset items, collate, the seeded sampler and the DataModule on the demo dataset."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from sam_ft.data.datamodule import SamDataModule
from sam_ft.data.dataset import (
    ResumableLoader,
    SeededSampler,
    SliceDataset,
    collate_slices,
    tight_box_prompts,
)
from sam_ft.data.embedding_cache import encoder_fingerprint
from sam_ft.data.tasks import data_options, task_options
from sam_ft.data.types import SliceRecord
from sam_ft.model.preprocess import SamTransform
from sam_ft.prompts.train_sampling import BoxPrompts
from sam_ft.prompts.types import Prompt

S = 64


def task_preset(cfg):
    """A task preset's task keys (presets like demo are global packages with a `task:` block)."""
    return cfg.task if "task" in cfg else cfg


def _record(k: int, h: int = 40, w: int = 50, index: int = 0) -> SliceRecord:
    """k horizontal bars of different rows; object j covers rows [4 + 8j, 10 + 8j)."""
    masks = np.zeros((k, h, w), dtype=bool)
    for j in range(k):
        masks[j, 4 + 8 * j : 10 + 8 * j, 5 : 20 + 5 * j] = True
    image = np.zeros((h, w, 3), dtype=np.uint8)
    image[masks.any(axis=0)] = 200
    labels = np.arange(1, k + 1, dtype=np.int64)
    return SliceRecord(f"case{index}", index, image, masks, labels, [f"o{j}" for j in labels])


def random_points(masks: np.ndarray, rng: np.random.Generator) -> list[Prompt]:
    """One random positive point per mask, (x, y) = (col, row)."""
    out = []
    for m in masks:
        rows, cols = np.nonzero(m)
        i = rng.integers(len(rows))
        out.append(Prompt(points=[[cols[i], rows[i]]], point_labels=[1]))
    return out


def _points(item: dict) -> list[tuple]:
    return [tuple(p.points[0]) for p in item["prompts"]]


def test_collate_varying_number_of_objects():
    ds = SliceDataset(
        [_record(1), _record(3, 30, 60, 1), _record(2, index=2)],
        SamTransform(S),
        tight_box_prompts,
        seed=0,
        with_masks=True,
        with_image_uint8=True,
        progress=False,
    )
    batch = collate_slices([ds[0], ds[1], ds[2]])
    assert batch["image"].shape == (3, 3, S, S) and "embedding" not in batch
    assert [t.shape for t in batch["target"]] == [(1, 16, 16), (3, 16, 16), (2, 16, 16)]
    assert [m.shape for m in batch["masks"]] == [(1, 40, 50), (3, 30, 60), (2, 40, 50)]
    assert batch["masks"][1].dtype == torch.bool
    assert [len(p) for p in batch["prompts"]] == [1, 3, 2]
    assert batch["original_size"] == [(40, 50), (30, 60), (40, 50)]
    assert batch["case"] == ["case0", "case1", "case2"] and batch["slice_index"] == [0, 1, 2]
    assert batch["labels"][1].tolist() == [1, 2, 3] and batch["labels"][1].dtype == torch.long
    assert batch["image_uint8"][1].shape == (30, 60, 3)
    # Tight box of object 1 of record 1: rows 12..17, cols 5..24 -> [x0, y0, x1, y1].
    np.testing.assert_array_equal(batch["prompts"][1][1].box, [5, 12, 24, 17])
    # Precomputed targets equal the transform's.
    expected = SamTransform(S).masks_to_low_res(ds.records[1].masks)
    torch.testing.assert_close(batch["target"][1], expected)
    with pytest.raises(ValueError, match="differ in keys"):
        collate_slices([ds[0], {k: v for k, v in ds[1].items() if k != "masks"}])


def test_sampler_order_is_a_function_of_seed_and_epoch():
    ds = list(range(23))

    def epoch_order(seed: int, epoch: int, **kw) -> list[tuple[int, int]]:
        s = SeededSampler(ds, seed=seed, **kw)
        s.set_epoch(epoch)
        return list(s)

    a = epoch_order(7, 3)
    assert a == epoch_order(7, 3)  # e.g. a resumed run
    assert {e for e, _ in a} == {3} and sorted(i for _, i in a) == list(range(23))
    assert [i for _, i in a] != [i for _, i in epoch_order(7, 4)]
    assert [i for _, i in a] != [i for _, i in epoch_order(8, 3)]
    assert [i for _, i in epoch_order(7, 5, shuffle=False, fixed_epoch=True)] == list(range(23))
    assert {e for e, _ in epoch_order(7, 5, shuffle=False, fixed_epoch=True)} == {0}
    # Two ranks share the epoch's order without overlap (padded to equal length).
    r0, r1 = (epoch_order(7, 3, num_replicas=2, rank=r) for r in (0, 1))
    assert len(r0) == len(r1) == 12
    assert set(i for _, i in r0) | set(i for _, i in r1) == set(range(23))


def test_item_randomness_depends_on_seed_epoch_index_only():
    records = [_record(5, index=i) for i in range(3)]
    tf = SamTransform(S)
    ds = SliceDataset(records, tf, random_points, seed=3, max_objects=2, progress=False)
    a, b = ds[(4, 1)], ds[(4, 1)]
    assert _points(a) == _points(b) and a["labels"].tolist() == b["labels"].tolist()
    assert len(a["prompts"]) == 2 and a["target"].shape == (2, 16, 16)
    # Over a few epochs the object subset and the prompts change.
    subsets = {tuple(ds[(e, 1)]["labels"].tolist()) for e in range(6)}
    points = {tuple(_points(ds[(e, 1)])) for e in range(6)}
    assert len(subsets) > 1 and len(points) > 1
    other = SliceDataset(records, tf, random_points, seed=4, max_objects=2, progress=False)
    assert {tuple(_points(other[(e, 1)])) for e in range(6)} != points
    # Each prompt lies on its object, and the target matches the kept objects.
    item = ds[(2, 0)]
    for p, label in zip(item["prompts"], item["labels"].tolist(), strict=True):
        x, y = p.points[0].astype(int)
        assert records[0].masks[label - 1, y, x]
    expected = SamTransform(S).masks_to_low_res(records[0].masks[item["labels"].numpy() - 1])
    torch.testing.assert_close(item["target"], expected)


def test_augmented_items_draw_prompts_from_augmented_masks():
    from sam_ft.data.augment import SliceAugment

    aug = SliceAugment({"enabled": True, "hflip_p": 1.0, "affine_p": 0.0})
    rec = _record(2)
    ds = SliceDataset([rec], SamTransform(S), BoxPrompts(), seed=0, augment=aug, progress=False)
    item = ds[0]
    flipped = rec.masks[:, :, ::-1]
    np.testing.assert_array_equal(item["prompts"][0].box, [50 - 20, 4, 50 - 6, 9])
    torch.testing.assert_close(item["target"], SamTransform(S).masks_to_low_res(flipped.copy()))


# ---------------------------------------------------------------------------------------------
# DataModule on the demo dataset


@pytest.fixture(scope="module")
def demo_task(tmp_path_factory):
    task = OmegaConf.to_container(task_preset(OmegaConf.load("conf/task/demo.yaml")))
    task["root"] = str(tmp_path_factory.mktemp("data") / "demo")
    return task


def _dm(task, tmp_path, run: str = "run", **data) -> SamDataModule:
    cfg = {"cache_dir": str(tmp_path / "cache"), "seed": 0, "batch_size": 3, **data}
    return SamDataModule(
        task_options(task),
        data_options(cfg),
        SamTransform(S),
        BoxPrompts(),
        seed=1,
        run_dir=tmp_path / run,
        progress=False,
    )


def test_datamodule_splits_cache_and_batches(demo_task, tmp_path):
    dm = _dm(demo_task, tmp_path, max_objects_per_image=2)
    dm.setup("fit")
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    ids = [c for s in ("train", "val", "test") for c in splits[s]]
    assert len(ids) == len(set(ids)) == 8 and all(splits[s] for s in ("train", "val", "test"))
    assert (tmp_path / "run" / "skipped.csv").is_file()
    for split in ("train", "val", "test"):
        assert {r.case for r in dm.records(split)} <= set(splits[split])
    assert dm.slice_cache.misses == 8 and dm.slice_cache.hits == 0

    train = next(iter(dm.train_dataloader()))
    assert train["image"].shape == (3, 3, S, S)
    assert "masks" not in train and "image_uint8" not in train
    for prompts, target in zip(train["prompts"], train["target"], strict=True):
        assert len(prompts) == len(target) <= 2
    val = next(iter(dm.val_dataloader()))
    assert {"masks", "image_uint8"} <= set(val) and val["original_size"][0] == (96, 96)
    test_cases = {c for b in dm._loader("test") for c in b["case"]}
    assert test_cases == set(splits["test"])

    # The next run reads every case from the slice cache and gets the same slices and 3D data.
    again = _dm(demo_task, tmp_path, run="run2")
    again.setup("test")
    # Only the split asked for is prepared (an evaluation reads no train/val case).
    n_test = len(splits["test"])
    assert again.slice_cache.hits == n_test and again.slice_cache.misses == 0
    with pytest.raises(RuntimeError, match="setup"):
        again.records("train")
    a, b = next(dm.iter_case_data("test")), next(again.iter_case_data("test"))
    np.testing.assert_array_equal(a.label_volume, b.label_volume)
    np.testing.assert_array_equal(a.affine, b.affine)
    assert (a.spacing, a.objects, a.slice_axis) == (b.spacing, b.objects, b.slice_axis)
    assert len(a.slices) == len(b.slices)
    np.testing.assert_array_equal(a.slices[3].masks, b.slices[3].masks)


def test_datamodule_embedding_cache(demo_task, tmp_path):
    torch.manual_seed(0)
    encoder = nn.Conv2d(3, 4, kernel_size=8, stride=8)
    calls = []

    def encode(x: torch.Tensor) -> torch.Tensor:
        calls.append(len(x))
        return encoder(x)

    # The encoder's own dtype (not the YAML's float16), so the cached embedding is exact.
    dm = _dm(demo_task, tmp_path, embedding_dtype=None)
    # Requested before setup (as a LightningModule.setup hook may): applied when setup runs.
    assert dm.use_embedding_cache(encode, encoder_fingerprint(encoder, dm.transform), "cpu")
    dm.setup("fit")
    assert sum(calls) == 0  # a split is encoded when its loader is first built
    batch = next(iter(dm.train_dataloader()))
    dm.val_dataloader()
    n = sum(len(dm.records(s)) for s in ("train", "val"))
    assert sum(calls) == n
    assert "image" not in batch and batch["embedding"].shape == (3, 4, 8, 8)
    rec = dm.dataset("train").records[batch_index(dm, batch)].load()
    with torch.no_grad():
        expected = encoder(dm.transform.apply_image(rec.image)[None])[0]
    torch.testing.assert_close(batch["embedding"][0], expected)

    # With augmentation, auto keeps images for train and caches val/test (all hits now).
    aug = _dm(demo_task, tmp_path, run="run2", augment={"enabled": True}, embedding_dtype=None)
    aug.setup("fit")
    assert aug.use_embedding_cache(encode, encoder_fingerprint(encoder, aug.transform), "cpu")
    assert sum(calls) == n
    assert "image" in next(iter(aug.train_dataloader()))
    assert "embedding" in next(iter(aug.val_dataloader()))
    off = _dm(demo_task, tmp_path, run="run3", cache_embeddings=False)
    assert not off.use_embedding_cache(encode, "x", "cpu")


def batch_index(dm: SamDataModule, batch: dict) -> int:
    """Dataset index of the first item of a train batch (via its case and slice)."""
    recs = dm.dataset("train").records
    key = (batch["case"][0], batch["slice_index"][0])
    return next(i for i, r in enumerate(recs) if (r.case, r.slice_index) == key)


def test_lightning_sets_the_epoch_even_with_persistent_workers():
    import lightning as L
    from torch.utils.data import DataLoader

    ds = SliceDataset(
        [_record(1, index=i) for i in range(6)], SamTransform(S), BoxPrompts(), 0, progress=False
    )
    sampler = SeededSampler(ds, seed=5)
    seen: dict[int, list[str]] = {}

    class Probe(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(1))

        def training_step(self, batch, batch_idx):
            seen.setdefault(self.current_epoch, []).extend(batch["case"])
            return (self.w**2).sum()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

        def train_dataloader(self):
            return DataLoader(
                ds, batch_size=2, sampler=sampler, collate_fn=collate_slices, num_workers=2,
                persistent_workers=True,
            )  # fmt: skip

    trainer = L.Trainer(
        max_epochs=3, accelerator="cpu", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(Probe())
    for epoch in range(3):
        assert seen[epoch] == [f"case{i}" for i in sampler.order(epoch)]
    assert seen[0] != seen[1]


@pytest.mark.parametrize("workers", [0, 2])
def test_resumable_loader_continues_where_its_state_was_taken(workers):
    """A loader restored from a mid-epoch state yields exactly the batches not yet served, then
    whole epochs again (what Lightning relies on for an exact resume)."""
    ds = SliceDataset(
        [_record(1, index=i) for i in range(7)], SamTransform(S), BoxPrompts(), 0, progress=False
    )

    def loader():
        return ResumableLoader(
            ds, batch_size=2, sampler=SeededSampler(ds, seed=3), collate_fn=collate_slices,
            num_workers=workers,
        )  # fmt: skip

    def epoch(dl, number):
        dl.sampler.set_epoch(number)
        return [tuple(int(i) for i in b["slice_index"]) for b in dl]

    first = loader()
    full = epoch(first, 1)
    assert len(full) == 4
    it = iter(first)
    next(it), next(it)
    state = first.state_dict()
    assert state == {"epoch": 1, "batches_served": 2}

    resumed = loader()
    resumed.load_state_dict(state)
    assert epoch(resumed, 1) == full[2:]
    assert epoch(resumed, 2) == epoch(loader(), 2)  # the next epoch is whole again

    done = loader()
    done.load_state_dict({"epoch": 1, "batches_served": 4})  # saved after the last batch
    assert epoch(done, 2) == epoch(loader(), 2)

    # trainer.limit_train_batches=3: the epoch ended after 3 of 4 batches; the resumed run
    # starts the next epoch whole (issue #24: it skipped 3 of its batches).
    limited = loader()
    limited.load_state_dict({"epoch": 1, "batches_served": 3})
    assert epoch(limited, 2) == epoch(loader(), 2)


# ---------------------------------------------------------------------------------------------
# The slice cache is the data set (issue #14)


def _index(dm: SamDataModule, split: str) -> list[tuple]:
    return [(r.case, r.slice_index, tuple(r.labels.tolist()), r.digest) for r in dm.records(split)]


def test_datasets_hold_only_an_index_and_read_items_from_disk(demo_task, tmp_path):
    import pickle

    dm = _dm(demo_task, tmp_path)
    dm.setup("fit")
    ds = dm.dataset("train")
    pixels = sum(int(np.prod(r.image_shape)) for r in ds.records)
    # What a DataLoader worker receives: the index, not the images (the old dataset held every
    # slice's RGB image and masks, > pixels bytes).
    assert len(pickle.dumps(ds)) < pixels / 10
    item = ds[(0, 0)]
    record = ds.records[0].load()
    torch.testing.assert_close(item["image"], dm.transform.apply_image(record.image))
    torch.testing.assert_close(item["target"], dm.transform.masks_to_low_res(record.masks))
    # Items read inside DataLoader worker processes equal those read here.
    workers = _dm(demo_task, tmp_path, run="run_w", num_workers=2)
    workers.setup("fit")
    for a, b in zip(dm.train_dataloader(), workers.train_dataloader(), strict=True):
        assert (a["case"], a["slice_index"]) == (b["case"], b["slice_index"])
        torch.testing.assert_close(a["image"], b["image"])
        torch.testing.assert_close(a["target"], b["target"])
    # Entries are read back whole, one case at a time, for evaluation.
    cases = list(dm.iter_case_data("val"))
    assert [c.image_id for c in cases] == [e.image_id for e in dm.case_entries("val")]
    assert sum(len(c.slices) for c in cases) == len(dm.records("val"))


def test_parallel_preprocessing_matches_serial_and_skips_bad_cases(demo_task, tmp_path, h):
    """2 prep workers build the same index as 1, and a broken case is skipped and logged."""
    import shutil
    from pathlib import Path

    from partial_api import prepare_task

    root = tmp_path / "task"
    shutil.copytree(prepare_task(demo_task), root)  # generates the demo when absent
    broken = sorted((root / "imagesTr").iterdir())[0]
    broken.write_bytes(b"this is not a nifti file" * 10)
    task = {**demo_task, "root": str(root)}
    serial = _dm(task, tmp_path / "a", prep_workers=1, on_error="skip")
    serial.setup("fit")
    parallel = _dm(task, tmp_path / "b", prep_workers=2, on_error="skip")
    parallel.setup("fit")
    for split in ("train", "val", "test"):
        assert _index(serial, split) == _index(parallel, split)
    assert parallel.slice_cache.misses == 8
    (skipped,) = h.read_skip_log(tmp_path / "b" / "run" / "skipped.csv")
    assert Path(skipped.path).name == broken.name and "unreadable" in skipped.reason
    # A second run over the same cache reads every good case from it.
    again = _dm(task, tmp_path / "b", run="run2", prep_workers=2, on_error="skip")
    again.setup("fit")
    assert again.slice_cache.hits == 7
    with pytest.raises(Exception, match=broken.name):
        _dm(task, tmp_path / "c", prep_workers=2).setup("fit")


def test_all_splits_share_one_preprocessing_pool(demo_task, tmp_path, monkeypatch):
    """``setup('fit')`` sends every split's cases through one pool (a pool per split idles a
    core on each split's last case), and indexes each split as preparing it alone does."""
    import sam_ft.data.preparation as preparation

    pools = []
    real_context = preparation.pool_context

    def counting_context():
        context = real_context()
        pools.append(context)
        return context

    monkeypatch.setattr(preparation, "pool_context", counting_context)
    together = _dm(demo_task, tmp_path / "a", prep_workers=2)
    together.setup("fit")
    assert len(pools) == 1
    one_by_one = _dm(demo_task, tmp_path / "b", prep_workers=2)
    for split in ("test", "val", "train"):
        one_by_one.prepare_split(split)
    # Alone, each split with more than one case starts its own pool.
    assert len(pools) == 1 + sum(
        len(together.case_entries(s)) > 1 for s in ("train", "val", "test")
    )
    for split in ("train", "val", "test"):
        assert _index(together, split) == _index(one_by_one, split)
        assert [e.case for e in together.case_entries(split)] == [
            e.case for e in one_by_one.case_entries(split)
        ]
    assert together.slice_cache.misses == one_by_one.slice_cache.misses == 8
