"""The ``eval`` config group, parsed once into a checked, typed :class:`EvalOptions`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sam_ft.data.skips import check_on_error
from sam_ft.errors import ConfigError
from sam_ft.evaluation.metrics.object_metrics import NSD_METHODS
from sam_ft.evaluation.protocol.decode_select import MASK_SELECTIONS
from sam_ft.evaluation.protocol.everything import EverythingConfig
from sam_ft.evaluation.protocol.scoring_pool import resolve_workers
from sam_ft.evaluation.reports.statistics import Bootstrap
from sam_ft.prompts.jitter import JitterRange, jitter_levels
from sam_ft.prompts.strategies import POINT_SAMPLINGS, STRATEGIES

# --------------------------------------------------------------------------------------------
# Configuration and inputs


@dataclass(frozen=True)
class PropagateOptions:
    """``eval.propagate``, checked (``eval.mode=propagate``; see
    :mod:`sam_ft.evaluation.protocol.propagation`)."""

    prompt: str
    key: str
    keys: int
    stop: str
    margin_px: int

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> PropagateOptions:
        unknown = sorted(set(cfg) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown eval.propagate option(s) {unknown}")
        opts = cls(**cfg)
        if opts.prompt not in PROPAGATORS:
            raise ConfigError(f"eval.propagate.prompt must be one of {PROPAGATORS}")
        if opts.key not in KEY_RULES:
            raise ConfigError(f"eval.propagate.key must be one of {KEY_RULES}, got {opts.key!r}")
        if isinstance(opts.keys, bool) or not isinstance(opts.keys, int) or opts.keys < 1:
            raise ConfigError(f"eval.propagate.keys must be an integer >= 1, got {opts.keys!r}")
        if opts.keys > 1 and opts.key != "even":
            raise ConfigError("eval.propagate.keys > 1 needs eval.propagate.key=even")
        if opts.stop not in STOP_RULES:
            raise ConfigError(f"eval.propagate.stop must be one of {STOP_RULES}")
        if isinstance(opts.margin_px, bool) or not isinstance(opts.margin_px, int):
            raise ConfigError(f"eval.propagate.margin_px must be an integer, got {opts.margin_px}")
        if opts.margin_px < 0:
            raise ConfigError(f"eval.propagate.margin_px must be >= 0, got {opts.margin_px}")
        return opts


MODES = ("slices", "propagate")
PROPAGATORS = ("box", "memory")
KEY_RULES = ("largest", "middle", "even")
STOP_RULES = ("vanish", "box_ends")


@dataclass(frozen=True)
class EvalOptions:
    """The ``eval`` config, checked. ``variants`` are the (prompt, jitter) pairs decoded per
    object, in table order; ``everything`` is evaluated without jitter only."""

    prompts: tuple[str, ...]
    levels: tuple[JitterRange | None, ...]
    mask_selection: str
    point_sampling: str
    nsd_tolerance_mm: float
    nsd_method: str
    clicks: int
    save_predictions: bool
    max_prompts_per_call: int
    overlays: int
    volume_gt: str
    on_error: str
    everything: EverythingConfig
    bootstrap: Bootstrap
    mode: str
    propagate: PropagateOptions
    workers: int = 0
    queue_mb: int | None = None  # None: no bound in bytes (the count bound, workers + 1, holds)

    @property
    def variants(self) -> list[tuple[str, JitterRange | None]]:
        return [(p, j) for p in self.prompts if p != "everything" for j in self.levels]


def eval_options(cfg: Mapping[str, Any] | None) -> EvalOptions:
    """Merge ``cfg`` (the ``eval`` config; a DictConfig is accepted) over the defaults of
    ``conf/eval/default.yaml`` (:func:`~sam_ft.defaults.group_defaults`) and check.

    ``cfg`` may also hold ``on_error`` (``raise``, the default, or ``skip``): the entry points
    put ``data.on_error`` there, the one key for bad files in loading and scoring alike.

    Raises:
        ConfigError: an unknown key or an invalid value, naming the option.
    """
    if cfg is not None and not isinstance(cfg, dict):
        try:
            from omegaconf import OmegaConf

            cfg = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        except ValueError:
            cfg = dict(cfg)
    from sam_ft.defaults import group_defaults

    defaults = group_defaults("eval")
    merged = {**defaults, **(cfg or {})}
    on_error = check_on_error(merged.pop("on_error", "raise"), "data.on_error")
    unknown = sorted(set(merged) - set(defaults))
    if unknown:
        raise ConfigError(f"unknown eval option(s) {unknown}; known: {sorted(defaults)}")
    prompts = tuple(merged["prompts"] or ())
    bad = [p for p in prompts if p not in STRATEGIES]
    if bad or not prompts:
        raise ConfigError(f"eval.prompts must be a non-empty subset of {STRATEGIES}, got {bad}")
    if merged["mask_selection"] not in MASK_SELECTIONS:
        raise ConfigError(f"eval.mask_selection must be one of {MASK_SELECTIONS}")
    if merged["point_sampling"] not in POINT_SAMPLINGS:
        raise ConfigError(f"eval.point_sampling must be one of {POINT_SAMPLINGS}")
    if merged["nsd_method"] not in NSD_METHODS:
        raise ConfigError(f"eval.nsd_method must be one of {NSD_METHODS}")
    if merged["volume_gt"] not in ("kept", "full"):
        raise ConfigError("eval.volume_gt must be 'kept' or 'full'")
    workers = merged["workers"]
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)):
        raise ConfigError(f"eval.workers must be an integer >= 0 or null, got {workers!r}")
    if workers is not None and workers < 0:
        raise ConfigError(f"eval.workers must be >= 0 or null (the cores left), got {workers}")
    queue_mb = merged["queue_mb"]
    if isinstance(queue_mb, bool) or not isinstance(queue_mb, int) or queue_mb < 1:
        raise ConfigError(f"eval.queue_mb must be an integer >= 1 (MiB), got {queue_mb!r}")
    if int(merged["max_prompts_per_call"]) < 1 or int(merged["clicks"]) < 0:
        raise ConfigError("eval.max_prompts_per_call must be >= 1 and eval.clicks >= 0")
    try:
        levels = tuple(jitter_levels(merged["jitter_px"]))
        everything = EverythingConfig.from_eval_cfg(merged)
    except (ValueError, TypeError, AttributeError) as e:
        raise ConfigError(f"eval.jitter_px / eval.everything: {e}") from e
    if not isinstance(merged["bootstrap"], Mapping):
        raise ConfigError(f"eval.bootstrap must be a mapping, got {merged['bootstrap']!r}")
    if merged["mode"] not in MODES:
        raise ConfigError(f"eval.mode must be one of {MODES}, got {merged['mode']!r}")
    if not isinstance(merged["propagate"], Mapping):
        raise ConfigError(f"eval.propagate must be a mapping, got {merged['propagate']!r}")
    propagate = PropagateOptions.from_mapping({**defaults["propagate"], **merged["propagate"]})
    if merged["mode"] == "propagate" and "everything" in prompts:
        raise ConfigError(
            "eval.mode=propagate prompts key slices with S2-S6; remove everything from eval.prompts"
        )
    if merged["mode"] == "propagate" and int(merged["clicks"]):
        raise ConfigError("eval.clicks needs eval.mode=slices (clicks are per slice)")
    bootstrap = Bootstrap.from_mapping({**defaults["bootstrap"], **merged["bootstrap"]})
    return EvalOptions(
        prompts=tuple(p for p in STRATEGIES if p in prompts),
        levels=levels,
        mask_selection=str(merged["mask_selection"]),
        point_sampling=str(merged["point_sampling"]),
        nsd_tolerance_mm=float(merged["nsd_tolerance_mm"]),
        nsd_method=str(merged["nsd_method"]),
        clicks=int(merged["clicks"]),
        save_predictions=bool(merged["save_predictions"]),
        max_prompts_per_call=int(merged["max_prompts_per_call"]),
        overlays=int(merged["overlays"]),
        volume_gt=str(merged["volume_gt"]),
        on_error=on_error,
        everything=everything,
        bootstrap=bootstrap,
        mode=str(merged["mode"]),
        propagate=propagate,
        workers=resolve_workers(workers),
        queue_mb=queue_mb,
    )
