"""The evaluation task: ``python evaluate.py`` / ``sam-ft-evaluate`` score one model with the
study's protocol (the work is :func:`sam_ft.evaluation.run.evaluate`; ``main`` is its Hydra entry
point)."""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sam_ft.config import config_dir
from sam_ft.errors import exit_on_own_error


@hydra.main(config_path=config_dir(), config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    """``python evaluate.py`` / ``sam-ft-evaluate``."""
    from sam_ft.evaluation.run import evaluate

    exit_on_own_error(evaluate)(cfg)
