"""Typed config groups checked against their dataclass: one field per key, its annotation the
allowed values (``Literal`` values come from the module that owns them). Used by
:mod:`sam_ft.config` for every group and by :mod:`sam_ft.evaluation.protocol.options` for the
``eval`` group, which it owns; a bad value ends in one line naming the option."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Mapping
from dataclasses import field
from typing import Any, Literal

from sam_ft.errors import ConfigError


def optional() -> Any:
    """A key only some presets set; absent means "not used" (``None``)."""
    return field(default=None, metadata={"optional": True})


def build(cls: type, value: Any, name: str, names: dict[str, Any] | None = None) -> Any:
    """``value`` (a mapping) -> ``cls`` with every field checked; unknown keys are errors.
    ``names``: what the annotations' names not in ``cls``'s module are (``Literal[NAME]``)."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}={_show(value)}: expected a mapping of {cls.__name__} options")
    hints = typing.get_type_hints(cls, localns=names)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if str(key).startswith("_"):  # Hydra's _target_ etc.
            continue
        if key not in known:
            # A field marked key=False is set by the code (e.g. eval's on_error, data.on_error).
            keys = [k for k, f in known.items() if f.metadata.get("key", True)]
            close = difflib.get_close_matches(str(key), keys, n=1)
            hint = f" (did you mean {name}.{close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown option {name}.{key}{hint}; known: {', '.join(sorted(keys))}"
            )
    kwargs = {}
    for key, f in known.items():
        if key not in value or value[key] == "???":
            if f.default is not dataclasses.MISSING:
                continue
            raise ConfigError(
                f"missing required option {name}.{key}: expected {_describe(hints[key])} "
                f"(set it on the command line: {name}.{key}=...)"
            )
        kwargs[key] = check(value[key], hints[key], f"{name}.{key}", names)
    return cls(**kwargs)


def check(value: Any, tp: Any, name: str, names: dict[str, Any] | None = None) -> Any:
    """``value`` checked against the annotation ``tp`` (converted where lossless)."""
    ok, out = _match(value, tp, name, names)
    if not ok:
        raise ConfigError(f"{name}={_show(value)}: expected {_describe(tp)}")
    return out


def _match(value: Any, tp: Any, name: str, names: dict[str, Any] | None) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _match(value, arg, name, names)
            if ok:
                return True, out
        return False, None
    if tp is type(None):
        return value is None, None
    if origin is Literal:
        for allowed in typing.get_args(tp):
            if value == allowed and type(value) is type(allowed):
                return True, value
        return False, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        # An integer stays one (40, not 40.0): the plain groups the library receives, and the
        # cache keys made from them, are then the YAML's values.
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, value if ok else None
    if tp is str:
        return isinstance(value, str), value
    if origin is list or origin is tuple:  # list[X], or tuple[X, ...]
        if not isinstance(value, list | tuple):
            return False, None
        arg = typing.get_args(tp)[0]
        out = [check(v, arg, f"{name}[{i}]", names) for i, v in enumerate(value)]
        return True, out if origin is list else tuple(out)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            return False, None
        args = typing.get_args(tp)
        if not args:
            return True, dict(value)
        return True, {k: check(v, args[1], f"{name}.{k}", names) for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            return False, None
        return True, build(tp, value, name, names)
    raise TypeError(f"unsupported annotation {tp!r} for {name}")  # a schema bug, not the user's


def _describe(tp: Any) -> str:
    """Human words for an annotation: ``int | None`` -> ``an integer or null``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is Literal:
        return "one of " + ", ".join(_show(a) for a in typing.get_args(tp))
    if dataclasses.is_dataclass(tp):
        return f"a mapping with keys {', '.join(f.name for f in dataclasses.fields(tp))}"
    words = {bool: "true/false", int: "an integer", float: "a number", str: "a string"}
    if tp in words:
        return words[tp]
    if origin is list or origin is tuple:
        return f"a list of ({_describe(typing.get_args(tp)[0])})"
    if origin is dict or tp is dict:
        return "a mapping"
    return str(tp)


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, str) else str(value)
