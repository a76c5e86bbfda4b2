"""The run configuration, parsed once at start into typed, checked dataclasses.

``train.py`` and ``evaluate.py`` call :func:`parse_config` first, before any model is built or
any weights are hashed or downloaded, so a typo in ``eval.*``, a missing ``task.root``, a wrong
type (``finetune.rank=abc``, ``task.intensity=none`` where a mapping is expected), an unknown
option or a value a library refuses (``trainer.*``, ``optimizer.*``, ``scheduler.*``: checked by
:mod:`sam_ft.training.options`) ends the run at once with one line naming the option and what is
expected.

Defaults live in the YAML files under ``conf/`` only: a field without a Python default is
required (the YAML must set it); ``optional()`` marks keys that only some presets set (e.g.
``task.decathlon_task``), for which "absent" means "not used". Code that builds a group without
Hydra (the Python API, tests, notebooks) fills the keys it is not given from the same YAML with
:func:`sam_ft.defaults.group_defaults`, so no Python module holds a second copy of a default.

**Adding a config key**: declare it as one field of the dataclass of its group below (``task`` ->
:class:`TaskConfig`, ``task.intensity`` -> :class:`IntensityConfig`, ``data`` ->
:class:`DataConfig`, ``data.split`` -> :class:`SplitConfig`, ``eval`` -> :class:`EvalConfig`,
``eval.everything`` -> :class:`EverythingConfig`, ``eval.bootstrap`` -> :class:`BootstrapConfig`,
``eval.propagate`` -> :class:`PropagateConfig`,
``model`` -> :class:`ModelConfig`, ``finetune`` -> :class:`FinetuneConfig`, ``train`` ->
:class:`TrainConfig`), with its type, and set its default in the YAML. An undeclared key is
reported as unknown.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sam_ft.errors import ConfigError

if TYPE_CHECKING:  # the schema's Literal[NAME]s; owned_choices() gives them at run time
    from sam_ft.data.demo import VARIANTS as DEMO_VARIANTS
    from sam_ft.data.embedding_cache import CACHE_EMBEDDINGS, EMBEDDING_DTYPES
    from sam_ft.data.intensity import MODES as INTENSITY_MODES
    from sam_ft.data.intensity import SCOPES as INTENSITY_SCOPES
    from sam_ft.data.skips import ON_ERROR
    from sam_ft.data.tasks import SLICE_AXES, SOURCES
    from sam_ft.model.finetune import MODES as FINETUNE_MODES
    from sam_ft.model.specs import PREPROCESSES


def optional() -> Any:
    """A key only some presets set; absent means "not used" (``None``)."""
    return field(default=None, metadata={"optional": True})


# ---------------------------------------------------------------------------------------------
# Schema: one field per key (see the module docstring). ``Literal[NAME]``: NAME is the tuple of
# allowed values in the module that uses them (:func:`owned_choices`), never restated here.


@dataclass(frozen=True)
class IntensityConfig:
    """``task.intensity`` (sam_ft/data/intensity.py)."""

    mode: Literal[INTENSITY_MODES]
    scope: Literal[INTENSITY_SCOPES] | None = optional()
    keep_zero: bool | None = optional()
    level: float | None = optional()
    width: float | None = optional()
    lower: float | None = optional()
    upper: float | None = optional()


@dataclass(frozen=True)
class TaskConfig:
    """``task`` (conf/task/*.yaml; keys documented in sam_ft/data/tasks.py)."""

    name: str
    source: Literal[SOURCES]
    root: str | None
    modality: str | None
    intensity: IntensityConfig
    labels: dict[str, list[int] | int] | None
    slice_axis: Literal[SLICE_AXES]
    channel: int
    label_binarize: bool | float
    ignore_labels: list[int] | None = optional()
    case_pattern: str | None = optional()
    images_dir: str | None = optional()
    labels_dir: str | list[str] | None = optional()
    label_name: str | None = optional()
    layout: str | None = optional()
    decathlon_task: str | None = optional()
    url: str | None = optional()
    md5: str | None = optional()
    keep_archive: bool | None = optional()
    demo_variant: Literal[DEMO_VARIANTS] | None = optional()


@dataclass(frozen=True)
class SplitConfig:
    """``data.split``."""

    train: float
    val: float
    test: float
    file: str | None


@dataclass(frozen=True)
class DataConfig:
    """``data`` (conf/data/default.yaml)."""

    min_object_pixels: int
    split: SplitConfig
    seed: int
    on_error: Literal[ON_ERROR]
    affine_atol: float
    cache_dir: str | None
    cache_embeddings: Literal[CACHE_EMBEDDINGS]
    augment: dict[str, Any]  # keys checked by sam_ft.data.augment.SliceAugment
    batch_size: int
    max_objects_per_image: int | None
    embedding_dtype: Literal[EMBEDDING_DTYPES] | None
    num_workers: int
    prep_workers: int | None
    pin_memory: bool | None = optional()


@dataclass(frozen=True)
class EverythingConfig:
    """``eval.everything`` (SamAutomaticMaskGenerator settings)."""

    pred_iou_thresh: float
    stability_score_thresh: float
    stability_score_offset: float
    box_nms_thresh: float
    min_mask_region_area: int


@dataclass(frozen=True)
class BootstrapConfig:
    """``eval.bootstrap`` (the CIs' ``scipy.stats.bootstrap`` settings)."""

    resamples: int
    seed: int
    method: Literal["BCa", "percentile", "basic"]
    confidence: float


@dataclass(frozen=True)
class PropagateConfig:
    """``eval.propagate`` (``eval.mode=propagate``: sam_ft.evaluation.protocol.propagation)."""

    prompt: Literal["box", "memory"]
    key: Literal["largest", "middle", "even"]
    keys: int
    stop: Literal["vanish", "box_ends"]
    margin_px: int


@dataclass(frozen=True)
class EvalConfig:
    """``eval`` (conf/eval/default.yaml; values checked by sam_ft.evaluation.protocol.options)."""

    split: Literal["test", "val", "all"]
    mode: Literal["slices", "propagate"]
    propagate: PropagateConfig
    prompts: list[str]
    jitter_px: list[list[float]]
    mask_selection: Literal["oracle", "predicted_iou", "single", "auto"]
    point_sampling: Literal["even", "random", "official"]
    grid: int
    nsd_tolerance_mm: float
    nsd_method: Literal["area", "count"]
    clicks: int
    save_predictions: bool
    max_prompts_per_call: int
    overlays: int
    volume_gt: Literal["full", "kept"]
    workers: int | None
    queue_mb: int
    everything: EverythingConfig
    bootstrap: BootstrapConfig
    # "K/N" (checked by sam_ft.evaluation.protocol.merge.parse_shard); conf/eval/default.yaml sets
    # null.
    shard: str | None = optional()


@dataclass(frozen=True)
class ModelConfig:
    """``model`` (conf/model/*.yaml; ``_target_`` keys are Hydra's)."""

    name: str
    checkpoint: str | None
    image_size: int
    preprocess: Literal[PREPROCESSES]
    grad_checkpointing: bool
    compile_encoder: bool
    encoder_bf16: bool
    multimask_output: bool
    # SAM-HQ only (conf/model/sam_hq_*.yaml): the HQ token's mask alone (sam_ft/model/sam_hq.py).
    hq_token_only: bool | None = optional()


@dataclass(frozen=True)
class FinetuneConfig:
    """``finetune`` (conf/finetune/*.yaml)."""

    name: Literal[FINETUNE_MODES]
    last_n: int
    rank: int
    alpha: float
    encoder_lr_scale: float


@dataclass(frozen=True)
class TrainConfig:
    """``train`` (conf/train.yaml)."""

    evaluate: bool
    max_nonfinite_steps: int
    overlays: int
    multimask: bool | None


@dataclass(frozen=True)
class RunConfig:
    """The checked groups of one run (``train`` only for ``train.py``)."""

    task: TaskConfig
    data: DataConfig
    eval: EvalConfig
    model: ModelConfig
    finetune: FinetuneConfig
    train: TrainConfig | None
    seed: int


# ---------------------------------------------------------------------------------------------
# Parsing


def parse_config(cfg: Any, entry: Literal["train", "evaluate"] = "train") -> RunConfig:
    """Check the composed Hydra config of ``entry`` and return its typed groups.

    Cheap (no file is read besides checking that a ``folder`` task's ``root`` exists), so it runs
    before the model is built.

    Raises:
        ConfigError: one line naming the first bad option and what is expected.
    """
    from omegaconf import DictConfig, OmegaConf

    def group(name: str) -> Any:
        if isinstance(cfg, DictConfig):
            if name not in cfg:
                raise ConfigError(f"missing config group {name!r}")
            node = cfg[name]
            if isinstance(node, DictConfig):
                return OmegaConf.to_container(node, resolve=True, throw_on_missing=False)
            return node
        if name not in cfg:
            raise ConfigError(f"missing config group {name!r}")
        return cfg[name]

    seed = _check(group("seed") if "seed" in cfg else 0, int, "seed")
    run = RunConfig(
        task=_build(TaskConfig, group("task"), "task"),
        data=_build(DataConfig, group("data"), "data"),
        eval=_build(EvalConfig, group("eval"), "eval"),
        model=_build(ModelConfig, group("model"), "model"),
        finetune=_build(FinetuneConfig, group("finetune"), "finetune"),
        train=_build(TrainConfig, group("train"), "train") if entry == "train" else None,
        seed=seed,
    )
    _check_values(run, group("eval"), group("data"))
    from sam_ft.training.options import check_library_values

    check_library_values(cfg, entry)  # trainer, optimizer, scheduler: the libraries' values
    return run


def _check_values(run: RunConfig, eval_cfg: Mapping[str, Any], data_cfg: Mapping) -> None:
    """Checks beyond types, by the code that uses the values (so the rules live in one place)."""
    from sam_ft.data.augment import SliceAugment
    from sam_ft.data.tasks import task_options
    from sam_ft.evaluation.protocol.options import eval_options

    task = run.task
    task_options({k: v for k, v in dataclasses.asdict(task).items() if v is not None})
    if task.source == "folder" and task.root is not None:
        root = Path(task.root).expanduser()
        images = root / (task.images_dir or "imagesTr")
        if not images.is_dir():
            what = "folder not found" if not root.is_dir() else f"has no {images.name}/ folder"
            layout = f"; expected layout: {task.layout}" if task.layout else ""
            raise ConfigError(f"task.root={task.root}: {what}{layout}")
    if task.source == "folder" and task.root is None:
        raise ConfigError("task.root is required for a folder task: task.root=/path/to/folder")
    eval_options(eval_cfg)
    from sam_ft.evaluation.protocol.merge import parse_shard

    parse_shard(eval_cfg.get("shard"))
    SliceAugment(data_cfg.get("augment") or {}, run.data.min_object_pixels)  # checks the keys
    for name in ("batch_size", "num_workers", "prep_workers", "max_objects_per_image"):
        value = getattr(run.data, name)
        low = 0 if name == "num_workers" else 1
        if value is not None and value < low:
            raise ConfigError(f"data.{name}={value}: expected an integer >= {low}")


@functools.cache
def owned_choices() -> dict[str, tuple]:
    """The allowed values of the schema's ``Literal[NAME]`` fields, from the modules that own
    them; imported when a config is checked (not when this module is), so those modules may
    import this one."""
    from sam_ft.data import demo, embedding_cache, intensity, skips, tasks
    from sam_ft.model import finetune, specs

    return {
        "INTENSITY_MODES": intensity.MODES,
        "INTENSITY_SCOPES": intensity.SCOPES,
        "SOURCES": tasks.SOURCES,
        "SLICE_AXES": tasks.SLICE_AXES,
        "DEMO_VARIANTS": demo.VARIANTS,
        "ON_ERROR": skips.ON_ERROR,
        "CACHE_EMBEDDINGS": embedding_cache.CACHE_EMBEDDINGS,
        "EMBEDDING_DTYPES": embedding_cache.EMBEDDING_DTYPES,
        "PREPROCESSES": specs.PREPROCESSES,
        "FINETUNE_MODES": finetune.MODES,
    }


def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a schema class, its ``Literal[NAME]`` resolved."""
    return typing.get_type_hints(cls, localns=owned_choices())


def _build(cls: type, value: Any, name: str) -> Any:
    """``value`` (a mapping) -> ``cls`` with every field checked; unknown keys are errors."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"{name}={_show(value)}: expected a mapping of {cls.__name__} options")
    hints = type_hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls)}
    for key in value:
        if str(key).startswith("_"):  # Hydra's _target_ etc.
            continue
        if key not in known:
            close = difflib.get_close_matches(str(key), list(known), n=1)
            hint = f" (did you mean {name}.{close[0]}?)" if close else ""
            raise ConfigError(
                f"unknown option {name}.{key}{hint}; known: {', '.join(sorted(known))}"
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
        kwargs[key] = _check(value[key], hints[key], f"{name}.{key}")
    return cls(**kwargs)


def _check(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked against the annotation ``tp`` (converted where lossless)."""
    ok, out = _match(value, tp, name)
    if not ok:
        raise ConfigError(f"{name}={_show(value)}: expected {_describe(tp)}")
    return out


def _match(value: Any, tp: Any, name: str) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _match(value, arg, name)
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
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    if origin is list:
        if not isinstance(value, list | tuple):
            return False, None
        (arg,) = typing.get_args(tp)
        return True, [_check(v, arg, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            return False, None
        args = typing.get_args(tp)
        if not args:
            return True, dict(value)
        return True, {k: _check(v, args[1], f"{name}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            return False, None
        return True, _build(tp, value, name)
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
    if origin is list:
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
