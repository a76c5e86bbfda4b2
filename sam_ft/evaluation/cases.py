"""The engine's inputs: cases given in memory or loaded lazily, one case loading ahead.

A case is a ``CaseData``, a list of ``SliceRecord`` of one image, or a :class:`LazyCase`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from sam_ft.data.types import SliceRecord


@dataclass
class LazyCase:
    """A case loaded only when evaluated, so loading errors are caught and recorded per case
    and finished cases are skipped on resume without being read.

    Attributes:
        case: the image id the loaded case will have (``CaseFiles.image_id``).
        load: returns a ``CaseData`` or a list of ``SliceRecord``; may raise ``DataError``.
        path: the case's file, shown in ``skipped.csv`` when the error names none.
    """

    case: str
    load: Callable[[], Any]
    path: str = ""


def lazy_cases(
    files: Iterable[Any], task: Mapping[str, Any], data: Mapping[str, Any] | None = None
) -> list[LazyCase]:
    """``CaseFiles`` (from ``sam_ft.data.folder.find_cases``) -> :class:`LazyCase` via
    ``sam_ft.data.loading.load_case``."""
    from functools import partial

    from sam_ft.data.loading import load_case

    return [LazyCase(f.image_id, partial(load_case, f, task, data), f.image) for f in files]


def case_key_of(item: Any) -> str:
    if isinstance(item, LazyCase):
        return str(item.case)
    if hasattr(item, "slices"):
        return str(getattr(item, "image_id", "") or item.case)
    records = list(item)
    if not records:
        raise ValueError("a case given as a list of SliceRecord must hold at least one slice")
    return str(records[0].image_id)


def _materialize(item: Any) -> tuple[list[SliceRecord], Any]:
    """-> (slice records, the CaseData or None)."""
    if isinstance(item, LazyCase):
        item = item.load()
    if hasattr(item, "slices"):
        return list(item.slices), item
    return list(item), None


def loaded_ahead(
    cases: Iterable[Any], finished: Callable[[str], bool]
) -> Iterator[tuple[Any, str, Future | None]]:
    """(item, case key, future of ``_materialize(item)``) per case, the next unfinished case
    loading in a thread while the caller evaluates this one (one case ahead: bounded memory).
    The future is None for a finished case (never loaded); its ``result()`` raises what loading
    raised, so a bad case fails where it is evaluated, as if loaded there."""
    with ThreadPoolExecutor(1, thread_name_prefix="eval-load") as loader:
        previous = None
        for item in cases:
            key = case_key_of(item)
            loaded = None if finished(key) else loader.submit(_materialize, item)
            if previous is not None:
                yield previous
            previous = (item, key, loaded)
        if previous is not None:
            yield previous
