"""Preemption: SIGTERM, SIGUSR1 or submitit's signal end training with a checkpoint."""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

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
    ``sam_ft.train.train`` turns the exception into ``Preempted`` (exit code 1 with the
    resume command) instead of Lightning's silent exit 0.

    Advance warnings are treated as SIGTERM too: SIGUSR1 (SLURM's usual ``--signal=USR1@90``)
    unless Lightning's SLURM auto-requeue already handles it, and submitit's preemption signal
    (``SIGUSR2`` unless ``$SUBMITIT_PREEMPT_SIGNAL`` names another; the one ``hydra/launcher=slurm``
    asks SLURM to send). Submitit's own handler for it would requeue the job at once, mid-step and
    without a checkpoint; it is kept and called by :func:`requeue_if_submitit` once the
    checkpoint is saved, so the requeued job resumes from it (``ckpt_path=auto``).

    A signal during validation is held until the validation ends: a checkpoint taken midway
    holds neither the validation's partial scores nor a state Lightning resumes exactly, so
    validation finishes, its checkpoint callback saves ``last.ckpt``, then training stops
    (Lightning stops after the epoch's end hooks, or after the validation mid-epoch).
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self.saved: Path | None = None
        self.requeue: Callable[[], None] | None = None
        self._previous: dict[int, Any] = {}
        self._holding = False
        self._lightning_handler: Any = None
        self._signal_held = False

    def on_fit_start(self, trainer, pl_module) -> None:
        for signum in sorted({signal.SIGUSR1, submitit_signal()}):
            previous = signal.getsignal(signum)
            if previous in (signal.SIG_DFL, None):
                self._previous[signum] = signal.signal(signum, _as_sigterm)
            elif _is_submitit_handler(previous):
                self._previous[signum] = signal.signal(signum, self._preempted_by_submitit)

    def _preempted_by_submitit(self, signum, frame) -> None:
        handler = self._previous[signum]
        self.requeue = lambda: handler(signum, None)
        log.warning("received %s from submitit: stopping with a checkpoint", signal.Signals(signum))
        _as_sigterm(signum, frame)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        self._lightning_handler = signal.signal(signal.SIGTERM, self._hold)
        self._holding = True
        # A signal that came during the step before: Lightning would stop at the first
        # validation batch. (Its flag has no public setter.)
        if trainer.received_sigterm:
            trainer._signal_connector.received_sigterm = False
            self._signal_held = True

    def _hold(self, signum, frame) -> None:
        log.warning("received %s during validation: stopping once it ends", signal.Signals(signum))
        self._signal_held = True

    def on_validation_end(self, trainer, pl_module) -> None:
        self._release()

    def _release(self) -> None:
        """Give SIGTERM back to Lightning's handler, and pass it a signal held meanwhile."""
        if not self._holding:
            return
        self._holding = False
        signal.signal(signal.SIGTERM, self._lightning_handler or signal.SIG_DFL)
        if self._signal_held:
            self._signal_held = False
            os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._release()
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        path = self.dirpath / "last.ckpt"
        trainer.save_checkpoint(path)
        self.saved = path
        log.error("received SIGTERM: saved %s at step %d", path, trainer.global_step)

    def on_fit_end(self, trainer, pl_module) -> None:
        self._restore()

    def _restore(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


def submitit_signal() -> signal.Signals:
    """The signal submitit sends before a preemption or time limit (its ``USR_SIG``)."""
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2").upper().removeprefix("SIG")
    return getattr(signal, name, signal.SIGUSR2)


def _is_submitit_handler(handler: Any) -> bool:
    owner = getattr(handler, "__self__", None)
    return owner is not None and type(owner).__module__.startswith("submitit.")


def _as_sigterm(signum, frame) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def requeue_if_submitit(trainer: L.Trainer) -> None:
    """After a checkpointed stop by submitit's signal: let submitit requeue the job.

    Submitit's handler checkpoints the job's call (Hydra's launcher resubmits the same job, whose
    ``ckpt_path=auto`` then finds ``last.ckpt``) and exits; on ranks other than 0 it returns and
    the caller raises :class:`Preempted` as for a plain SIGTERM.
    """
    for cb in trainer.callbacks:
        if isinstance(cb, PreemptionCheckpoint) and cb.requeue is not None and cb.saved:
            requeue, cb.requeue = cb.requeue, None
            requeue()


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
