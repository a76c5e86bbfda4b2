"""Splits by case: deterministic, disjoint, small datasets, split files, grouped patients."""

from __future__ import annotations

import json

import numpy as np
import pytest
from partial_api import find_cases, load_cases, make_splits

from sam_ft.data.splits import (
    SPLITS,
    check_disjoint,
    read_split_file,
    split_case_ids,
    write_splits,
)
from sam_ft.data.types import CaseFiles
from sam_ft.errors import ConfigError

IDS = [f"case_{i:02d}" for i in range(20)]
FRACTIONS = (0.7, 0.1, 0.2)  # the sizes below are computed for these


def test_deterministic_and_seeded():
    a = split_case_ids(IDS, FRACTIONS, seed=3)
    assert a == split_case_ids(
        list(reversed(IDS)), FRACTIONS, seed=3
    )  # order of input does not matter
    assert a != split_case_ids(IDS, FRACTIONS, seed=4)
    assert [len(a[k]) for k in SPLITS] == [14, 2, 4]
    assert sorted(a["train"] + a["val"] + a["test"]) == IDS
    check_disjoint(a)


@pytest.mark.parametrize(("n", "sizes"), [(3, [1, 1, 1]), (4, [2, 1, 1]), (10, [7, 1, 2])])
def test_small_datasets_keep_val_and_test(n, sizes):
    s = split_case_ids([str(i) for i in range(n)], FRACTIONS, 0)
    assert [len(s[k]) for k in SPLITS] == sizes


def test_split_file_and_write_round_trip(tmp_path):
    cases = [CaseFiles(c, f"{c}.png", f"{c}_l.png") for c in IDS[:5]]
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": IDS[:3], "val": [IDS[3]], "test": [IDS[4]]}))
    splits = make_splits(cases, {"split": {"file": str(path)}})
    assert [c.case for c in splits["val"]] == [IDS[3]]
    written = write_splits(splits, tmp_path / "run")
    assert written.name == "splits.json"
    assert read_split_file(written) == {"train": IDS[:3], "val": [IDS[3]], "test": [IDS[4]]}
    path.write_text(json.dumps({"train": ["ghost"], "val": [], "test": []}))
    with pytest.raises(ConfigError, match="ghost"):
        make_splits(cases, {"split": {"file": str(path)}})
    path.write_text(json.dumps({"train": [IDS[0]], "val": [IDS[0]], "test": []}))
    with pytest.raises(ConfigError, match="both train and val"):
        read_split_file(path)


def test_no_case_has_slices_in_two_splits(tmp_path, h):
    # 7 images of 4 patients: every image of a patient must land in the same split.
    root = tmp_path / "derm"
    mask = np.zeros((16, 16), np.uint8)
    mask[2:12, 2:12] = 255
    for p in range(4):
        for k in range(1 + p % 3):
            h.write_png(root / "imagesTr" / f"pat{p}_{k}.png", np.full((16, 16), 50 + k))
            h.write_png(root / "labelsTr" / f"pat{p}_{k}.png", mask)
    task = {
        "root": str(root),
        "case_pattern": r"^(pat\d+)_",
        "label_binarize": True,
        "intensity": {"mode": "none"},
    }
    cases = find_cases(root, task)
    splits = make_splits(cases, {"seed": 1})
    loaded = {k: load_cases(v, task, progress=False) for k, v in splits.items()}
    slice_cases = {k: {s.case for d in v for s in d.slices} for k, v in loaded.items()}
    for a in SPLITS:
        for b in SPLITS:
            if a < b:
                assert not slice_cases[a] & slice_cases[b], (a, b)
    assert sum(len(v) for v in loaded.values()) == len(cases) == 7
    assert all(len(slice_cases[k]) >= 1 for k in SPLITS)
