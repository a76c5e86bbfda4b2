"""Hydra entry points: ``train.py`` / ``sam-ft-train``, ``evaluate.py`` / ``sam-ft-evaluate`` and
``predict.py`` / ``sam-ft-predict``."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from sam_ft.config import config_dir
from sam_ft.errors import SamFtError

log = logging.getLogger("sam_ft")


def _guarded(fn):
    """Our own errors end the run with one readable line and exit code 1, not a traceback.

    Also when Hydra wraps them: an error raised while a ``_target_`` is built (a bad checkpoint,
    a model/image-size mismatch) arrives as ``InstantiationException`` with ours as its cause.
    """

    def run(cfg: DictConfig):
        try:
            return fn(cfg)
        except Exception as err:
            ours = _own_error(err)
            if ours is None:
                raise
            log.error("%s", ours)
            print(f"error: {ours}", file=sys.stderr)
            raise SystemExit(1) from None

    return run


def _own_error(err: BaseException | None) -> SamFtError | None:
    while err is not None and not isinstance(err, SamFtError):
        err = err.__cause__ or err.__context__
    return err


@hydra.main(config_path=config_dir(), config_name="train", version_base="1.3")
def train(cfg: DictConfig) -> float | None:
    from sam_ft.logging_results import sweep_objective
    from sam_ft.training.run import train as run_train

    metrics = _guarded(run_train)(cfg)
    # Hydra sweepers optimise the returned value: the finetuned model's evaluated box Dice.
    return sweep_objective(metrics)


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
def evaluate(cfg: DictConfig) -> None:
    from sam_ft.evaluation.run import evaluate as run_evaluate

    _guarded(run_evaluate)(cfg)


def predict_overrides(args: list[str]) -> list[str]:
    """``prompt=X`` -> ``strategy=X``: ``prompt`` names the training-prompt config group, so
    Hydra would read ``prompt=everything`` as a group choice; predict's key is ``strategy``."""
    return [f"strategy={a.split('=', 1)[1]}" if a.startswith("prompt=") else a for a in args]


@hydra.main(config_path=config_dir(), config_name="predict", version_base="1.3")
def _predict(cfg: DictConfig) -> None:
    from sam_ft.inference.run import predict as run_predict

    _guarded(run_predict)(cfg)


def predict() -> None:
    """``predict.py`` / ``sam-ft-predict`` (``prompt=`` accepted for ``strategy=``)."""
    sys.argv = [sys.argv[0], *predict_overrides(sys.argv[1:])]
    _predict()
