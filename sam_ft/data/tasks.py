"""Tasks: a dataset, the objects to segment in it and its modality settings (``conf/task/``).

Every source ends up as a folder in the Medical Segmentation Decathlon / nnU-Net layout (or a
preset's own ``images_dir`` / ``labels_dir``) that :mod:`sam_ft.data.folder` reads:

* ``folder``: ``task.root`` must exist.
* ``decathlon``: downloaded with MONAI's URL and md5 (progress bar, checksum) into
  ``task.root`` (default ``${paths.data_dir}/<TaskXX_Name>``) when absent, after checking the
  location and the free disk space; the archive is removed after a verified extraction.
* ``demo``: generated on first use by :mod:`sam_ft.data.demo` (no download).
* ``mni152``: real MRI (nilearn's MNI152 template and tissue maps) prepared on first use by
  :mod:`sam_ft.data.mni152` (no download).

Task keys (declared in :class:`sam_ft.config.TaskConfig`; defaults in ``conf/task/folder.yaml``,
the base task, and ``data`` defaults in ``conf/data/default.yaml``, read by
:func:`sam_ft.defaults.group_defaults`; the functions here take the complete ``task`` dict,
which ``parse_config`` or :func:`task_options` builds): ``name, source, root, decathlon_task,
url, md5, modality, intensity {mode, level, width, lower, upper, scope, keep_zero},
labels ({name: [values]} or null), ignore_labels, slice_axis (auto|0|1|2), channel,
label_binarize (false | true | threshold), case_pattern, images_dir,
labels_dir (dir or list of binary-mask dirs), label_name, layout, demo_variant, keep_archive``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse
from urllib.request import url2pathname

from sam_ft.data.skips import check_on_error
from sam_ft.defaults import folder_name, group_defaults
from sam_ft.errors import ConfigError, DataError

log = logging.getLogger(__name__)

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

SOURCES = ("folder", "decathlon", "demo", "mni152")
SLICE_AXES = ("auto", 0, 1, 2)  # task.slice_axis: auto or a RAS axis


def to_plain(cfg: Any) -> Any:
    """A config group as plain dicts and lists: a typed group (a dataclass of
    :mod:`sam_ft.config`) without the optional keys its YAML did not set (as Hydra's config had
    them); any other mapping or list (a partial one from Python) copied; other values unchanged.
    """
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {
            f.name: to_plain(getattr(cfg, f.name))
            for f in dataclasses.fields(cfg)
            if not (getattr(cfg, f.name) is None and f.metadata.get("optional"))
        }
    if isinstance(cfg, Mapping):
        return {k: to_plain(v) for k, v in cfg.items()}
    if isinstance(cfg, Sequence) and not isinstance(cfg, str | bytes | tuple):
        return [to_plain(v) for v in cfg]
    return cfg


def plain_group(group: Any, typed: str, completes: str) -> dict[str, Any]:
    """A typed group (``sam_ft.config.<typed>``, matched by name: config imports data) or a
    complete plain dict -> a plain dict, once; nothing is filled in.

    Raises:
        TypeError: anything else, e.g. a Hydra DictConfig (``parse_config`` types it); the
            message names ``completes``, the function that completes a partial dict.
    """
    if type(group).__name__ == typed and dataclasses.is_dataclass(group):
        return to_plain(group)
    if type(group) is dict:
        return to_plain(group)
    raise TypeError(
        f"SamDataModule takes sam_ft.config.{typed} (from parse_config) or a complete dict "
        f"(sam_ft.data.tasks.{completes}), got {type(group).__name__}"
    )


def task_options(task: Mapping[str, Any] | Any) -> dict[str, Any]:
    """The task config as a plain dict; keys it lacks (``task.intensity``'s too) take their
    values from ``conf/task/folder.yaml`` (:func:`~sam_ft.defaults.group_defaults`).

    The Python API's way (tests, benches, a user's script) to complete a partial mapping, and
    ``parse_config``'s, once per run. Every function below it (this module's, ``data/``'s,
    ``inference/``'s) takes the complete dict it is handed and reads no default.
    """
    base = group_defaults("task", "folder")
    opts = {**base, **(to_plain(task) or {})}
    opts["intensity"] = {**base["intensity"], **(opts.get("intensity") or {})}
    if opts["name"] is None:  # folder.yaml's name is its root's (an interpolation Hydra resolves)
        opts["name"] = folder_name(opts["root"]) if opts["root"] else "folder"
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
    if opts["slice_axis"] not in SLICE_AXES:
        raise ConfigError(f"task.slice_axis must be auto, 0, 1 or 2, got {opts['slice_axis']!r}")
    return opts


def data_options(data: Mapping[str, Any] | Any | None) -> dict[str, Any]:
    """The data config as a plain dict; keys it lacks (``data.split``'s too) take their values
    from ``conf/data/default.yaml`` (:func:`~sam_ft.defaults.group_defaults`: ``seed`` is
    ``conf/train.yaml``'s, ``cache_dir`` None, i.e. ``<run dir>/cache``).

    Like :func:`task_options`, the Python API's way to complete a partial mapping; the code below
    the task modules takes the complete ``data`` dict it is handed.
    """
    base = group_defaults("data")
    opts = {**base, **(to_plain(data) or {})}
    opts["split"] = {**base["split"], **(opts.get("split") or {})}
    check_on_error(opts["on_error"], "data.on_error")
    return opts


def task_root(task: Mapping[str, Any], data_dir: str | Path | None = None) -> Path:
    """The folder the task reads, from ``task.root`` or ``<data_dir>/<default folder>``."""
    opts = task
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
    opts = task
    root = task_root(opts, data_dir)
    if opts["source"] == "demo":
        from sam_ft.data.demo import ensure_demo

        return ensure_demo(root, variant="2d" if opts.get("demo_variant") == "2d" else "3d")
    if opts["source"] == "mni152":
        from sam_ft.data.mni152 import ensure_mni152

        return ensure_mni152(root)
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


# Approximate sizes of the MSD archives (bytes, rounded up), for the free-space check before a
# download. The archives hold .nii.gz files, so the extracted folder is about as large again.
DECATHLON_ARCHIVE_BYTES: dict[str, int] = {
    "Task01_BrainTumour": 7_500_000_000,
    "Task02_Heart": 450_000_000,
    "Task03_Liver": 28_500_000_000,
    "Task04_Hippocampus": 30_000_000,
    "Task05_Prostate": 240_000_000,
    "Task06_Lung": 8_800_000_000,
    "Task07_Pancreas": 12_000_000_000,
    "Task08_HepaticVessel": 9_000_000_000,
    "Task09_Spleen": 1_600_000_000,
    "Task10_Colon": 5_600_000_000,
}


def download_url(**kwargs: Any) -> None:
    """MONAI's ``download_url`` (indirection so tests can observe the call)."""
    from monai.apps.utils import download_url as _download_url

    _download_url(**kwargs)


def _gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n} bytes"


def _archive_bytes(url: str, name: str) -> int | None:
    """The archive's size: the file's for a ``file://`` mirror, else the MSD release's."""
    if url.startswith("file://"):
        path = Path(url2pathname(urlparse(url).path))
        return path.stat().st_size if path.is_file() else None
    return DECATHLON_ARCHIVE_BYTES.get(name)


def _check_download_target(opts: Mapping[str, Any], name: str, root: Path) -> None:
    """Refuse a ``task.root`` that a download of ``name`` could never fill (before any byte).

    The archive extracts to ``<root.parent>/<name>``: a root with another name, or an existing
    non-empty folder without ``images_dir``, is a wrong path, not a missing dataset.
    """
    images = opts["images_dir"]
    if root.name != name:
        raise DataError(
            str(root),
            f"task.root has no {images}/, and downloading {name} would extract it to "
            f"{root.parent / name}, not here. Point task.root at the folder that holds {images}/, "
            f"or at <dir>/{name} to download it there. Nothing was downloaded.",
        )
    if root.is_dir() and any(root.iterdir()):
        raise DataError(
            str(root),
            f"task.root exists but has no {images}/: not an extracted {name} (wrong folder?). "
            "Fix task.root, or empty the folder to download it there. Nothing was downloaded.",
        )


def _check_free_space(parent: Path, size: int, name: str, archive_present: bool) -> None:
    """Enough free disk for the download (via the temp folder) and the extraction, else an error.

    MONAI downloads into the system temp folder, moves the archive next to ``root`` and it is
    extracted there: ``size`` in the temp folder, ``2 * size`` (archive + files) in ``parent``.
    """
    needs: dict[Path, int] = {parent: size if archive_present else 2 * size}
    if not archive_present:
        tmp = Path(tempfile.gettempdir())
        if os.stat(tmp).st_dev == os.stat(parent).st_dev:
            needs[parent] += size
        else:
            needs[tmp] = size
    for where, need in needs.items():
        free = shutil.disk_usage(where).free
        if free < need:
            raise DataError(
                str(where),
                f"downloading {name} needs {_gb(need)} free here (archive {_gb(size)} and its "
                f"extraction), only {_gb(free)} is free. Set task.root (or paths.data_dir; TMPDIR "
                "for the temp folder) to a disk with room. Nothing was downloaded.",
            )


def _extract_verified(archive: Path, name: str, root: Path) -> None:
    """Extract ``archive`` (whose top folder is ``name``) to ``root``, checked member by member.

    Extraction goes to a hidden folder next to ``root``; each regular file is checked to exist
    with its archived size before the folder is renamed to ``root``, so a killed or short
    extraction never looks like a dataset.
    """
    import tarfile

    from monai.apps.utils import extractall

    staging = root.parent / f".{name}.extracting"
    shutil.rmtree(staging, ignore_errors=True)  # a killed earlier extraction
    extractall(filepath=archive, output_dir=staging, file_type="tar", has_base=False)
    with tarfile.open(archive) as tar:
        for member in tar:
            if not member.isfile():
                continue
            got = staging / member.name
            if not got.is_file() or got.stat().st_size != member.size:
                raise DataError(
                    str(archive), f"extraction incomplete: {member.name} missing or short"
                )
    if not (staging / name).is_dir():
        raise DataError(str(archive), f"archive has no top folder {name}/")
    if root.is_dir():
        root.rmdir()  # empty (checked before the download)
    os.replace(staging / name, root)
    shutil.rmtree(staging, ignore_errors=True)


def ensure_decathlon(task: Mapping[str, Any], root: Path) -> Path:
    """Download and extract an MSD task into ``root`` unless ``root/imagesTr`` already exists.

    Before any download: ``root`` must be ``<dir>/<TaskXX_Name>`` (where the archive extracts)
    and empty or absent, and the disk must have room (archive size per task). The archive
    (``<root.parent>/<TaskXX_Name>.tar``) is checked against MONAI's md5; ``task.url`` (e.g. a
    local mirror, ``file://`` or http) keeps that md5 unless ``task.md5`` overrides it, and a
    mismatch is an error naming the file. After a verified extraction the archive is removed
    unless ``task.keep_archive=true``.
    """
    opts = task
    name = _decathlon_name(opts)
    if (root / opts["images_dir"]).is_dir():
        return root
    url, md5 = decathlon_resource(name)
    md5_source = f"MONAI's published md5 of {name}"
    if opts.get("url"):
        url = str(opts["url"])
    if opts.get("md5"):
        md5, md5_source = str(opts["md5"]), "task.md5"
    _check_download_target(opts, name, root)
    root.parent.mkdir(parents=True, exist_ok=True)
    archive = root.parent / f"{name}.tar"
    from filelock import FileLock
    from monai.apps.utils import HashCheckError, check_hash

    # Several processes (DDP ranks) may start together: one downloads, the others wait.
    with FileLock(str(root.parent / f".{name}.lock")):
        if (root / opts["images_dir"]).is_dir():
            return root
        if archive.is_file() and not check_hash(archive, md5, "md5"):
            raise DataError(
                str(archive),
                f"an archive is already here but its md5 does not match {md5} ({md5_source}); "
                "delete it (or fix task.md5) and run again",
            )
        size = archive.stat().st_size if archive.is_file() else _archive_bytes(url, name)
        if size is not None:
            _check_free_space(root.parent, size, name, archive.is_file())
        keep = bool(opts.get("keep_archive"))
        log.warning(
            "downloading %s (%s) from %s to %s, extracting it into %s; the archive is %s",
            name, _gb(size) if size else "size unknown", url, archive, root,
            "kept (task.keep_archive=true)" if keep else "removed after a verified extraction",
        )  # fmt: skip
        try:
            if not archive.is_file():
                download_url(
                    url=url, filepath=str(archive), hash_val=md5, hash_type="md5", progress=True
                )
        except HashCheckError:
            raise DataError(
                str(archive),
                f"md5 mismatch: the file downloaded from {url} is not {md5} ({md5_source}); "
                "nothing was saved. A mirror must hold the published archive (or set task.md5 "
                "to the mirror's checksum if it is deliberately different).",
            ) from None
        except Exception as e:  # network or file errors end the same way
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise DataError(
                url,
                f"download of {name} failed ({msg}); download it yourself and extract it so that "
                f"{root}/{opts['images_dir']} exists",
            ) from e
        if not archive.is_file():
            raise DataError(url, f"download of {name} produced no archive at {archive}")
        _extract_verified(archive, name, root)
        if not (root / opts["images_dir"]).is_dir():
            raise DataError(
                str(root), f"archive {archive} did not contain {name}/{opts['images_dir']}"
            )
        if not keep:
            archive.unlink()
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
    opts = task
    return opts["labels"] if opts["labels"] is not None else dataset_label_groups(meta)


def task_modality(task: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """``task.modality``, else the dataset.json modality of the used channel, else ``""``."""
    opts = task
    if opts.get("modality"):
        return str(opts["modality"])
    modality = meta.get("modality") or meta.get("channel_names") or {}
    if isinstance(modality, Mapping):
        value = modality.get(str(opts.get("channel") or 0)) or next(iter(modality.values()), "")
        return str(value)
    return str(modality)
