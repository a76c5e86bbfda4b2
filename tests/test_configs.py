"""Every config group option and experiment composes and instantiates its objects."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
# Every group of conf/ except hydra's own (its launcher plugins are not installed here).
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir() and p.name != "hydra")


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def _compose(name: str, overrides: list[str], hydra: bool = True):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides, return_hydra_config=hydra)


def _build_everything(cfg, run_dir: Path) -> None:
    """Instantiate what ``train.py`` builds from ``cfg``: the model (random weights, on the meta
    device so ViT-H costs nothing), finetune mode, optimizer and scheduler on its parameter
    groups, loss, prompt, data module, and through ``build_trainer`` every callback, logger and
    the trainer. Raises whatever an option that cannot build raises."""
    from sam_ft.data.datamodule import SamDataModule
    from sam_ft.data.tasks import data_options, task_options
    from sam_ft.train import build_loss, build_trainer

    with torch.device("meta"):
        model = instantiate(cfg.model, checkpoint=None)
        finetune = instantiate(cfg.finetune)
        finetune.apply(model)
    optimizer = instantiate(cfg.optimizer)(finetune.param_groups(model, cfg.optimizer.lr))
    if cfg.get("scheduler"):
        factory = instantiate(cfg.scheduler)  # called as SamFinetuneModule does
        takes_steps = "total_steps" in inspect.signature(factory.func).parameters
        assert factory(optimizer, **({"total_steps": 100} if takes_steps else {})) is not None
    assert isinstance(build_loss(cfg), torch.nn.Module)  # iou_weight: null follows the selection
    prompt = instantiate(cfg.prompt)
    task, data = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("task", "data"))
    task, data = task_options(task), data_options(data)  # as complete as parse_config's
    SamDataModule(
        task=task, data=data, transform=model.transform, train_prompt=prompt,
        seed=cfg.seed, run_dir=run_dir, data_dir=cfg.paths.data_dir,
    )  # fmt: skip
    trainer = build_trainer(cfg, run_dir)
    names = {type(c).__name__ for c in trainer.callbacks}
    assert {"ModelCheckpoint", "PreemptionCheckpoint"} <= names, names
    assert len(trainer.loggers) == len(cfg.logger or {})


@pytest.mark.parametrize(
    "group,option", [(g, o) for g in GROUPS for o in _options(g)], ids=lambda x: str(x)
)
def test_train_config_composes(group, option, tmp_path):
    # An option that composes but cannot build (bad _target_, argument, interpolation) fails here.
    overrides = [f"{group}={option}", f"paths.log_dir={tmp_path}", f"paths.output_dir={tmp_path}"]
    if option.startswith("paper_"):  # the paper's experiments need a task (never the demo)
        overrides.append("task=liver_ct")
    if group == "trainer" and option == "gpu" and not torch.cuda.is_available():
        overrides.append("trainer.accelerator=cpu")  # all else of the option is still built
    cfg = _compose("train", overrides, hydra=False)  # as the job sees it (resolvable)
    assert cfg.seed == 42 and "ckpt_path" in cfg
    _build_everything(cfg, tmp_path)


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


def test_slurm_launcher_composes_with_the_submitit_plugin():
    """``hydra/launcher=slurm`` composes onto the installed submitit plugin's schema (a key it
    does not know would fail here) and names a launcher class that imports."""
    import yaml
    from hydra.utils import get_class

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", ["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert get_class(launcher._target_).__name__ == "SlurmLauncher"
    mine = yaml.safe_load((CONF / "hydra" / "launcher" / "slurm.yaml").read_text())
    for key, value in mine.items():
        if key != "defaults":
            assert launcher[key] == value, key


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
