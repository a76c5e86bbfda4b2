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

**Adding a config key**: declare it as one field of the dataclass of its group (``task`` ->
:class:`TaskConfig`, ``task.intensity`` -> :class:`IntensityConfig`, ``data`` ->
:class:`DataConfig`, ``data.split`` -> :class:`SplitConfig`, ``model`` -> :class:`ModelConfig`,
``finetune`` -> :class:`FinetuneConfig`, ``train`` -> :class:`TrainConfig`; ``eval`` ->
``EvalOptions`` in its owner, :mod:`sam_ft.evaluation.protocol.options`), with its type, and set
its default in the YAML. An undeclared key is
reported as unknown.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from sam_ft.defaults import group_defaults
from sam_ft.errors import ConfigError
from sam_ft.schema import build, check, optional

if TYPE_CHECKING:  # the schema's Literal[NAME]s; owned_choices() gives them at run time
    from sam_ft.data.demo import VARIANTS as DEMO_VARIANTS
    from sam_ft.data.embedding_cache import CACHE_EMBEDDINGS, EMBEDDING_DTYPES
    from sam_ft.data.intensity import MODES as INTENSITY_MODES
    from sam_ft.data.intensity import SCOPES as INTENSITY_SCOPES
    from sam_ft.data.skips import ON_ERROR
    from sam_ft.data.tasks import SLICE_AXES, SOURCES
    from sam_ft.evaluation.protocol.decode_select import MASK_SELECTIONS
    from sam_ft.evaluation.protocol.distributed import RunFacts
    from sam_ft.evaluation.protocol.options import EvalOptions
    from sam_ft.model.finetune import MODES as FINETUNE_MODES
    from sam_ft.model.specs import PREPROCESSES


# ---------------------------------------------------------------------------------------------
# Schema: one field per key (see the module docstring). ``Literal[NAME]``: NAME is the tuple of
# allowed values in the module that uses them (:func:`owned_choices`), never restated here.


@dataclass(frozen=True)
class IntensityConfig:
    """``task.intensity`` (sam_ft/data/intensity.py)."""

    mode: Literal[INTENSITY_MODES]
    scope: Literal[INTENSITY_SCOPES] | None
    keep_zero: bool | None
    level: float | None
    width: float | None
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
    # The base task's keys (conf/task/folder.yaml), which parse_config gives every preset.
    ignore_labels: list[int] | None
    case_pattern: str | None
    images_dir: str | None
    labels_dir: str | list[str] | None
    label_name: str | None
    layout: str | None
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
    """The checked groups of one run (``train`` only for ``train.py``); ``eval`` holds
    ``data.on_error`` too, the one key for bad files in loading and scoring alike."""

    task: TaskConfig
    data: DataConfig
    eval: EvalOptions
    model: ModelConfig
    finetune: FinetuneConfig
    train: TrainConfig | None
    seed: int


@dataclass(frozen=True)
class PredictConfig:
    """``predict.py``'s options (conf/predict.yaml; sam_ft/predict.py says what each does), with
    its ``model`` group and ``seed``."""

    model: ModelConfig
    seed: int
    checkpoint: str | None
    input: str
    output: str
    labels: str | None
    prompts: str | None
    box: list[float] | None
    points: list[list[float]] | None
    point_labels: list[int] | None
    slice: int | None
    label: int
    propagate: str | bool | None  # checked by sam_ft.inference.propagate.check_propagate
    strategy: str
    mask_selection: Literal[MASK_SELECTIONS]  # auto: the card's multimask_output decides
    overlay: bool
    on_error: Literal[ON_ERROR]
    max_prompts_per_call: int
    intensity: IntensityConfig | None
    slice_axis: Literal[SLICE_AXES] | None
    modality: str | None
    channel: int | None
    min_object_pixels: int | None
    everything: dict[str, int | float]  # grid and eval.everything's keys (checked by predict)


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

    from sam_ft.evaluation.protocol.options import eval_options

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
    task = _task_group(group("task"))
    data = _build(DataConfig, group("data"), "data")
    eval_cfg = group("eval")
    if not isinstance(eval_cfg, Mapping):
        raise ConfigError(f"eval={eval_cfg!r}: expected a mapping of EvalOptions options")
    options = eval_options({**eval_cfg, "on_error": data.on_error})
    run = RunConfig(
        task=task,
        data=data,
        eval=options,
        model=_build(ModelConfig, group("model"), "model"),
        finetune=_build(FinetuneConfig, group("finetune"), "finetune"),
        train=_build(TrainConfig, group("train"), "train") if entry == "train" else None,
        seed=seed,
    )
    _check_values(run, group("data"))
    from sam_ft.training.options import check_library_values

    check_library_values(cfg, entry)  # trainer, optimizer, scheduler: the libraries' values
    return run


