"""The engine's inputs: cases given in memory or loaded lazily, one case loading ahead.

A case (:data:`Case`) is a ``CaseData``, a list of ``SliceRecord`` of one image, or a
:class:`LazyCase`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeAlias

from sam_ft.data.loading import CaseData
from sam_ft.data.types import CaseFiles, SliceRecord


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
    load: Callable[[], CaseData | Sequence[SliceRecord]]
    path: str = ""


Case: TypeAlias = CaseData | Sequence[SliceRecord] | LazyCase
"""What the engine evaluates: a loaded case (with its label volume and affine, for 3D scores
against the whole volume and NIfTI export), the kept slices of one image alone, or a case loaded
only when it is evaluated."""


def lazy_cases(
    files: Iterable[CaseFiles], task: Mapping[str, Any], data: Mapping[str, Any]
) -> list[LazyCase]:
    """``CaseFiles`` (from ``sam_ft.data.folder.find_cases``) -> :class:`LazyCase` via
    ``sam_ft.data.loading.load_case`` (``task``, ``data``: the complete groups)."""
    from functools import partial

    from sam_ft.data.loading import load_case

    return [LazyCase(f.image_id, partial(load_case, f, task, data), f.image) for f in files]


def case_key_of(item: Case) -> str:
    """The ``case`` column of ``item``: its image id."""
    if isinstance(item, LazyCase):
        return str(item.case)
    if isinstance(item, CaseData):
        return str(item.image_id or item.case)
    records = list(item)
    if not records:
        raise ValueError("a case given as a list of SliceRecord must hold at least one slice")
    return str(records[0].image_id)


def case_path(item: Case) -> str:
    """The file ``item`` comes from ("" for bare slice records): named in ``skipped.csv``
    when its loading fails without naming one."""
    if isinstance(item, LazyCase):
        return item.path
    return item.image_path if isinstance(item, CaseData) else ""


def _materialize(item: Case) -> tuple[list[SliceRecord], CaseData | None]:
    """-> (slice records, the CaseData or None)."""
    if isinstance(item, LazyCase):
        item = item.load()
    if isinstance(item, CaseData):
        return list(item.slices), item
    return list(item), None


def loaded_ahead(
    cases: Iterable[Case], finished: Callable[[str], bool]
) -> Iterator[tuple[Case, str, Future | None]]:
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
