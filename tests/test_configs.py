"""Every config group option and experiment composes and instantiates its objects."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = ["model", "task", "finetune", "prompt", "loss", "trainer", "logger", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda x: str(x)
)
def test_train_config_composes(group, option, tmp_path):
    # The paper's experiments need a task (they never silently train on the demo).
    task = ["task=liver_ct"] if option.startswith("paper_") else []
    cfg = _compose("train", [f"{group}={option}", f"paths.log_dir={tmp_path}", *task])
    assert cfg.seed == 42 and "ckpt_path" in cfg
    if group in ("finetune", "prompt"):
        assert instantiate(cfg[group]) is not None
    if group == "loss":  # iou_weight: null is set from eval.mask_selection by build_loss
        from sam_ft.training.run import build_loss

        assert build_loss(cfg) is not None


def test_paper_recipe():
    cfg = _compose("train", ["experiment=paper_vit_h", "task=liver_ct"])
    assert cfg.model.name == "vit_h" and cfg.finetune.name == "decoder"
    assert cfg.optimizer.lr == 1e-4 and cfg.optimizer.weight_decay == 0.01
    assert cfg.data.batch_size == 2 and cfg.trainer.max_epochs == 20
    assert cfg.loss.kind == "dice_ce"


def test_command_line_model_and_task_win_over_the_default_experiment():
    cfg = _compose("train", ["model=vit_b", "task=liver_ct"])
    assert cfg.model.name == "vit_b" and cfg.task.name == "liver_ct"
    assert cfg.trainer.max_epochs == 20  # the paper's recipe, not a demo budget


def test_eval_config_composes():
    cfg = _compose("eval", ["model=vit_b", "task=liver_ct"])
    assert cfg.eval.prompts == [
        "everything",
        "point1",
        "point5",
        "point5_neg5",
        "box",
        "box_point1",
    ]
    assert cfg.eval.split == "test" and cfg.eval.mask_selection == "oracle"


def test_slurm_launcher_config_is_documented():
    text = (CONF / "hydra" / "launcher" / "slurm.yaml").read_text()
    assert "submitit_slurm" in text and "python train.py -m hydra/launcher=slurm" in text


def test_readme_sweep_composes_every_job(tmp_path):
    """``python train.py -m model=vit_b,vit_h task=liver_ct,spleen_ct finetune=decoder,lora``:
    Hydra's own sweeper splits it into 8 jobs; each composes, with a run name that tells it apart
    in the dashboard and its own sweep subdirectory."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweep = ["model=vit_b,vit_h", "task=liver_ct,spleen_ct", "finetune=decoder,lora"]
    parsed = OverridesParser.create().parse_overrides(sweep)
    (jobs,) = BasicSweeper.split_arguments(parsed, max_batch_size=None)
    assert len(jobs) == 8
    names = set()
    for job in jobs:
        cfg = _compose("train", [*job, "logger=wandb", f"paths.log_dir={tmp_path}"])
        model, task, finetune = (o.split("=")[1] for o in job)
        assert (cfg.model.name, cfg.task.name, cfg.finetune.name) == (model, task, finetune)
        assert cfg.trainer.max_epochs == 20
        names.add(cfg.run_name)
        assert {model, task, finetune} <= set(cfg.logger.wandb.tags)
    assert len(names) == 8