def parse_predict_config(cfg: Any) -> PredictConfig:
    """Check ``predict.py``'s composed config and return its typed options (the ``eval`` group
    it interpolates from is checked too).

    Raises:
        ConfigError: one line naming the first bad option and what is expected.
    """
    from omegaconf import OmegaConf

    from sam_ft.evaluation.protocol.options import eval_options

    # eval's first: predict's Everything settings and batch are its values.
    eval_options(OmegaConf.to_container(cfg.eval, resolve=True))
    hints = type_hints(PredictConfig)
    values = {}
    for f in dataclasses.fields(PredictConfig):
        if f.name not in cfg or OmegaConf.is_missing(cfg, f.name):
            raise ConfigError(f"missing required option {f.name}: set {f.name}=...")
        node = cfg[f.name]
        value = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else node
        if f.name == "intensity" and isinstance(value, Mapping):
            # Options given in part (intensity={mode: none}) complete over the base task's, as
            # a task preset's do (_task_group).
            value = {**group_defaults("task", "folder")["intensity"], **value}
        values[f.name] = _check(value, hints[f.name], f.name)
    return PredictConfig(**values)


def with_model(run: RunConfig, model: Mapping[str, Any]) -> RunConfig:
    """``run`` with another ``model`` group (a model card's, ``inference.card.apply_card``),
    checked as :func:`parse_config` checks it."""
    return dataclasses.replace(run, model=_build(ModelConfig, model, "model"))


def run_facts(run: RunConfig, checkpoint: str | None) -> RunFacts:
    """What the run's evaluation rows depend on beside its options and models
    (:class:`~sam_ft.evaluation.protocol.distributed.RunFacts`); ``checkpoint``: the weights
    evaluated (``ckpt_path``), else ``model.checkpoint``."""
    from sam_ft.data.loading import slice_settings
    from sam_ft.data.tasks import to_plain
    from sam_ft.evaluation.protocol.distributed import RunFacts

    return RunFacts(
        task_name=run.task.name,
        seed=run.seed,
        model_name=run.model.name,
        checkpoint=str(checkpoint or run.model.checkpoint or ""),
        slicing=slice_settings(to_plain(run.task), to_plain(run.data)),
        data_split=dataclasses.asdict(run.data.split),
    )


def _task_group(task: Any) -> TaskConfig:
    """The ``task`` group complete: Hydra does not merge a preset over the base task, so the
    keys a preset leaves out take ``conf/task/folder.yaml``'s values here, once; the code below
    the task modules reads every key from the group it is handed."""
    from sam_ft.data.tasks import task_options, to_plain

    if isinstance(task, Mapping):
        base = group_defaults("task", "folder")
        intensity = task.get("intensity")
        task = {**base, **task}
        if intensity is None or isinstance(intensity, Mapping):
            task["intensity"] = {**base["intensity"], **(intensity or {})}
    checked = _build(TaskConfig, task, "task")  # types first: task_options trusts them
    return _build(TaskConfig, task_options(to_plain(checked)), "task")


def _check_values(run: RunConfig, data_cfg: Mapping) -> None:
    """Checks beyond types, by the code that uses the values (so the rules live in one place)."""
    from sam_ft.data.augment import SliceAugment

    task = run.task
    if task.source == "folder" and task.root is not None:
        root = Path(task.root).expanduser()
        images = root / (task.images_dir or "imagesTr")
        if not images.is_dir():
            what = "folder not found" if not root.is_dir() else f"has no {images.name}/ folder"
            layout = f"; expected layout: {task.layout}" if task.layout else ""
            raise ConfigError(f"task.root={task.root}: {what}{layout}")
    if task.source == "folder" and task.root is None:
        raise ConfigError("task.root is required for a folder task: task.root=/path/to/folder")
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
    from sam_ft.evaluation.protocol import decode_select
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
        "MASK_SELECTIONS": decode_select.MASK_SELECTIONS,  # predict's mask_selection
    }


def type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` of a schema class, its ``Literal[NAME]`` resolved."""
    return typing.get_type_hints(cls, localns=owned_choices())


def _build(cls: type, value: Any, name: str) -> Any:
    """``value`` (a mapping) -> ``cls``, checked (:func:`sam_ft.schema.build`)."""
    return build(cls, value, name, owned_choices())


def _check(value: Any, tp: Any, name: str) -> Any:
    """``value`` checked against the annotation ``tp`` (:func:`sam_ft.schema.check`)."""
    return check(value, tp, name, owned_choices())
