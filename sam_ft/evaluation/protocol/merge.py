"""Evaluation in shares: deterministic shards of the cases, and the merge of their folders.

A share (an ``eval.shard=K/N`` job, or one rank of a distributed evaluation) is an ordinary
evaluation folder of the engine (``per_object.csv``, ``per_case.csv``, ``clicks.csv``,
``progress.jsonl``, the best/worst overlay pool under ``.eval_state/``) over its cases only, plus
``shard.json``: which share it is, the cases it was given and the configuration that scored them.
:func:`merge_shards` checks that every share of one configuration is there, then writes into the
output folder exactly what one process over all the cases writes: the engine's tables are
rewritten in its canonical order (``order.sort_table``), floats are read back exactly
(``float_precision="round_trip"``), and the overlay pools are merged (the union of every share's
best/worst k holds the overall best/worst k).

Shares are balanced by slice count (the encoder runs once per slice): cases sorted by slice
count, largest first (ties by case id), each to the share with the fewest slices so far (ties
to the lowest share): the same split for the same cases on every machine.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from sam_ft.atomic import atomic_write_text
from sam_ft.errors import ConfigError, SamFtError
from sam_ft.evaluation.protocol.order import sort_table
from sam_ft.evaluation.protocol.tables import (
    CLICK_COLUMNS,
    CLICKS_CSV,
    PER_CASE_COLUMNS,
    PER_CASE_CSV,
    PER_OBJECT_COLUMNS,
    PER_OBJECT_CSV,
    PROPAGATION_COLUMNS,
    PROPAGATION_CSV,
    SKIPPED_COLUMNS,
    SKIPPED_CSV,
    STATE_DIR,
    has_rows,
    read_table,
)
from sam_ft.evaluation.protocol.tablesort import write_sorted

if TYPE_CHECKING:
    from sam_ft.evaluation.reports.summary import ReportTables

SHARD_FILE = "shard.json"


@dataclass(frozen=True)
class Shard:
    """Share ``index`` (0-based) of ``count``."""

    index: int
    count: int

    @property
    def name(self) -> str:
        return f"{self.index}/{self.count}"


def parse_shard(value: Any) -> Shard | None:
    """``eval.shard``: null (everything) or ``"K/N"``, 0 <= K < N (a SLURM array's
    ``$SLURM_ARRAY_TASK_ID`` is 0-based too)."""
    if value in (None, "", "null"):
        return None
    match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(value))
    if not match:
        raise ConfigError(f"eval.shard={value!r}: expected K/N, e.g. eval.shard=0/4")
    index, count = int(match.group(1)), int(match.group(2))
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"eval.shard={value!r}: K must be in 0..N-1 and N >= 1")
    return Shard(index, count)


def balanced_shares(keys: Sequence[str], slices: Sequence[int], count: int) -> list[list[int]]:
    """Indices of ``keys`` per share (each share in the cases' given order), balanced by
    ``slices`` (greedy largest-first; deterministic)."""
    totals = [0] * count
    shares: list[list[int]] = [[] for _ in range(count)]
    order = sorted(range(len(keys)), key=lambda i: (-int(slices[i]), str(keys[i])))
    for i in order:
        target = min(range(count), key=lambda s: (totals[s], s))
        shares[target].append(i)
        totals[target] += int(slices[i])
    return [sorted(share) for share in shares]


def write_shard_file(out_dir: Path, shard: Shard, cases: Sequence[str], config: Mapping) -> Path:
    """``shard.json``: the share, its cases and the configuration it was scored with."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / SHARD_FILE
    body = {"shard": shard.index, "of": shard.count, "cases": list(cases), "config": config}
    return atomic_write_text(path, json.dumps(body, indent=1, sort_keys=True, default=str))


def _flat(config: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(config, Mapping):
        out: dict[str, Any] = {}
        for key, value in config.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: config}


def _differences(a: Mapping, b: Mapping) -> list[str]:
    fa, fb = _flat(a), _flat(b)
    return [
        f"{k}={fa.get(k, '<absent>')!r} vs {fb.get(k, '<absent>')!r}"
        for k in sorted(set(fa) | set(fb))
        if fa.get(k, "<absent>") != fb.get(k, "<absent>")
    ]


def read_shards(dirs: Sequence[str | Path]) -> list[tuple[Path, dict]]:
    """(folder, shard.json) of every share, in share order; refuses a missing, repeated or
    foreign share, naming it."""
    found: list[tuple[Path, dict]] = []
    for d in map(Path, dirs):
        path = d / SHARD_FILE
        if not path.is_file():
            raise ConfigError(f"{d}: no {SHARD_FILE}; not an eval.shard=K/N folder")
        try:
            found.append((d, json.loads(path.read_text())))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: unreadable ({err})") from None
    if not found:
        raise ConfigError("no shard folders given")
    first_dir, first = found[0]
    by_index: dict[int, Path] = {}
    for d, meta in found:
        if meta["of"] != first["of"]:
            raise ConfigError(
                f"{d} is shard {meta['shard']}/{meta['of']} but {first_dir} is one of "
                f"{first['of']}: shards of different splits cannot be merged"
            )
        diffs = _differences(first["config"], meta["config"])
        if diffs:
            raise ConfigError(
                f"{d} was evaluated with another configuration than {first_dir}: "
                + "; ".join(diffs[:5])
            )
        if meta["shard"] in by_index:
            raise ConfigError(
                f"shard {meta['shard']}/{meta['of']} given twice: {by_index[meta['shard']]}, {d}"
            )
        by_index[meta["shard"]] = d
    count = first["of"]
    missing = [f"{k}/{count}" for k in range(count) if k not in by_index]
    if missing:
        given = ", ".join(f"{k}/{count} ({by_index[k]})" for k in sorted(by_index))
        raise ConfigError(f"shard {', '.join(missing)} missing (given: {given}); run it first")
    return sorted(found, key=lambda item: item[1]["shard"])


def merge_shards(dirs: Sequence[str | Path], out_dir: str | Path, *, title: str | None = None):
    """Merge share folders into ``out_dir``: the tables and report one process would write.

    Returns the report's ``{name: path}`` (``evaluation.reports.summary.write_report``).
    """
    report = merge_shards_with_overlays(dirs, out_dir, title=title)[0]
    return report.paths if report is not None else {}


def merge_shards_with_overlays(
    dirs: Sequence[str | Path], out_dir: str | Path, *, title: str | None = None
) -> tuple[ReportTables | None, dict[str, list]]:
    """:func:`merge_shards`, returning the report's tables (None without rows) and the merged
    best/worst overlay items (as ``engine.EvalResult.overlays``)."""
    from sam_ft.evaluation.protocol.options import eval_options
    from sam_ft.evaluation.reports.summary import write_report

    shards = read_shards(dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tables = {}
    for name, columns in (
        (PER_OBJECT_CSV, PER_OBJECT_COLUMNS),
        (PER_CASE_CSV, PER_CASE_COLUMNS),
        (CLICKS_CSV, CLICK_COLUMNS),
        (PROPAGATION_CSV, PROPAGATION_COLUMNS),
    ):
        if not any((d / name).exists() for d, _ in shards):
            continue  # e.g. clicks.csv of an evaluation without clicks
        parts = [d / name for d, _ in shards if (d / name).is_file()]
        # Streamed: the shares' rows are sorted in runs and merged, never held together.
        if not write_sorted(parts, out / name):
            atomic_write_text(out / name, pd.DataFrame(columns=columns).to_csv(index=False))
        if name != PER_OBJECT_CSV:  # the report reads per_object.csv in chunks
            tables[name] = read_table(out / name, columns)
    _merge_skipped([d for d, _ in shards], out)

    per_object = out / PER_OBJECT_CSV
    if not has_rows(per_object):
        return None, {}
    overlays = _merged_overlays(shards, out)
    clicks = tables.get(CLICKS_CSV)
    config = shards[0][1]["config"]
    report = write_report(
        out,
        per_object,
        tables.get(PER_CASE_CSV),
        clicks if clicks is not None and not clicks.empty else None,
        overlays=overlays or None,
        title=title or config.get("title") or "Evaluation summary",
        options=eval_options(config.get("eval")),
        seed=config.get("seed"),
    )
    return report, overlays


def _merge_skipped(dirs: Sequence[Path], out: Path) -> None:
    """``skipped.csv`` as one process leaves it: the data loader's rows (the same in every
    share, which all index every case; kept from ``out`` when it has them), then the engine's
    failed cases of all shares in table order."""

    def read(path: Path) -> pd.DataFrame:
        if not path.is_file() or not path.stat().st_size:
            return pd.DataFrame(columns=SKIPPED_COLUMNS)
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
        return df.reindex(columns=SKIPPED_COLUMNS, fill_value="")

    target = out / SKIPPED_CSV
    own = read(target)
    foreign = own[own["stage"] != "evaluate"]
    if foreign.empty:
        first = read(dirs[0] / SKIPPED_CSV)
        foreign = first[first["stage"] != "evaluate"]
    parts = [read(d / SKIPPED_CSV) for d in dirs]
    failed = pd.concat(parts, ignore_index=True)
    failed = failed[failed["stage"] == "evaluate"]
    failed = sort_table(failed) if not failed.empty else failed
    merged = pd.concat([foreign, failed], ignore_index=True)
    if not merged.empty or target.exists() or any((d / SKIPPED_CSV).exists() for d in dirs):
        merged.to_csv(target, index=False)


def _merged_overlays(shards: Sequence[tuple[Path, dict]], out: Path) -> dict[str, list]:
    """The best/worst overlays of all shares together, per model (the engine's pool files)."""
    from sam_ft.evaluation.protocol.best_worst import OverlayPool

    config = shards[0][1]["config"]
    k = int(config["eval"]["overlays"])  # the shares' eval.overlays (checked equal)
    overlays: dict[str, list] = {}
    for model in config.get("models", []):
        file = f"overlays_{model}_{config.get('task_name', '')}.npz"
        pool = OverlayPool(out / STATE_DIR / file, k)
        pool.items = {}  # a pool left in out_dir by an earlier merge is rebuilt, not added to
        for d, _ in shards:
            if (d / STATE_DIR / file).is_file():
                pool.offer(list(OverlayPool(d / STATE_DIR / file, k).items.values()))
        best, worst = pool.grids()
        if best:
            overlays[f"best_{model}"], overlays[f"worst_{model}"] = best, worst
    return overlays


def main(argv: Sequence[str] | None = None) -> int:
    """``sam-ft-report merge DIR... --out DIR``; returns the exit status (1 on a user error)."""
    parser = argparse.ArgumentParser(
        prog="sam-ft-report merge",
        description="Merge eval.shard=K/N folders into the files one evaluation writes.",
    )
    parser.add_argument("dirs", nargs="+", type=Path, help="the shard run folders")
    parser.add_argument("--out", type=Path, required=True, help="folder for the merged files")
    args = parser.parse_args(argv)
    try:
        report = merge_shards(args.dirs, args.out)
    except SamFtError as err:
        print(f"sam-ft-report merge: error: {err}", file=sys.stderr)
        return 1
    print(f"sam-ft-report merge: {len(args.dirs)} shards -> {args.out} ({len(report)} files)")
    return 0
