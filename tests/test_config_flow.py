"""Hydra stops at the task modules (issue #32): ``sam_ft/{train,evaluate,predict,report}.py``
and ``config.py`` turn the composed config into typed groups, and no module below them imports
omegaconf or Hydra or takes a ``DictConfig``. Read from the source with ``ast``
(function-level imports count)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "sam_ft"

# The task modules and the parser: the only ones that hold the composed Hydra config.
TASKS = {"train.py", "evaluate.py", "predict.py", "report.py", "config.py"}

# Modules below the tasks that use Hydra or OmegaConf for something other than the run's config
# (each with why); none of them receives the composed config.
OTHER_USES = {
    "cli.py": "the console scripts: compose and check a sweep before Hydra starts its jobs",
    "defaults.py": "reads conf/'s YAML (the only copy of the defaults) and registers resolvers",
    "console.py": "a Hydra callback (conf/hydra/default.yaml): one table after a multirun",
    "errors.py": "the run dir Hydra made for a run that failed at once (removed)",
    "training/wandb.py": "a Hydra callback: one W&B run per sweep job",
    "training/options.py": "parse_config's check of trainer/optimizer/scheduler: instantiated dry",
    "model/sam2_model.py": "SAM 2's own model YAML (the sam2 package's format), built without it",
    "evaluation/reports/study.py": "reads finished runs' .hydra/config.yaml (model size, task)",
}


def _hydra_uses(tree: ast.AST) -> list[str]:
    """``import omegaconf/hydra ...`` lines and ``DictConfig`` annotations in ``tree``."""
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        found += [
            f"{node.lineno}: import {n}" for n in names if n.split(".")[0] in ("omegaconf", "hydra")
        ]
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
            for arg in args:
                if arg.annotation is not None and "DictConfig" in ast.unparse(arg.annotation):
                    found.append(f"{node.lineno}: {node.name}({arg.arg}: DictConfig)")
    return found


def test_no_module_below_the_tasks_takes_the_hydra_config():
    bad = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = path.relative_to(PACKAGE).as_posix()
        if name in TASKS or name in OTHER_USES:
            continue
        if found := _hydra_uses(ast.parse(path.read_text(), str(path))):
            bad[name] = found
    assert not bad, bad


def test_the_walk_sees_hydra_where_it_is():
    """The check finds what it looks for (the tasks hold the Hydra config) and the allowed
    list names modules that still use Hydra."""
    uses = {
        name: _hydra_uses(ast.parse((PACKAGE / name).read_text())) for name in (*TASKS, *OTHER_USES)
    }
    assert any("DictConfig" in line for line in uses["train.py"])
    assert all(uses[name] for name in OTHER_USES), [n for n in OTHER_USES if not uses[n]]
    tree = ast.parse("def f(cfg: 'DictConfig'):\n    from omegaconf import OmegaConf\n")
    assert len(_hydra_uses(tree)) == 2


def _compose(name: str, overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from sam_ft.defaults import config_dir

    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(name, overrides=overrides)


PREDICT = ["checkpoint=auto", "input=x.png", "output=out"]


def test_predict_takes_evals_everything_settings_and_batch():
    """conf/predict.yaml interpolates eval's blocks: a change of eval's values (here on the
    command line, as a change of conf/eval/default.yaml would) is predict's, and predict's own
    key still wins."""
    from sam_ft.config import parse_predict_config
    from sam_ft.defaults import group_defaults

    cfg = parse_predict_config(_compose("predict", PREDICT))
    ev = group_defaults("eval")  # conf/eval/default.yaml
    assert cfg.everything == {"grid": ev["grid"], **ev["everything"]}
    assert cfg.max_prompts_per_call == ev["max_prompts_per_call"]
    changed = ["eval.grid=12", "eval.everything.pred_iou_thresh=0.5", "eval.max_prompts_per_call=9"]
    cfg = parse_predict_config(_compose("predict", [*PREDICT, *changed]))
    assert (cfg.everything["grid"], cfg.everything["pred_iou_thresh"]) == (12, 0.5)
    assert cfg.max_prompts_per_call == 9
    own = parse_predict_config(_compose("predict", [*PREDICT, *changed, "everything.grid=4"]))
    assert own.everything["grid"] == 4 and own.everything["pred_iou_thresh"] == 0.5


def test_predict_options_are_checked_as_a_runs():
    import pytest

    from sam_ft.config import parse_predict_config
    from sam_ft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^mask_selection='best': expected one of 'oracle'"):
        parse_predict_config(_compose("predict", [*PREDICT, "mask_selection=best"]))
    with pytest.raises(ConfigError, match=r"^eval\.grid='x': expected an integer$"):
        parse_predict_config(_compose("predict", [*PREDICT, "eval.grid=x"]))
    with pytest.raises(ConfigError, match=r"^missing required option input"):
        parse_predict_config(_compose("predict", ["checkpoint=auto", "output=out"]))


def test_predict_intensity_given_in_part_completes_as_a_tasks_does():
    """``intensity={mode: none}`` on predict's command line: the keys left out take the base
    task's values, as a task preset's do, so the typed group is complete and checked."""
    from sam_ft.config import parse_predict_config
    from sam_ft.data.tasks import task_options, to_plain

    given = {"mode": "none"}
    cfg = parse_predict_config(_compose("predict", [*PREDICT, "intensity={mode: none}"]))
    completed = task_options({"name": "x", "source": "folder", "intensity": given})["intensity"]
    assert to_plain(cfg.intensity) == completed
    assert cfg.intensity.mode == "none"


# The functions of data/ take the complete task / data groups they are handed: only tasks.py
# (which defines them) may complete a partial mapping from conf/'s YAML.
COMPLETERS = {"task_options", "data_options"}


def _completer_calls(tree: ast.AST, names: set[str] = COMPLETERS) -> list[str]:
    return [
        f"{node.lineno}: {ast.unparse(node.func)}"
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) or getattr(node.func, "attr", None)) in names
    ]


def test_no_data_function_completes_the_task_from_the_yaml():
    below = [*(PACKAGE / "data").rglob("*.py"), *(PACKAGE / "inference").rglob("*.py")]
    bad = {
        path.relative_to(PACKAGE).as_posix(): found
        for path in below
        if path.name != "tasks.py"  # defines them (the Python API's completion)
        if (found := _completer_calls(ast.parse(path.read_text(), str(path))))
    }
    assert not bad, bad
    tasks = ast.parse((PACKAGE / "data" / "tasks.py").read_text())
    inner = [
        f"{fn.name}: {call}"
        for fn in tasks.body
        if isinstance(fn, ast.FunctionDef) and fn.name not in COMPLETERS
        for call in _completer_calls(fn, COMPLETERS | {"group_defaults"})
    ]
    assert not inner, inner


def test_the_walk_sees_a_completion():
    found = _completer_calls(ast.parse("def f(t):\n    return tasks.task_options(t)\n"))
    assert found == ["2: tasks.task_options"]


def test_the_demo_run_reads_no_default_below_parse_config(tmp_path, monkeypatch):
    """parse_config completes the demo preset over the base task once; the data module then
    prepares and splits the demo with no YAML default read (any completion would raise)."""
    from hydra import compose, initialize_config_dir

    from sam_ft.config import parse_config
    from sam_ft.data import tasks
    from sam_ft.data.datamodule import SamDataModule
    from sam_ft.data.loading import slice_settings
    from sam_ft.data.tasks import data_options, task_options, to_plain
    from sam_ft.prompts.train_sampling import BoxPrompts

    overrides = ["model=tiny", "task=demo", f"paths.data_dir={tmp_path}"]
    overrides += [f"data.cache_dir={tmp_path / 'cache'}", "data.prep_workers=1"]
    with initialize_config_dir(config_dir=str(PACKAGE.parent / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    run = parse_config(cfg)
    assert run.task.images_dir == "imagesTr" and run.task.intensity.scope == "slice"
    # The cache key is the one the slices were cached under before (completed in the loaders).
    from omegaconf import OmegaConf

    task, data = (OmegaConf.to_container(cfg[k], resolve=True) for k in ("task", "data"))
    before = slice_settings(task_options(task), data_options(data))
    assert slice_settings(to_plain(run.task), to_plain(run.data)) == before

    def no_default(*args, **kwargs):
        raise AssertionError("a YAML default was read below parse_config")

    monkeypatch.setattr(tasks, "group_defaults", no_default)
    dm = SamDataModule(
        run.task, run.data, None, BoxPrompts(), run.seed, tmp_path / "run", progress=False
    )
    dm.prepare_data()
    dm.setup("validate")
    assert dm.splits is not None and len(dm.splits["val"]) >= 1
    with pytest.raises(TypeError, match="TaskConfig"):
        SamDataModule(cfg.task, run.data, None, BoxPrompts(), 0, tmp_path / "x")
