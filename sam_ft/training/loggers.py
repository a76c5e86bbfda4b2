"""A CSV logger that keeps the rows of the run it resumes.

Lightning's ``CSVLogger`` deletes ``metrics.csv`` when it finds one: a resumed run (``ckpt_path=
last`` or ``auto``, a requeued job) would lose every row logged before the interruption.
:class:`AppendingCSVLogger` appends instead, under the file's own header (new columns rewrite it,
as Lightning does). Rows logged after the checkpoint a run resumes from, and before it was
killed, appear twice (the resumed run logs those steps again).
"""

from __future__ import annotations

import csv

from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Called by the writer's constructor in place of deleting an existing metrics.csv: its
        # header becomes the known columns, so new rows line up with the old ones.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])


class AppendingCSVLogger(CSVLogger):
    """``CSVLogger`` (same arguments) that appends to an existing ``metrics.csv``."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
