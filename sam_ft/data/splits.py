"""Train / val / test splits of CASE ids (patients), so no case has slices in two splits."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from sam_ft.atomic import atomic_write_text
from sam_ft.data.types import CaseFiles
from sam_ft.errors import ConfigError

SPLITS = ("train", "val", "test")
SPLITS_JSON = "splits.json"
T = TypeVar("T")


def split_case_ids(
    case_ids: Iterable[str], fractions: Sequence[float], seed: int
) -> dict[str, list[str]]:
    """Deterministic random split of unique case ids into train / val / test.

    Val and test get ``round(n * fraction)`` cases, but at least one each when there are >= 3
    cases and their fraction is > 0; train gets the rest. The result depends only on the SET of
    ids and the seed (ids are sorted before shuffling). Each list is sorted.
    """
    ids = sorted(set(case_ids))
    train_f, val_f, test_f = (float(f) for f in fractions)
    if min(train_f, val_f, test_f) < 0 or train_f + val_f + test_f <= 0:
        raise ConfigError(f"data.split fractions must be >= 0 and not all 0, got {fractions}")
    total = train_f + val_f + test_f
    n = len(ids)
    n_val = round(n * val_f / total)
    n_test = round(n * test_f / total)
    if n >= 3:
        n_val = max(n_val, 1 if val_f > 0 else 0)
        n_test = max(n_test, 1 if test_f > 0 else 0)
    # Train keeps at least one case when it has a fraction and there is room.
    while n_val + n_test > n - (1 if train_f > 0 and n >= 3 else 0) and (n_val or n_test):
        if n_val >= n_test and n_val > 0:
            n_val -= 1
        else:
            n_test -= 1
    order = np.random.default_rng(seed).permutation(n)
    shuffled = [ids[i] for i in order]
    out = {
        "test": shuffled[:n_test],
        "val": shuffled[n_test : n_test + n_val],
        "train": shuffled[n_test + n_val :],
    }
    return {k: sorted(out[k]) for k in SPLITS}


def read_split_file(path: str | Path) -> dict[str, list[str]]:
    """A json ``{"train": [...], "val": [...], "test": [...]}`` of case ids (missing keys: [])."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"data.split.file {path}: cannot read ({e})") from e
    if not isinstance(raw, dict) or set(raw) - set(SPLITS):
        raise ConfigError(f"data.split.file {path}: expected keys {SPLITS}, got {list(raw)}")
    splits = {k: [str(c) for c in raw.get(k, [])] for k in SPLITS}
    check_disjoint(splits, source=str(path))
    return splits


def check_disjoint(splits: Mapping[str, Iterable[str]], source: str = "splits") -> None:
    """Raise :class:`ConfigError` if a case id appears in two splits (or twice in one)."""
    seen: dict[str, str] = {}
    for name, ids in splits.items():
        for cid in ids:
            if cid in seen:
                raise ConfigError(f"{source}: case {cid!r} is in both {seen[cid]} and {name}")
            seen[cid] = name


def make_splits(cases: Sequence[CaseFiles], data: Mapping[str, Any]) -> dict[str, list[CaseFiles]]:
    """Assign the task's cases to train / val / test from ``data.split`` and ``data.seed``.

    With ``data.split.file`` the file decides (ids it names that do not exist raise; cases it does
    not name are left out); otherwise :func:`split_case_ids`. All images of one case (see
    ``task.case_pattern``) go to the same split.
    """
    split = data["split"]
    ids = {c.case for c in cases}
    if split.get("file"):
        by_id = read_split_file(split["file"])
        unknown = sorted({cid for v in by_id.values() for cid in v} - ids)
        if unknown:
            shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
            raise ConfigError(f"data.split.file {split['file']}: unknown case ids {shown}")
    else:
        fractions = (split["train"], split["val"], split["test"])
        by_id = split_case_ids(ids, fractions, int(data["seed"]))
    where = {cid: name for name, v in by_id.items() for cid in v}
    out: dict[str, list[CaseFiles]] = {k: [] for k in SPLITS}
    for c in cases:
        if c.case in where:
            out[where[c.case]].append(c)
    return out


def case_ids(splits: Mapping[str, Sequence[Any]]) -> dict[str, list[str]]:
    """{split: sorted unique case ids} from splits of ids, CaseFiles, CaseData or SliceRecords."""
    return {
        k: sorted({v if isinstance(v, str) else v.case for v in items})
        for k, items in splits.items()
    }


def write_splits(splits: Mapping[str, Sequence[Any]], path: str | Path) -> Path:
    """Write the split's case ids as json (``<path>/splits.json`` when ``path`` is a directory).

    The file can be passed back as ``data.split.file`` to reproduce the split.
    """
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path = path / SPLITS_JSON
    ids = case_ids(splits)
    check_disjoint(ids)
    return atomic_write_text(path, json.dumps({k: ids.get(k, []) for k in SPLITS}, indent=2) + "\n")
