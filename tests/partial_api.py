"""The data functions called as a user's script calls them with a partial ``task`` / ``data``
mapping: completed with ``task_options`` / ``data_options`` first, since the functions below the
task modules read no default (they take the complete groups ``parse_config`` builds)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sam_ft.data import folder, loading, splits, tasks
from sam_ft.data.tasks import data_options, task_options


def find_cases(root: str | Path, task: Any) -> list:
    return folder.find_cases(root, task_options(task))


def load_case(case: Any, task: Any, data: Any = None, **kwargs: Any) -> Any:
    return loading.load_case(case, task_options(task), data_options(data), **kwargs)


def load_cases(cases: Any, task: Any, data: Any = None, *args: Any, **kwargs: Any) -> list:
    return loading.load_cases(cases, task_options(task), data_options(data), *args, **kwargs)


def iter_cases(cases: Any, task: Any, data: Any = None, *args: Any, **kwargs: Any) -> Any:
    return loading.iter_cases(cases, task_options(task), data_options(data), *args, **kwargs)


def slice_settings(task: Any, data: Any = None) -> dict:
    return loading.slice_settings(task_options(task), data_options(data))


def dataset_meta(case: Any, task: Any) -> dict:
    return loading.dataset_meta(case, task_options(task))


def make_splits(cases: Any, data: Any = None) -> dict:
    return splits.make_splits(cases, data_options(data))


def prepare_task(task: Any, data_dir: str | Path | None = None) -> Path:
    return tasks.prepare_task(task_options(task), data_dir)


def task_root(task: Any, data_dir: str | Path | None = None) -> Path:
    return tasks.task_root(task_options(task), data_dir)


def load_image(path: Path, task: Any) -> Any:
    from sam_ft.inference.inputs import load_image as load

    return load(path, task_options(task))


def lazy_cases(files: Any, task: Any, data: Any = None) -> list:
    from sam_ft.evaluation.protocol.cases import lazy_cases as lazy

    return lazy(files, task_options(task), data_options(data))
