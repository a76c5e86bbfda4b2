"""Where the YAML configuration lives, and one config group's defaults read from it.

The YAML files under ``conf/`` are the one place defaults live. Hydra composes them for the
entry points; code that builds a group without Hydra (the Python API, tests, notebooks) fills
the keys it is not given from the same files with :func:`group_defaults`. This module imports
nothing of sam_ft but its errors, so every package may read defaults without an import cycle.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

from sam_ft.errors import ConfigError


def folder_name(root: str) -> str:
    """The last component of a folder path (``/data/Task03_Liver/`` -> ``Task03_Liver``): the
    name of a ``task=folder`` run, so run dirs, W&B runs and study tables tell datasets apart."""
    return Path(str(root)).expanduser().name or str(root)


def register_resolvers() -> None:
    """The config resolvers sam_ft's YAML uses (``${sam_ft.folder_name:...}``); idempotent."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver("sam_ft.folder_name"):
        OmegaConf.register_new_resolver("sam_ft.folder_name", folder_name)


def config_dir() -> str:
    """``$SAM_FT_CONFIG_DIR``, else the configs installed with the package (``sam_ft/conf``, a
    non-editable install), else the ``conf/`` of this checkout, else ``./conf``.

    Raises:
        ConfigError: none of them holds ``train.yaml``.
    """
    here = Path(__file__).resolve().parent
    candidates = [os.environ.get("SAM_FT_CONFIG_DIR"), here / "conf", here.parent / "conf"]
    candidates.append(Path.cwd() / "conf")
    for candidate in candidates:
        if candidate and (Path(candidate) / "train.yaml").is_file():
            return str(Path(candidate).resolve())
    raise ConfigError("sam_ft: cannot find the conf/ folder; set SAM_FT_CONFIG_DIR to it")


def group_defaults(group: str, name: str = "default") -> dict[str, Any]:
    """The values of ``conf/<group>/<name>.yaml`` (in :func:`config_dir`) as a plain dict: the
    defaults of code that builds a config group without Hydra (``task_options``,
    ``data_options``, ``eval_options``, ``SliceAugment`` given a partial mapping).

    The file is read with OmegaConf; values only a composed run knows are decided per kind:

    * ``???`` (required, e.g. ``task.root``) -> None: the caller must pass it, and the code that
      needs it says so (``task_root`` raises ``ConfigError``).
    * ``${seed}`` (``data.seed``) -> the ``seed`` of ``conf/train.yaml``, the run's default, so
      the Python API splits cases as ``train.py`` does.
    * any other interpolation (``data.cache_dir: ${paths.cache_dir}/cache``, ``${hydra:...}``,
      ``${oc.env:...}``) -> None: it names a place of a Hydra run, and None is the code's own
      per-run place (``data.cache_dir``: ``<run dir>/cache``), so a side path never writes into
      the shared user cache.

    Returns a fresh copy (callers may change it); each file is parsed once per process.

    Raises:
        ConfigError: the file does not exist.
    """
    return copy.deepcopy(_load_group(config_dir(), group, name))


def build_from_yaml(group: str, file: str = "default", /, **overrides: Any) -> Any:
    """The object ``conf/<group>/<file>.yaml`` describes (its ``_target_`` called with the file's
    values and ``overrides``, as Hydra's ``instantiate`` does): the Python API's and the tests'
    way to build a loss, prompt sampler, finetune mode or model with the YAML's defaults, e.g.
    ``build_from_yaml("loss", "dice_ce", iou_weight=0.0)``, ``build_from_yaml("finetune",
    "lora", rank=2)``.

    Raises:
        ConfigError: the file does not exist.
    """
    from hydra.utils import instantiate

    return instantiate({**group_defaults(group, file), **overrides})


@functools.cache
def _load_group(conf: str, group: str, name: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    path = Path(conf) / group / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"{path}: config file of {group}={name} not found")
    values = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    root = OmegaConf.to_container(OmegaConf.load(Path(conf) / "train.yaml"), resolve=False)
    return _concrete(_with_bases(conf, group, values), root.get("seed"))


def _with_bases(conf: str, group: str, values: dict) -> dict:
    """A group file with its own defaults list (``- _base/shared@_here_``, ``- default``) merged
    under it, as Hydra composes it (``conf/finetune/lora.yaml`` = shared keys + ``name``)."""
    entries = values.pop("defaults", None) or []
    merged: dict[str, Any] = {}
    for entry in entries:
        if entry == "_self_":
            continue
        merged.update(_load_group(conf, group, str(entry).removesuffix("@_here_")))
    return {**merged, **values}


def _concrete(value: Any, seed: Any) -> Any:
    """``value`` with ``???`` and interpolations replaced (see :func:`group_defaults`)."""
    if isinstance(value, dict):
        return {k: _concrete(v, seed) for k, v in value.items()}
    if isinstance(value, list):
        return [_concrete(v, seed) for v in value]
    if value == "???":
        return None
    if isinstance(value, str) and "${" in value:
        return seed if value == "${seed}" else None
    return value
