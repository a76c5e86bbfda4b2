"""Preemption: a SIGTERM or SIGUSR1 ends training with a checkpoint and a non-zero exit."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path

import lightning as L
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sam_ft.errors import SamFtError

log = logging.getLogger(__name__)


class Preempted(SamFtError):
    """Training stopped by a signal; a checkpoint to resume from was saved."""


class PreemptionCheckpoint(L.Callback):
    """On SIGTERM (SLURM preemption, ``kill``) save ``last.ckpt`` after the current step.

    Lightning notices SIGTERM itself (and tells every DDP rank), finishes the step and raises
    ``SIGTERMException``; this callback saves the checkpoint from ``on_exception``, then
    ``sam_ft.training.run.train`` turns the exception into ``Preempted`` (exit code 1 with the
    resume command) instead of Lightning's silent exit 0. SIGUSR1, SLURM's usual advance
    warning (``--signal=USR1@90``), is treated as SIGTERM unless Lightning's SLURM auto-requeue
    already handles it.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self._previous_usr1 = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if signal.getsignal(signal.SIGUSR1) in (signal.SIG_DFL, None):
            self._previous_usr1 = signal.signal(signal.SIGUSR1, _as_sigterm)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, SIGTERMException):
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        self.saved = path
        log.error("received SIGTERM: saved %s at step %d", path, trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._previous_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._previous_usr1)


def _as_sigterm(signum, frame) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def preempted_error(trainer: L.Trainer) -> Preempted:
    """The message for a run stopped by SIGTERM: where the checkpoint is and how to resume."""
    saved = next(
        (cb.saved for cb in trainer.callbacks if isinstance(cb, PreemptionCheckpoint)), None
    )
    where = f"checkpoint saved to {saved}" if saved else "no checkpoint was saved"
    run_dir = Path(trainer.default_root_dir)
    return Preempted(
        f"stopped by signal 15 (SIGTERM) at step {trainer.global_step}; {where}. Resume with: "
        f"python train.py <same overrides> ckpt_path=last hydra.run.dir={run_dir}"
    )
