"""The values given to the libraries' ``_target_`` constructors (``trainer``, ``optimizer``,
``scheduler``, callbacks, loggers), checked before any data or weights are touched.

Three checks, each by the party that knows the rule: the type each constructor declares
(:func:`check_target_types`, also run by ``sam_ft.cli`` on the command line before Hydra
starts), the ranges Lightning accepts at construction but fails on later
(:data:`TRAINER_RANGES`: ``check_val_every_n_epoch=0`` divides by zero inside ``fit``), and the
libraries' own checks, run on a dry build (:func:`check_library_values`: a ``Trainer`` without
loggers or callbacks, the optimizer and its schedule on one dummy parameter). Every failure is a
:class:`~sam_ft.errors.ConfigError` of one line naming the option.

Nothing heavy is imported at module level: ``sam_ft.cli`` imports this before torch loads.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from typing import Any

from sam_ft.errors import ConfigError

# Values of ours that a target never sees: train.py resolves `auto` before building the Trainer.
_OWN_VALUES = {("trainer", "precision"): {"auto"}}


def resolve_precision(precision: Any) -> str:
    """``auto`` = bf16-mixed on GPUs that support it, else full precision."""
    if str(precision) != "auto":
        return str(precision)
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def _at_least(low: float, words: str, *also: Any) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: v is None or v in also or v >= low), words


# Lightning takes these in its constructor and fails (or loops, or silently does nothing) later.
TRAINER_RANGES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "max_epochs": _at_least(1, "an integer >= 1, -1 (no limit) or null", -1),
    "min_epochs": _at_least(0, "an integer >= 0 or null"),
    "max_steps": _at_least(1, "an integer >= 1 or -1 (no limit)", -1),
    "min_steps": _at_least(0, "an integer >= 0 or null"),
    "gradient_clip_val": _at_least(0, "a number >= 0 or null"),
    "check_val_every_n_epoch": _at_least(1, "an integer >= 1 or null"),
    "log_every_n_steps": _at_least(1, "an integer >= 1 or null"),
    "accumulate_grad_batches": _at_least(1, "an integer >= 1"),
    "num_sanity_val_steps": _at_least(0, "an integer >= 0, -1 (all) or null", -1),
    "val_check_interval": (lambda v: v is None or v > 0, "a number > 0 or null"),
    "num_nodes": _at_least(1, "an integer >= 1"),
}


def check_library_values(cfg: Any, entry: str, machine: bool = True) -> None:
    """Check every ``_target_`` value of the composed ``cfg``: types, ranges, and (for
    ``train.py``) a dry build of the optimizer and the schedule and, with ``machine``, of the
    Trainer (which asks this machine for the accelerator and devices: the command line of a SLURM
    sweep, on a login node without GPUs, leaves that to the jobs).

    Raises:
        ConfigError: one line naming the first bad option.
    """
    from omegaconf import OmegaConf

    if not OmegaConf.is_config(cfg):  # the Python API with plain groups: parse_config's own
        return
    check_target_types(cfg)
    trainer = cfg.get("trainer")
    if OmegaConf.is_dict(trainer):
        values = _plain(trainer)
        for key, (ok, words) in TRAINER_RANGES.items():
            value = values.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and not ok(value):
                raise ConfigError(f"trainer.{key}={value}: expected {words}")
        if entry == "train" and machine:
            _dry_trainer(values)
    if entry == "train" and OmegaConf.is_dict(cfg.get("optimizer")):
        _dry_optimizer(cfg)


def _plain(node: Any) -> dict:
    """The node's values, resolved where they can be (``${hydra:...}`` cannot before Hydra runs:
    those stay as written and are not checked)."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException:
        return OmegaConf.to_container(node, resolve=False)


def _culprit(group: str, values: dict, message: str) -> str:
    """``group.key=value: message`` when the library's message points at one key (``key=``,
    a quoted ``key``, the bare name, else the value, in that order), else ``group: message``."""
    message = " ".join(str(message).split())
    keys = [k for k in values if not k.startswith("_")]
    for pattern in ("{k}=", "`{k}`", "{k}", " {v}"):
        named = [k for k in keys if pattern.format(k=k, v=values[k]) in message]
        if len(named) == 1:
            return f"{group}.{named[0]}={values[named[0]]}: {message}"
    return f"{group}: {message}"


