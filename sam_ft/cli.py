"""Command-line entry points, with what they answer before the heavy imports: ``--help`` for
predict (its own options, in well under a second, instead of Hydra's listing of every training
group after torch loads) and a check of the overrides for every task (a typo is one line with
our suggestion, not Hydra's advice to add ``+``, which would then fail deep in a library)."""

from __future__ import annotations

import difflib
import sys
from collections.abc import Sequence
from pathlib import Path

from sam_ft.defaults import config_dir
from sam_ft.errors import ConfigError

_USAGE = {
    "predict": "usage: python predict.py checkpoint=FILE input=PATH output=DIR "
    "[labels=MAP | prompts=JSON | box=[x0,y0,x1,y1] [slice=K] | prompt=everything] [key=value ...]"
    "\n  model=vit_b|vit_l|vit_h|medsam|tiny: the architecture for checkpoint=auto or a weights "
    "file without a model card (a card or a run config beside the checkpoint says it otherwise)"
}


def usage(name: str) -> str:
    """The usage line and the options of ``conf/<name>.yaml`` with their comments (the Hydra
    ``defaults`` list and the run-naming keys left out: they are not the user's options)."""
    lines = (Path(config_dir()) / f"{name}.yaml").read_text().splitlines()
    options, in_defaults = [], False
    for line in lines:
        if line.startswith("defaults:"):
            in_defaults = True
            continue
        if in_defaults:
            if line.startswith((" ", "-")) or not line.strip():
                continue
            in_defaults = False
        if not line.startswith(("task_name:", "run_name:")):
            options.append(line)
    return "\n".join([_USAGE[name], "", "options (key=value; # says what each does):", *options])


MAX_CHECKED_JOBS = 64
"""Sweep values composed and checked up front; a job beyond them checks itself (parse_config)
before its own work."""


def _sweep_variants(args: Sequence[str]) -> list[list[str]]:
    """The overrides of the first job (each sweep ``a=1,2``, ``range(...)`` at its first value),
    then one list per further listed value of each sweep, the other sweeps at their first: every
    value is composed and checked once, without composing every combination. Sweeps without
    listed values (``interval``) are left to the sweeper."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    choices = []  # per override: its values as key=value lines
    for override in OverridesParser.create().parse_overrides(list(args)):
        if not override.is_sweep_override():
            choices.append([override.input_line])
            continue
        try:
            values = list(override.sweep_string_iterator())
        except Exception:  # an interval or another sweep without listed values
            continue
        if values:
            choices.append([f"{override.get_key_element()}={v}" for v in values])
    first = [c[0] for c in choices]
    variants = [first]
    for i, lines in enumerate(choices):
        variants += [[*first[:i], line, *first[i + 1 :]] for line in lines[1:]]
    return variants[:MAX_CHECKED_JOBS]


def _nearest(key: str, keys: list[str]) -> str:
    close = difflib.get_close_matches(key, keys, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def check_overrides(config_name: str, args: Sequence[str]) -> None:
    """Compose ``config_name`` with the command line's overrides as Hydra will; an unknown key
    or option is a :class:`ConfigError` naming it with the nearest known one.

    Command-line flags (``--cfg``, ``-m``, ...) are Hydra's own and pass; so does anything this
    check cannot parse (Hydra then reports it as it does).
    """
    from hydra import initialize_config_dir

    overrides = [a for a in args if not a.startswith("-")]
    if len(overrides) != len(args) and any(a in ("--cfg", "-c", "--info", "-i") for a in args):
        return
    try:
        variants = _sweep_variants(overrides)
    except Exception:
        return
    with initialize_config_dir(config_dir(), version_base="1.3"):
        for job in variants:
            _check_job(config_name, job)


def _check_job(config_name: str, overrides: list[str]) -> None:
    """One job's composition: its keys, its group options and its values (``check_overrides``)."""
    from hydra import compose
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf import OmegaConf

    from sam_ft.training.options import check_library_values

    try:
        cfg = compose(config_name, overrides=overrides)
        _check_appended(cfg, overrides)
        if config_name == "predict":  # train/evaluate name theirs in parse_config
            missing = [str(k) for k in cfg if OmegaConf.is_missing(cfg, k)]
            if missing:
                given = " ".join(f"{k}=..." for k in missing)
                raise ConfigError(f"missing required option(s): {given}")
        # The Trainer's devices are the job's machine's: parse_config checks them there.
        entry = {"eval": "evaluate"}.get(config_name, config_name)
        check_library_values(cfg, entry, machine=False)
        return
    except MissingConfigException as err:
        group = str(err.missing_cfg_file or "").rsplit("/", 1)
        if err.options and len(group) == 2:
            raise ConfigError(
                f"{group[0]}={group[1]}: no such option{_nearest(group[1], err.options)}; "
                f"available: {', '.join(err.options)}"
            ) from None
        raise ConfigError(str(err).splitlines()[0]) from None
    except ConfigCompositionException as err:
        message = str(err)
        if not message.startswith("Could not override '"):
            raise ConfigError(message.splitlines()[0]) from None
        key = message.split("'")[1]
    parent, _, leaf = key.rpartition(".")
    bad = [a for a in overrides if a.split("=", 1)[0].lstrip("+~") == key]
    cfg = compose(config_name, overrides=[a for a in overrides if a not in bad])
    node = OmegaConf.select(cfg, parent) if parent else cfg
    known = [str(k) for k in node] if OmegaConf.is_dict(node) else []
    near = _nearest(leaf, known).replace("mean ", f"mean {parent}." if parent else "mean ")
    raise ConfigError(f"unknown option {key}{near}")


