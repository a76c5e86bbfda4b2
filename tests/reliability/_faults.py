"""Fault injectors for the reliability tests, loaded into real ``train.py`` runs as callbacks.

They are added from the command line (``+callbacks.fault._target_=_faults.SignalAtStep``,
``loss._target_=_faults.NanLossFrom``) with this folder on ``PYTHONPATH``, so the run under test
is the product's entry point, unchanged.
"""

from __future__ import annotations

import os
import signal

import lightning as L

from sam_ft.training.losses import SegmentationLoss


class SignalAtStep(L.Callback):
    """Sends ``signum`` to this process when training reaches ``step``.

    ``when="end"``: after that step's update, before its step checkpoint is written (callbacks run
    before Lightning's checkpoint callbacks). ``when="start"``: as the next batch starts, i.e.
    right after step ``step``'s checkpoint was written. ``when="validation"``: after the first
    batch of the validation that follows step ``step``.

    With SIGKILL the process dies at once: whatever the checkpoints hold at that moment is all a
    resume gets, exactly as after an out-of-memory kill or a node failure.
    """

    def __init__(self, step: int, signum: int = int(signal.SIGKILL), when: str = "end") -> None:
        if when not in ("start", "end", "validation"):
            raise ValueError(f"when must be start, end or validation, got {when!r}")
        self.step = int(step)
        self.signum = int(signum)
        self.when = when

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.when == "start" and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.when == "end" and trainer.global_step == self.step:
            os.kill(os.getpid(), self.signum)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args) -> None:
        if self.when == "validation" and trainer.global_step == self.step and batch_idx == 0:
            os.kill(os.getpid(), self.signum)


class NanLossFrom(SegmentationLoss):
    """The training loss, NaN from the ``first_nan``-th call on (1-based): a diverging run."""

    def __init__(self, first_nan: int, **kwargs) -> None:
        super().__init__(**kwargs)
        self.first_nan = int(first_nan)
        self.calls = 0

    def forward(self, *args, **kwargs):
        loss, parts = super().forward(*args, **kwargs)
        self.calls += 1
        if self.calls >= self.first_nan:
            loss = loss * float("nan")
        return loss, parts


class Fp16WithScaler(L.Callback):
    """Runs training in fp16 autocast with a real ``GradScaler`` starting at ``init_scale``.

    Lightning turns ``precision=16-mixed`` into bf16 on CPU, so the plugin a ``16-mixed`` GPU run
    gets (``MixedPrecision`` + ``GradScaler``) is put in place here before training starts. A huge
    start makes the first steps' scaled gradients overflow, as in a real fp16 run's first steps or
    after a loss spike; ``backoff_factor`` sets how fast the scaler recovers.
    """

    def __init__(self, init_scale: float, backoff_factor: float = 0.5) -> None:
        self.init_scale = float(init_scale)
        self.backoff_factor = float(backoff_factor)

    def setup(self, trainer, pl_module, stage) -> None:
        import torch
        from lightning.pytorch.plugins import MixedPrecision

        scaler = torch.amp.GradScaler(
            "cpu", init_scale=self.init_scale, backoff_factor=self.backoff_factor
        )
        trainer.strategy.precision_plugin = MixedPrecision("16-mixed", "cpu", scaler)


class KillInside(L.Callback):
    """SIGKILLs this process at the ``nth`` call of one of the product's own steps, outside
    Lightning's hooks: data preparation, embedding caching, a checkpoint or export write (cut
    in the middle: half the bytes are on disk), or the final evaluation's progress record.

    The step is wrapped when this callback is built (``build_trainer``, before ``fit``), so data
    preparation inside ``fit`` and the export and evaluation after it are covered too.
    """

    TARGETS = {
        # where: (module, attribute, the call writes a file to cut short)
        "prep": ("sam_ft.data.preparation", "prepare_star", False),
        "embedding": ("sam_ft.data.embedding_cache", "EmbeddingCache.put", False),
        "checkpoint": ("sam_ft.training.checkpoints", "atomic_write", True),
        "export": ("sam_ft.model.checkpoint", "atomic_write", True),
        "evaluation": ("sam_ft.evaluation.protocol.engine", "append_progress", False),
    }

    def __init__(
        self, where: str, nth: int = 1, signum: int = int(signal.SIGKILL), once: str | None = None
    ) -> None:
        """``signum`` instead of SIGKILL (submitit's preemption signal); with ``once`` (a file
        path) only the first process fires (a requeued job then runs to its end)."""
        import importlib
        from pathlib import Path

        module, attr, midwrite = self.TARGETS[where]
        owner = importlib.import_module(module)
        if "." in attr:
            cls, attr = attr.split(".")
            owner = getattr(owner, cls)
        real = getattr(owner, attr)
        calls = [0]

        def die() -> None:
            if once is not None:
                if Path(once).exists():
                    return
                Path(once).touch()
            os.kill(os.getpid(), int(signum))

        def dying(*args, **kwargs):
            calls[0] += 1
            if calls[0] != int(nth):
                return real(*args, **kwargs)
            if not midwrite:
                die()  # returns when the signal's handler does (or the fault fired before)
                return real(*args, **kwargs)
            path, write = args

            def half(f) -> None:
                write(f)
                f.flush()
                f.truncate(f.tell() // 2)
                f.flush()
                os.fsync(f.fileno())
                die()

            return real(path, half)

        setattr(owner, attr, dying)
