"""The ``eval`` config group: one dataclass, :class:`EvalOptions`, whose fields are the keys of
``conf/eval/default.yaml`` (their allowed values from the modules that use them), parsed and
checked once by :func:`eval_options` (``sam_ft.config.parse_config`` calls it for a run)."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from sam_ft.data.skips import ON_ERROR
from sam_ft.errors import ConfigError
from sam_ft.evaluation.metrics.object_metrics import NSD_METHODS
from sam_ft.evaluation.protocol.decode_select import MASK_SELECTIONS
from sam_ft.evaluation.protocol.everything import EverythingConfig
from sam_ft.evaluation.protocol.merge import Shard, parse_shard
from sam_ft.evaluation.reports.statistics import Bootstrap
from sam_ft.prompts.jitter import JitterRange, jitter_levels
from sam_ft.prompts.strategies import POINT_SAMPLINGS, STRATEGIES
from sam_ft.schema import build

MODES = ("slices", "propagate")
SPLITS = ("train", "val", "test")
EVAL_SPLITS = ("test", "val", "all")
VOLUME_GTS = ("full", "kept")
PROPAGATORS = ("box", "memory")
KEY_RULES = ("largest", "middle", "even")
STOP_RULES = ("vanish", "box_ends")


@dataclass(frozen=True)
class PropagateOptions:
    """``eval.propagate`` (``eval.mode=propagate``; see
    :mod:`sam_ft.evaluation.protocol.propagation`)."""

    prompt: Literal[PROPAGATORS]
    key: Literal[KEY_RULES]
    keys: int
    stop: Literal[STOP_RULES]
    margin_px: int

    def check(self) -> None:
        """The rules between values (the types are checked when it is built)."""
        if self.keys < 1:
            raise ConfigError(f"eval.propagate.keys must be an integer >= 1, got {self.keys!r}")
        if self.keys > 1 and self.key != "even":
            raise ConfigError("eval.propagate.keys > 1 needs eval.propagate.key=even")
        if self.margin_px < 0:
            raise ConfigError(f"eval.propagate.margin_px must be >= 0, got {self.margin_px}")


@dataclass(frozen=True)
class EverythingOptions:
    """``eval.everything``: ``SamAutomaticMaskGenerator``'s filters (its grid is ``eval.grid``,
    its batch ``eval.max_prompts_per_call``: :attr:`EvalOptions.generator`)."""

    pred_iou_thresh: float
    stability_score_thresh: float
    stability_score_offset: float
    box_nms_thresh: float
    min_mask_region_area: int


@dataclass(frozen=True)
class EvalOptions:
    """The ``eval`` group, checked; ``on_error`` is ``data.on_error`` (the one key for bad files
    in loading and scoring alike). ``variants`` are the (prompt, jitter) pairs decoded per
    object, in table order; ``everything`` is evaluated without jitter only."""

    split: Literal[EVAL_SPLITS]  # which cases the entry point scores (``splits``)
    shard: str | None  # "K/N": score only that share of them (``share``); None: all
    mode: Literal[MODES]
    propagate: PropagateOptions
    prompts: tuple[str, ...]  # in table order (``STRATEGIES``)
    jitter_px: tuple[tuple[float, ...], ...]
    mask_selection: Literal[MASK_SELECTIONS]
    point_sampling: Literal[POINT_SAMPLINGS]
    grid: int
    nsd_tolerance_mm: float
    nsd_method: Literal[NSD_METHODS]
    clicks: int
    save_predictions: bool
    max_prompts_per_call: int
    overlays: int
    volume_gt: Literal[VOLUME_GTS]
    workers: int | None  # None: this rank's cores less one (``scoring_pool.resolve_workers``)
    queue_mb: int
    bootstrap: Bootstrap
    everything: EverythingOptions
    # data.on_error (given by the entry points with the group; not an eval key).
    on_error: Literal[ON_ERROR] = field(metadata={"key": False})

    @cached_property
    def levels(self) -> tuple[JitterRange | None, ...]:
        """The jitter levels decoded: ``None`` (unjittered) first, then ``jitter_px``'s."""
        return tuple(jitter_levels(self.jitter_px))

    @property
    def variants(self) -> list[tuple[str, JitterRange | None]]:
        return [(p, j) for p in self.prompts if p != "everything" for j in self.levels]

    @property
    def splits(self) -> tuple[str, ...]:
        """The data splits of ``split`` (``all``: train, val and test)."""
        return SPLITS if self.split == "all" else (self.split,)

    @property
    def share(self) -> Shard | None:
        """``shard`` parsed."""
        return parse_shard(self.shard)

    @property
    def generator(self) -> EverythingConfig:
        """Everything mode's ``SamAutomaticMaskGenerator`` settings."""
        return EverythingConfig(
            grid=self.grid,
            points_per_batch=self.max_prompts_per_call,
            **dataclasses.asdict(self.everything),
        )

    def protocol(self) -> dict[str, Any]:
        """The options every row depends on, as ``eval`` keys (``eval_options`` reads them back):
        what shares must agree on to be merged. ``split``, ``shard``, ``workers``, ``queue_mb``
        and ``on_error`` never change a row and are left out."""
        keys = dataclasses.asdict(self)
        for key in ("split", "shard", "workers", "queue_mb", "on_error"):
            keys.pop(key)
        keys["prompts"] = list(self.prompts)
        keys["jitter_px"] = [list(level) for level in self.levels if level is not None]
        return keys