def _check_appended(cfg, overrides: Sequence[str]) -> None:
    """A key added with ``+`` to a group built from a ``_target_`` (``+trainer.max_epoch=1``)
    must be an argument of that target, else it fails later inside the library's constructor."""
    import inspect

    from hydra.utils import get_object
    from omegaconf import OmegaConf

    for arg in overrides:
        if not arg.startswith("+"):
            continue
        key = arg.lstrip("+").split("=", 1)[0]
        parent, _, leaf = key.rpartition(".")
        if leaf.startswith("_"):  # Hydra's own keys (_target_, _partial_, ...)
            continue
        node = OmegaConf.select(cfg, parent) if parent else None
        if not (OmegaConf.is_dict(node) and "_target_" in node):
            continue
        try:
            params = inspect.signature(get_object(str(node["_target_"]))).parameters
        except (ValueError, TypeError, ImportError):
            continue
        if leaf in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            continue
        known = [n for n in params if n not in ("self", "args", "kwargs")]
        near = _nearest(leaf, known).replace("mean ", f"mean {parent}.")
        raise ConfigError(f"unknown option {key}{near}: {node['_target_']} takes no {leaf!r}")


def _check(config_name: str, args: Sequence[str]) -> None:
    from sam_ft.errors import exit_on_own_error
    from sam_ft.quiet import quiet_third_party

    quiet_third_party()
    exit_on_own_error(lambda argv: check_overrides(config_name, argv))(args)


def train_main() -> None:
    """``python train.py`` / ``sam-ft-train``."""
    _check("train", sys.argv[1:])
    from sam_ft.train import main

    main()


def evaluate_main() -> None:
    """``python evaluate.py`` / ``sam-ft-evaluate``."""
    _check("eval", sys.argv[1:])
    from sam_ft.evaluate import main

    main()


def predict_main() -> None:
    """``python predict.py`` / ``sam-ft-predict`` (``prompt=`` is predict's ``strategy=``)."""
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(usage("predict"))
        return
    from sam_ft.predict import main, predict_overrides

    _check("predict", predict_overrides(sys.argv[1:]))
    main()
