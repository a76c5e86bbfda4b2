"""Callbacks that keep long runs safe: preemption checkpoints and the non-finite guard."""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (SLURM preemption, ``kill``), save ``last.ckpt`` after the current step and exit.

    The signal handler only sets a flag: saving from inside a handler could interrupt a write in
    progress. The process then exits non-zero with a message saying how to resume.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self._signal: int | None = None
        self._previous = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._previous = signal.getsignal(signal.SIGTERM)
        signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self._signal = signum

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._signal is None:
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        log.error("received signal %d: saved %s", self._signal, path)
        raise SystemExit(
            f"stopped by signal {self._signal} at step {trainer.global_step}; checkpoint saved to "
            f"{path}. Resume with: python train.py <same overrides> ckpt_path=last "
            f"hydra.run.dir={self.dirpath.parent}"
        )

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