def eval_options(cfg: Mapping[str, Any] | None) -> EvalOptions:
    """Merge ``cfg`` (the ``eval`` group's keys) over the defaults of ``conf/eval/default.yaml``
    (:func:`~sam_ft.defaults.group_defaults`) and check.

    ``cfg`` may also hold ``on_error`` (``raise`` or ``skip``; else ``data.on_error``'s default):
    the entry points put ``data.on_error`` there, the one key for bad files in loading and
    scoring alike.

    Raises:
        ConfigError: an unknown key or an invalid value, naming the option.
    """
    from sam_ft.data.tasks import to_plain
    from sam_ft.defaults import group_defaults

    cfg = dict(to_plain(cfg) or {})
    defaults = {**group_defaults("eval"), "on_error": group_defaults("data")["on_error"]}
    merged = {**defaults, **cfg}
    for block in ("propagate", "bootstrap", "everything"):  # a partial block takes the rest
        if isinstance(merged[block], Mapping):
            merged[block] = {**defaults[block], **merged[block]}
    opts = build(EvalOptions, merged, "eval")
    bad = [p for p in opts.prompts if p not in STRATEGIES]
    if bad or not opts.prompts:
        raise ConfigError(f"eval.prompts must be a non-empty subset of {STRATEGIES}, got {bad}")
    if opts.workers is not None and opts.workers < 0:
        raise ConfigError(f"eval.workers must be >= 0 or null (the cores left), got {opts.workers}")
    if opts.queue_mb < 1:
        raise ConfigError(f"eval.queue_mb must be an integer >= 1 (MiB), got {opts.queue_mb!r}")
    if opts.max_prompts_per_call < 1 or opts.clicks < 0:
        raise ConfigError("eval.max_prompts_per_call must be >= 1 and eval.clicks >= 0")
    try:
        opts.levels  # noqa: B018 - checks the ranges
        opts.generator  # noqa: B018
    except (ValueError, TypeError) as e:
        raise ConfigError(f"eval.jitter_px / eval.everything: {e}") from e
    opts.propagate.check()
    if opts.mode == "propagate" and "everything" in opts.prompts:
        raise ConfigError(
            "eval.mode=propagate prompts key slices with S2-S6; remove everything from eval.prompts"
        )
    if opts.mode == "propagate" and opts.clicks:
        raise ConfigError("eval.clicks needs eval.mode=slices (clicks are per slice)")
    opts.share  # noqa: B018 - checks K/N
    return dataclasses.replace(
        _floats(opts),
        prompts=tuple(p for p in STRATEGIES if p in opts.prompts),
        everything=_floats(opts.everything),
        bootstrap=Bootstrap.from_mapping(dataclasses.asdict(opts.bootstrap)),  # its value rules
    )


def _floats(options: Any) -> Any:
    """``options`` with its ``float`` fields as floats (``eval.nsd_tolerance_mm=2`` is 2.0, as
    the provenance hash and the tables have always written it)."""
    hints = typing.get_type_hints(type(options))
    return dataclasses.replace(
        options,
        **{k: float(getattr(options, k)) for k, tp in hints.items() if tp is float},
    )
