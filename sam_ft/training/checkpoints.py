"""A training run's checkpoint files: written atomically, verified before a resume picks one.

* :class:`AtomicCheckpointIO` writes every Lightning checkpoint through
  :func:`sam_ft.atomic.atomic_write`: a temporary file in the checkpoint's own folder (so the
  rename never becomes a copy across filesystems), ``fsync``, rename. A killed or failed write
  leaves the previous file intact; a full disk is one line naming the file and the space needed.
* :class:`StepCheckpoint` saves ``last.ckpt`` every N optimizer steps, except after a batch that
  validation follows: that state (epoch trained, validation pending) is one Lightning cannot
  resume exactly (it skips the validation), so a kill during validation resumes from the step
  before and runs that step and the validation again.
* :func:`resolve_ckpt_path` turns ``ckpt_path`` (``auto`` | ``last`` | a file | null) into the
  checkpoint to resume from: the newest of the run dir that reads back whole, with a warning
  naming each newer one that does not.
"""

from __future__ import annotations

import logging
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO

from sam_ft.atomic import atomic_write, check_free_space
from sam_ft.errors import ConfigError

log = logging.getLogger(__name__)


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) checkpoint dict: about its size on disk."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's ``torch.save`` checkpoints, written atomically in their own folder."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        # A full disk fails here, before anything is written, naming the space needed.
        check_free_space(path, tensor_bytes(checkpoint))
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def validation_follows(trainer) -> bool:
    """Whether Lightning validates after the training batch that just ended (the epoch's last
    batch, or a ``val_check_interval`` batch). Read from the epoch loop's own rule."""
    loop = trainer.fit_loop.epoch_loop
    fetcher = trainer.fit_loop._data_fetcher
    return fetcher is not None and bool(loop._should_check_val_fx(fetcher))


class StepCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every ``every_n_train_steps`` optimizer steps, after every validation and
    when training ends.

    A step that validation follows is saved once the validation has run, where Lightning's
    validation checkpoints are saved (the epoch's end, or the validation's end when it runs
    mid-epoch), so after the best checkpoint was chosen. Saved before the validation, it would
    hold "training batches done, validation not run", which Lightning resumes past the
    validation: that epoch's score and best checkpoint would be lost.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._after_validation = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if validation_follows(trainer):
            self._after_validation = True
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer, pl_module) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_after_validation(trainer)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_after_validation(trainer)

    def on_train_end(self, trainer, pl_module) -> None:
        # The finished state, whatever this process saved before: a run killed during export or
        # the final evaluation resumes from here without training again, and an interrupted run
        # ends with the same last.ckpt as an uninterrupted one.
        super().on_train_end(trainer, pl_module)
        if not trainer.sanity_checking and not trainer.fast_dev_run:
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))

    def _save_after_validation(self, trainer) -> None:
        if self._after_validation and not trainer.sanity_checking:
            self._after_validation = False
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


def is_intact(path: Path) -> str | None:
    """None when ``path`` is a whole checkpoint, else what is wrong with it (one line).

    ``torch.save`` writes a zip archive with a CRC per member: a truncated file has no central
    directory, a damaged one fails a CRC. Read in chunks, so memory stays small.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
            names = archive.namelist()
    except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
        return f"{type(err).__name__}: {err}"
    if bad is not None:
        return f"member {bad} fails its CRC"
    if not any(name.endswith("/data.pkl") for name in names):
        return "no data.pkl in the archive"
    return None


def resume_candidates(run_dir: Path) -> list[Path]:
    """The run dir's checkpoints, newest first. Each is a full training state (``last*.ckpt``
    of every writer, and the best-by-val/dice ones written at the end of a validation)."""
    found = [p for p in (Path(run_dir) / "checkpoints").glob("*.ckpt") if p.is_file()]
    return sorted(found, key=lambda p: p.stat().st_mtime_ns, reverse=True)


def newest_intact_checkpoint(run_dir: Path) -> Path | None:
    """The newest checkpoint of the run dir that reads back whole, warning about each newer one
    that does not (a write cut short by a full disk or an older, non-atomic writer)."""
    for path in resume_candidates(run_dir):
        problem = is_intact(path)
        if problem is None:
            return path
        log.warning("not resuming from %s: the file is damaged or cut short (%s)", path, problem)
    return None


def newest_last_checkpoint(run_dir: Path) -> Path | None:
    """The most recently written ``checkpoints/last*.ckpt`` of a run dir, or None (unverified)."""
    found = list((Path(run_dir) / "checkpoints").glob("last*.ckpt"))
    return max(found, key=lambda p: p.stat().st_mtime_ns) if found else None


def resolve_ckpt_path(ckpt_path: str | None, run_dir: Path) -> str | None:
    """``null`` -> fresh start; ``last`` -> this run dir's newest intact checkpoint, which must
    exist; ``auto`` -> that checkpoint when present (a requeued or restarted job), else a fresh
    start; any other value is an explicit checkpoint file, which wins."""
    if ckpt_path in (None, "", "null"):
        return None
    run_dir = Path(run_dir)
    if str(ckpt_path) in ("auto", "last"):
        newest = newest_intact_checkpoint(run_dir)
        if newest is not None:
            log.info("ckpt_path=%s: resuming from %s", ckpt_path, newest)
            return str(newest)
        if str(ckpt_path) == "auto":
            return None
        found = resume_candidates(run_dir)
        raise ConfigError(
            f"ckpt_path=last: no checkpoint to resume from in {run_dir / 'checkpoints'} ("
            + (
                f"{len(found)} found, none intact"
                if found
                else "the run was stopped before its first checkpoint, or this is not its run dir"
            )
            + "). Use ckpt_path=null to start afresh. Nothing was started."
        )
    path = Path(ckpt_path)
    if not path.is_file():
        raise ConfigError(f"ckpt_path={ckpt_path}: file not found")
    if (problem := is_intact(path)) is not None:
        raise ConfigError(f"ckpt_path={ckpt_path}: the file is damaged or cut short ({problem})")
    return str(path)
