"""Preprocess cases into the slice cache, in parallel: one case per ``data.prep_workers`` process
at a time, only the entry's header (its index) travels back; a cache entry converts to and from
:class:`~sam_ft.data.loading.CaseData`."""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import signal
import typing
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam_ft.atomic import remove_temp_files_of
from sam_ft.data.cache import CachedCase, SliceCache, read_entry
from sam_ft.data.loading import CaseData, dataset_meta, load_case, slice_settings
from sam_ft.data.types import CaseFiles
from sam_ft.errors import DataError


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


@dataclasses.dataclass(frozen=True)
class CaseEntry:
    """One preprocessed case of a split: its id and its slice-cache entry file."""

    image_id: str
    case: str
    path: str
    image: str


def load_case_entry(entry: CaseEntry) -> CaseData:
    """The whole case (slices with images, label volume, affine) read from its cache entry."""
    return _entry_to_case(read_entry(entry.path))


def case_settings(case: CaseFiles, task: Mapping[str, Any], data: Mapping[str, Any]) -> dict:
    """Every option the case's slices depend on: the slicing settings and, since dataset.json
    names the labels and may set the modality (window, slicing axis), that file's content."""
    return {**slice_settings(task, data), "dataset_json": dataset_meta(case, task)}


def _prepare_case(
    case: CaseFiles, task: Mapping[str, Any], data: Mapping[str, Any], cache_root: str | None
) -> tuple[CaseFiles, tuple | None, tuple[str, str] | None, bool]:
    """Preprocess one case into the slice cache (a hit is verified whole, no NIfTI read).

    Runs in a ``data.prep_workers`` process: the case's volume lives only here, and only the
    entry's (header, facts) (see ``SliceCache.ensure``) travel back. Returns (case, (header,
    facts), None, hit) or (case, None, (path, reason), hit) for a ``DataError``; ``hit``: the
    entry was already cached.
    """
    cache = SliceCache(cache_root)
    try:
        settings = case_settings(case, task, data)
        found = cache.ensure(case, settings, lambda: _case_to_entry(load_case(case, task, data)))
    except DataError as e:
        return case, None, (e.path, e.reason), cache.hits > 0
    return case, found, None, cache.hits > 0


def prep_workers(setting: Any, n_cases: int, local_ranks: int = 1) -> int:
    """``data.prep_workers`` -> a process count (null = this rank's cores: its node's
    allocation divided among the ``local_ranks`` DDP processes on the node, which preprocess
    their shares at the same time; :func:`sam_ft.cores.cores_per_rank`)."""
    if setting is None:
        from sam_ft.cores import cores_per_rank

        setting = cores_per_rank(local_ranks)
    return max(1, min(int(setting), n_cases))


def pool_context() -> mp.context.BaseContext:
    """fork (fast: no re-import) unless CUDA is initialised here, which a fork cannot inherit."""
    if mp.get_start_method(allow_none=True) in (None, "fork") and not torch.cuda.is_initialized():
        return mp.get_context("fork")
    return mp.get_context("spawn")


def worker_init() -> None:
    """A pool worker ends on ``pool.terminate()``'s SIGTERM whatever handler its parent had: a
    forked worker inherits it, and under submitit (SLURM) that handler ignores SIGTERM, which
    left ``pool.join()`` waiting forever."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def prepare_star(args: tuple) -> tuple:
    """``_prepare_case`` on one tuple of arguments (what ``Pool.imap`` passes)."""
    return _prepare_case(*args)


@contextlib.contextmanager
def prep_pool(workers: int, cache_root: str | Path | None) -> Iterator[Callable]:
    """An ordered ``map`` of :func:`prepare_star` over ``workers`` processes (in this process
    for one). The pool ends with the block; when the block fails, its workers are killed in
    the middle of their cases and the half-written cache entries they leave in ``cache_root``
    are removed (another process's, such as another rank's, stay)."""
    if workers <= 1:
        yield partial(map, prepare_star)
        return
    pool = pool_context().Pool(workers, worker_init)
    pids = [p.pid for p in pool._pool]  # Pool keeps its processes here
    failed = False
    try:
        yield partial(pool.imap, prepare_star)
    except BaseException:
        failed = True
        raise
    finally:
        pool.terminate()
        pool.join()
        if failed and cache_root is not None:
            remove_temp_files_of(cache_root, pids)
