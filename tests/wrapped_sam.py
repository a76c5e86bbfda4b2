"""``TrainableSam`` around an architecture a test builds itself (a tiny ViT at a 64 px input,
weights it changed): the wrapper's settings come from ``conf/model/<name>.yaml``, the one place
of their defaults (``build_from_yaml("model", name)`` builds only the published input sizes)."""

from __future__ import annotations

from torch import nn

from sam_ft.defaults import group_defaults
from sam_ft.model.trainable import TrainableSam

SETTINGS = ("preprocess", "grad_checkpointing", "encoder_bf16", "multimask_output")


def wrap_sam(sam: nn.Module, model: str = "tiny", **overrides) -> TrainableSam:
    """``sam`` wrapped with ``model``'s YAML settings, ``overrides`` winning."""
    cfg = group_defaults("model", model)
    return TrainableSam(sam, **{**{k: cfg[k] for k in SETTINGS}, **overrides})
