"""What the start-up and the model card take from the slice index, read from its columns
(issue #28: no ``SliceRef`` per slice at a million slices) and equal to a walk over the
``SliceRef`` the index gives slice by slice."""

from __future__ import annotations

import hashlib
from types import SimpleNamespace

import numpy as np

from sam_ft.data.slice_index import build_index
from sam_ft.evaluation.protocol.distributed import _cases_digest
from sam_ft.inference.card import trained_facts


def _index(cases: int = 5, slices: int = 4):
    """Cases of ``slices`` slices; objects named by their label, one name carrying two label
    values across slices, some slices with no object, image ids empty on one case (the case
    then names its slices) and the modality empty on another."""
    rng = np.random.default_rng(0)
    entries = []
    for c in range(cases):
        rows = []
        for i in range(slices):
            k = int(rng.integers(0, 4))
            labels = [int(v) for v in rng.choice([1, 2, 3, 7], size=k, replace=False)]
            names = ["lesion" if v in (3, 7) else f"organ{v}" for v in labels]
            rows.append(
                {"case": f"p{c}", "slice_index": 10 + 3 * i, "image_shape": [8, 8],
                 "masks_shape": [k, 8, 8], "labels": labels, "names": names,
                 "digest": hashlib.sha256(f"{c}/{i}".encode()).hexdigest(),
                 "spacing": [1.0, 1.0], "slice_spacing": 2.5, "num_slices": slices,
                 "has_raw": False, "image_id": "" if c == 1 else f"img{c}",
                 "modality": "" if c == 2 else ("CT" if c % 2 else "MR")}
            )  # fmt: skip
        facts = {"path": f"/cache/e{c}.npz", "stamp": (1, 2, 3), "sha256": "00" * 32}
        entries.append((f"p{c}", f"img{c}", f"src{c}", {"slices": rows}, facts))
    return build_index(entries)


def test_slice_keys_labels_and_modalities_equal_a_walk_over_the_refs():
    index = _index()
    refs = list(index)  # one SliceRef per slice: the reference walk
    walked = [(str(r.image_id or r.case), f"{r.slice_index}:{r.digest}") for r in refs]
    assert list(index.slice_keys(chunk=3)) == walked
    assert any(key == "p1" for key, _ in walked)  # the case names an image without an id
    first: dict[str, int] = {}
    for r in refs:
        for name, value in zip(r.names, r.labels.tolist(), strict=True):
            first.setdefault(name, value)
    assert index.first_labels() == first and list(index.first_labels()) == list(first)
    assert index.modalities() == sorted({r.modality for r in refs if r.modality}) == ["CT", "MR"]


def test_digest_and_card_facts_from_columns_equal_those_from_refs():
    index = _index()

    def datamodule(split_index):
        def records(split):
            if split != "train":
                raise RuntimeError("not prepared")
            return split_index

        return SimpleNamespace(
            records=records,
            case_entries=lambda split: index.case_entries(),
            task={"labels": {"lesion": [3, 7]}},
        )

    keys = [f"img{c}" for c in range(5)] + ["p1"]
    slices = [4] * 6
    by_columns = _cases_digest(keys, slices, datamodule(index))
    assert by_columns == _cases_digest(keys, slices, datamodule(list(index)))
    assert by_columns != _cases_digest(keys, [4] * 5 + [3], datamodule(index))
    facts = trained_facts(datamodule(index))
    assert facts == trained_facts(datamodule(list(index)))
    assert facts["labels"]["lesion"] == [3, 7] and facts["modality"] == "CT"