@contextlib.contextmanager
def _library_refusals(group: str, values: dict) -> Iterator[None]:
    """A library's refusal of a value (ValueError, TypeError, Lightning's
    MisconfigurationException) as our one-line ConfigError."""
    try:
        yield
    except ConfigError:
        raise
    except Exception as err:  # what the library says, whatever its class
        raise ConfigError(_culprit(group, values, str(err))) from None


def _dry_trainer(values: dict) -> None:
    """Build the configured Trainer without loggers, callbacks or checkpoints: Lightning checks
    the accelerator (``trainer.accelerator=gpu`` on a machine without one), the devices, the
    precision, the strategy and its limits, as the real one will, but before the data and the
    weights. Its device lines are printed once, by the real Trainer."""
    from hydra.utils import get_object

    kwargs = {k: v for k, v in values.items() if not k.startswith("_")}
    if "precision" in kwargs:
        kwargs["precision"] = resolve_precision(kwargs["precision"])
    kwargs.update(
        logger=False,
        callbacks=[],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=None,
    )
    target = get_object(str(values.get("_target_", "lightning.pytorch.Trainer")))
    quiet = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with _library_refusals("trainer", values):
            target(**kwargs)
    finally:
        quiet.setLevel(level)


def _dry_optimizer(cfg: Any) -> None:
    """Build the optimizer (and the schedule on it) over one dummy parameter: torch's own checks
    of ``lr``, ``betas``, ``eps``, ``weight_decay``, ... before the data are prepared."""
    import inspect

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    values = _plain(cfg.optimizer)
    with _library_refusals("optimizer", values):
        optimizer = instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    if not OmegaConf.is_dict(cfg.get("scheduler")):
        return
    values = _plain(cfg.scheduler)
    with _library_refusals("scheduler", values):
        factory = instantiate(cfg.scheduler)
        func = getattr(factory, "func", factory)
        kwargs = {"total_steps": 10} if "total_steps" in inspect.signature(func).parameters else {}
        factory(optimizer, **kwargs)


def _admits(value, tp) -> bool | None:
    """Whether ``value`` (a YAML scalar or list) fits the annotation ``tp``; None: can't tell."""
    import types
    import typing

    origin = typing.get_origin(tp)
    if tp is typing.Any or isinstance(tp, typing.TypeVar):
        return True
    if origin in (typing.Union, types.UnionType):
        verdicts = [_admits(value, a) for a in typing.get_args(tp)]
        return True if True in verdicts else (None if None in verdicts else False)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (list, tuple) or tp in (list, tuple):
        return isinstance(value, list | tuple) or None
    if isinstance(tp, type) and isinstance(value, str | int | float | bool):
        return isinstance(value, tp)  # a class (an Accelerator, a Tensor): never a scalar
    return None


def check_target_types(cfg) -> None:
    """Each value given to a library's ``_target_`` (``trainer``, ``optimizer``, callbacks,
    loggers) fits the type its constructor declares: ``trainer.max_epochs=abc`` or
    ``trainer.precision=bf17`` is one line now, not an error inside Lightning after the data
    were prepared."""
    import inspect
    import typing

    from hydra.utils import get_object
    from omegaconf import OmegaConf

    def nodes(node, path):
        if OmegaConf.is_dict(node):
            if "_target_" in node:
                yield path, node
            for key in node:
                if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
                    continue
                yield from nodes(node[key], f"{path}.{key}" if path else str(key))

    for path, node in nodes(cfg, ""):
        # sam_ft's own targets are checked by parse_config, with the rules of the code using them.
        if path.startswith("hydra") or str(node["_target_"]).startswith("sam_ft."):
            continue
        try:
            target = get_object(str(node["_target_"]))
            hints = typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
        except Exception:  # an unimportable target is reported when it is built
            continue
        for key in node:
            key = str(key)
            if key.startswith("_") or key not in hints or OmegaConf.is_missing(node, key):
                continue
            if OmegaConf.is_interpolation(node, key):
                continue
            value = OmegaConf.to_container(node, resolve=False)[key]
            if value in _OWN_VALUES.get((path, key), ()):
                continue
            if _admits(value, hints[key]) is False:
                expected = str(hints[key]).replace("typing.", "")
                raise ConfigError(f"{path}.{key}={value!r}: {node['_target_']} expects {expected}")
