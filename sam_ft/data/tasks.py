"""Tasks: a dataset, the objects to segment in it and its modality settings (``conf/task/``).

Every source ends up as a folder in the Medical Segmentation Decathlon / nnU-Net layout (or a
preset's own ``images_dir`` / ``labels_dir``) that :mod:`sam_ft.data.folder` reads:

* ``folder``: ``task.root`` must exist.
* ``decathlon``: downloaded with MONAI's URL and md5 (progress bar, checksum) into
  ``task.root`` (default ``${paths.data_dir}/<TaskXX_Name>``) when absent.
* ``demo``: generated on first use by :mod:`sam_ft.data.demo` (no download).

Task keys (defaults in :data:`TASK_DEFAULTS`): ``name, source, root, decathlon_task, url, md5,
modality, intensity {mode, level, width, lower, upper, scope, keep_zero},
labels ({name: [values]} or null), ignore_labels, slice_axis (auto|0|1|2), channel,
label_binarize (false | true | threshold), case_pattern, images_dir,
labels_dir (dir or list of binary-mask dirs), label_name, layout``.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from sam_ft.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TASK_DEFAULTS: dict[str, Any] = {
    "name": "folder",
    "source": "folder",
    "root": None,
    "decathlon_task": None,
    "url": None,
    "md5": None,
    "modality": None,
    "intensity": {"mode": "percentile", "scope": "slice", "keep_zero": True},
    "labels": None,
    "ignore_labels": [],
    "slice_axis": "auto",
    "channel": 0,
    "label_binarize": False,
    "case_pattern": None,
    "images_dir": "imagesTr",
    "labels_dir": "labelsTr",
    "label_name": "{stem}",
    "demo_variant": "3d",
    "layout": "imagesTr/<case>[_0000].nii.gz|.nii|.png|.jpg (or DICOM series folders) "
    "+ labelsTr/<case>.nii.gz|.png, optional dataset.json",
}

DATA_DEFAULTS: dict[str, Any] = {
    "min_object_pixels": 50,
    "on_error": "raise",
    "affine_atol": 1e-3,
    "split": {"train": 0.7, "val": 0.1, "test": 0.2, "file": None},
    "seed": 0,
}

# The ten MSD tasks: preset name -> MONAI / MSD task folder name.
DECATHLON_TASKS: dict[str, str] = {
    "brain_tumour_mri": "Task01_BrainTumour",
    "heart_mri": "Task02_Heart",
    "liver_ct": "Task03_Liver",
    "hippocampus_mri": "Task04_Hippocampus",
    "prostate_mri": "Task05_Prostate",
    "lung_tumour_ct": "Task06_Lung",
    "pancreas_ct": "Task07_Pancreas",
    "hepatic_vessel_ct": "Task08_HepaticVessel",
    "spleen_ct": "Task09_Spleen",
    "colon_tumour_ct": "Task10_Colon",
}

SOURCES = ("folder", "decathlon", "demo")


def to_plain(cfg: Any) -> Any:
    """DictConfig / ListConfig -> plain dict / list (resolved); other values unchanged."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf

        if isinstance(cfg, DictConfig | ListConfig):
            return OmegaConf.to_container(cfg, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return cfg


def task_options(task: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The task config as a plain dict with every key of :data:`TASK_DEFAULTS` filled in."""
    opts = {**TASK_DEFAULTS, **(to_plain(task) or {})}
    opts["intensity"] = {**TASK_DEFAULTS["intensity"], **(opts.get("intensity") or {})}
    if opts["source"] not in SOURCES:
        raise ConfigError(f"task.source must be one of {SOURCES}, got {opts['source']!r}")
    if opts["labels"] is not None:
        groups = {}
        for name, values in dict(opts["labels"]).items():
            values = [values] if isinstance(values, int | float) else list(values)
            if not values or any(int(v) != v or v <= 0 for v in values):
                raise ConfigError(
                    f"task.labels.{name} must be one or more positive integers, got {values}"
                )
            groups[str(name)] = [int(v) for v in values]
        opts["labels"] = groups
    if opts["slice_axis"] not in ("auto", 0, 1, 2):
        raise ConfigError(f"task.slice_axis must be auto, 0, 1 or 2, got {opts['slice_axis']!r}")
    return opts


def data_options(data: Mapping[str, Any] | Any | None) -> dict[str, Any]:
    """The data config as a plain dict with :data:`DATA_DEFAULTS` filled in."""
    opts = {**DATA_DEFAULTS, **(to_plain(data) or {})}
    opts["split"] = {**DATA_DEFAULTS["split"], **(opts.get("split") or {})}
    if opts["on_error"] not in ("raise", "skip"):
        raise ConfigError(f"data.on_error must be 'raise' or 'skip', got {opts['on_error']!r}")
    return opts


def task_root(task: Mapping[str, Any], data_dir: str | Path | None = None) -> Path:
    """The folder the task reads, from ``task.root`` or ``<data_dir>/<default folder>``."""
    opts = task_options(task)
    if opts["root"]:
        return Path(str(opts["root"])).expanduser()
    if data_dir is None:
        raise ConfigError(f"task {opts['name']}: set task.root (or paths.data_dir)")
    if opts["source"] == "decathlon":
        return Path(data_dir) / _decathlon_name(opts)
    return Path(data_dir) / str(opts["name"])


def prepare_task(task: Mapping[str, Any], data_dir: str | Path | None = None) -> Path:
    """Make the task's folder available (download / generate when absent) and return it.

    Raises:
        DataError: the folder of a ``folder`` task is missing (the message gives the layout), or
            a download failed.
    """
    opts = task_options(task)
    root = task_root(opts, data_dir)
    if opts["source"] == "demo":
        from sam_ft.data.demo import ensure_demo

        return ensure_demo(root, variant="2d" if opts.get("demo_variant") == "2d" else "3d")
    if opts["source"] == "decathlon":
        return ensure_decathlon(opts, root)
    if not (root / opts["images_dir"]).is_dir():
        raise DataError(
            str(root),
            f"task '{opts['name']}' folder not found or incomplete; "
            f"expected layout: {opts['layout']}",
        )
    return root


def _decathlon_name(opts: Mapping[str, Any]) -> str:
    name = opts.get("decathlon_task") or DECATHLON_TASKS.get(str(opts.get("name")))
    if not name:
        raise ConfigError(f"task {opts.get('name')}: source=decathlon needs task.decathlon_task")
    return str(name)


def decathlon_resource(decathlon_task: str) -> tuple[str, str]:
    """(url, md5) of an MSD task, exactly as ``monai.apps.DecathlonDataset`` downloads it."""
    from monai.apps import DecathlonDataset

    if decathlon_task not in DecathlonDataset.resource:
        known = ", ".join(sorted(DecathlonDataset.resource))
        raise ConfigError(f"task.decathlon_task {decathlon_task!r} unknown; one of: {known}")
    return DecathlonDataset.resource[decathlon_task], DecathlonDataset.md5[decathlon_task]


def download_and_extract(**kwargs: Any) -> None:
    """MONAI's ``download_and_extract`` (indirection so tests can observe the call)."""
    from monai.apps import download_and_extract as _download_and_extract

    _download_and_extract(**kwargs)


def ensure_decathlon(task: Mapping[str, Any], root: Path) -> Path:
    """Download and extract an MSD task into ``root`` unless ``root/imagesTr`` already exists.

    The archive (``<root.parent>/<TaskXX_Name>.tar``) is checked against MONAI's md5 and extracted
    next to it; ``task.url`` / ``task.md5`` override the source (e.g. a local mirror).
    """
    opts = task_options(task)
    name = _decathlon_name(opts)
    if (root / opts["images_dir"]).is_dir():
        return root
    url, md5 = decathlon_resource(name)
    if opts.get("url"):
        url, md5 = str(opts["url"]), opts.get("md5")
    root.parent.mkdir(parents=True, exist_ok=True)
    archive = root.parent / f"{name}.tar"
    from filelock import FileLock

    # Several processes (DDP ranks) may start together: one downloads, the others wait.
    with FileLock(str(root.parent / f".{name}.lock")):
        if (root / opts["images_dir"]).is_dir():
            return root
        log.info("downloading %s from %s into %s", name, url, root.parent)
        try:
            if url.startswith("file://"):
                # A local mirror: MONAI's downloader speaks http(s) only, so copy the archive,
                # then let MONAI check its md5 and extract it.
                from monai.apps.utils import check_hash, extractall

                shutil.copyfile(url2pathname(urlparse(url).path), archive)
                if not check_hash(archive, md5, "md5"):
                    archive.unlink()
                    raise ValueError(f"md5 check of {archive} failed")
                extractall(filepath=archive, output_dir=root.parent, has_base=True)
            else:
                download_and_extract(
                    url=url,
                    filepath=str(archive),
                    output_dir=str(root.parent),
                    hash_val=md5,
                    hash_type="md5",
                    progress=True,
                )
        except Exception as e:  # network, checksum or archive errors all end the same way
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                url,
                f"download of {name} failed ({msg}); download it yourself and extract it so that "
                f"{root}/{opts['images_dir']} exists",
            ) from e
    if not (root / opts["images_dir"]).is_dir():
        raise DataError(str(root), f"archive {archive} did not contain {name}/{opts['images_dir']}")
    return root


def read_dataset_json(root: str | Path) -> dict[str, Any]:
    """``root/dataset.json`` as a dict ({} when absent)."""
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DataError(str(path), f"unreadable dataset.json ({e})") from e


def dataset_label_groups(meta: Mapping[str, Any]) -> dict[str, list[int]] | None:
    """Object groups named in a dataset.json, background excluded; None when it has no labels.

    Reads MSD (``{"1": "liver"}``) and nnU-Net v2 (``{"liver": 1}`` or region lists) styles.
    """
    labels = meta.get("labels")
    if not labels:
        return None
    groups: dict[str, list[int]] = {}
    for key, value in labels.items():
        if str(key).lstrip("-").isdigit():  # MSD: value -> name
            if int(key) != 0:
                groups[str(value)] = [int(key)]
        else:  # nnU-Net v2: name -> value(s)
            values = [value] if isinstance(value, int | float) else list(value)
            values = [int(v) for v in values if int(v) != 0]
            if values:
                groups[str(key)] = values
    return groups


def object_groups(task: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, list[int]] | None:
    """The task's objects ({name: [label values]}), or None for "each value present is one"."""
    opts = task_options(task)
    return opts["labels"] if opts["labels"] is not None else dataset_label_groups(meta)


def task_modality(task: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """``task.modality``, else the dataset.json modality of the used channel, else ``""``."""
    opts = task_options(task)
    if opts.get("modality"):
        return str(opts["modality"])
    modality = meta.get("modality") or meta.get("channel_names") or {}
    if isinstance(modality, Mapping):
        value = modality.get(str(opts.get("channel") or 0)) or next(iter(modality.values()), "")
        return str(value)
    return str(modality)
