"""Per-image image-encoder time of each model in an evaluation, for the model study.

The engine times every ``model.encode`` call it makes (one image each; on a GPU the clock stops
after the device has finished) and ``evaluate.py`` writes the median per model into
``run_info.json`` (``encoder_seconds_per_image``); ``sam-ft-report`` puts it beside the Dice.
The median leaves out the first call's one-off costs (allocations, lazy initialisation). Times are
kept per model object, in the process that encodes (the engine's main process).
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

_TIMES: weakref.WeakKeyDictionary[nn.Module, list[float]] = weakref.WeakKeyDictionary()


@contextmanager
def encoder_clock(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Time one single-image encode of ``model`` on ``device`` (wall clock, seconds)."""
    start = time.perf_counter()
    yield
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    _TIMES.setdefault(model, []).append(time.perf_counter() - start)


def encoder_seconds(model: nn.Module) -> tuple[float, int] | None:
    """(median seconds per image, images timed) of ``model`` so far, or None if none."""
    times = _TIMES.get(model)
    return (statistics.median(times), len(times)) if times else None


def device_label(device: torch.device) -> str:
    """Where the times were measured: the GPU's name, or the CPU and torch's thread count."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    cpu = platform.processor() or platform.machine()
    return f"cpu {cpu}, {torch.get_num_threads()} torch threads"
