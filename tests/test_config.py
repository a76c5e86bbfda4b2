"""The configuration is parsed once at start: bad options end in one line, before any model."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from sam_ft.config import RunConfig, TaskConfig, parse_config
from sam_ft.errors import ConfigError
from sam_ft.evaluation.protocol.options import EvalOptions

ROOT = Path(__file__).resolve().parents[1]
CONF = str(ROOT / "conf")


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("task", sorted(p.stem for p in (ROOT / "conf" / "task").glob("*.yaml")))
def test_every_task_preset_parses(task, tmp_path):
    overrides = [f"task={task}", f"paths.data_dir={tmp_path}"]
    cfg = _compose("train", overrides)
    if cfg.task.source == "folder":  # a folder task needs its folder
        root = tmp_path / "folder"
        (root / (cfg.task.get("images_dir") or "imagesTr")).mkdir(parents=True)
        cfg = _compose("train", [*overrides, f"task.root={root}"])
    run = parse_config(cfg, "train")
    assert isinstance(run, RunConfig) and isinstance(run.task, TaskConfig)
    assert isinstance(run.eval, EvalOptions) and run.train is not None


def test_typed_values(tmp_path):
    (tmp_path / "images").mkdir()
    run = parse_config(_compose("eval", ["task=kvasir_seg", f"task.root={tmp_path}"]), "evaluate")
    assert run.train is None and run.task.label_binarize == 127.0
    assert run.task.intensity.mode == "none" and run.task.labels == {"polyp": [1]}
    assert run.eval.levels == (None, (0.0, 10.0), (10.0, 20.0), (20.0, 30.0))
    assert run.data.split.train == 0.7 and run.data.prep_workers is None


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["+eval.promts=[box]"], r"^unknown option eval\.promts \(did you mean eval\.prompts\?\)"),
        (["finetune.rank=abc"], r"^finetune\.rank='abc': expected an integer$"),
        (["task.intensity=none"], r"^task\.intensity='none': expected a mapping with keys mode"),
        (["task=folder"], r"^missing required option task\.root: expected a string or null"),
        (["task=folder", "task.root=/no/such/folder"], r"^task\.root=/no/such/folder: folder not"),
        (["eval.split=train"], r"^eval\.split='train': expected one of 'test', 'val', 'all'$"),
        (["eval.prompts=[bogus]"], r"eval\.prompts must be"),
        (["data.batch_size=0"], r"^data\.batch_size=0: expected an integer >= 1$"),
        (["data.prep_workers=two"], r"^data\.prep_workers='two': expected an integer or null$"),
        (["+data.augment.hflipp=0.3"], r"data\.augment keys"),
        (["eval.everything.grid=3"], None),  # Hydra itself refuses unknown keys without +
        (["~data.num_workers"], r"^missing required option data\.num_workers"),
        (["eval.jitter_px=[[0,a]]"], r"^eval\.jitter_px\[0\]\[1\]='a': expected a number$"),
    ],
)
def test_bad_options_are_one_line_errors(overrides, message):
    if message is None:
        with pytest.raises(Exception, match="Could not override"):
            _compose("train", overrides)
        return
    cfg = _compose("train", overrides)
    with pytest.raises(ConfigError, match=message) as info:
        parse_config(cfg, "train")
    assert "\n" not in str(info.value)


def test_cli_stops_before_building_or_downloading_the_model(tmp_path):
    """vit_b with model.checkpoint=auto would hash/download 375 MB of weights first."""
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "evaluate.py"),
            "model=vit_b",
            "model.checkpoint=auto",
            "+eval.mask_selecton=oracle",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: unknown option eval.mask_selecton (did you mean eval.mask_selection?); known: "
        "bootstrap, clicks, everything, grid, jitter_px, mask_selection, max_prompts_per_call, "
        "mode, nsd_method, nsd_tolerance_mm, overlays, point_sampling, prompts, propagate, "
        "queue_mb, save_predictions, shard, split, volume_gt, workers"
    ]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "cache").exists()  # no weights were fetched or hashed


@pytest.mark.parametrize("config", ["train", "eval"])
def test_a_folder_task_is_named_after_its_folder(config, tmp_path):
    """Run dirs, W&B runs and the study's task column tell two folder datasets apart."""
    root = tmp_path / "Task05_Prostate"
    (root / "imagesTr").mkdir(parents=True)
    cfg = _compose(config, ["task=folder", f"task.root={root}/", "model=tiny"])
    assert cfg.task.name == "Task05_Prostate"
    assert cfg.run_name.startswith("tiny_Task05_Prostate")
    assert parse_config(cfg, "train" if config == "train" else "evaluate").task.name == (
        "Task05_Prostate"
    )


def _owned():
    """(schema class, field, the owning module's tuple of allowed values), read independently of
    the schema's own resolution."""
    from sam_ft.config import DataConfig, FinetuneConfig, IntensityConfig, ModelConfig
    from sam_ft.data import demo, embedding_cache, intensity, skips, tasks
    from sam_ft.model import finetune, specs

    return [
        (IntensityConfig, "mode", intensity.MODES),
        (IntensityConfig, "scope", intensity.SCOPES),
        (TaskConfig, "source", tasks.SOURCES),
        (TaskConfig, "slice_axis", tasks.SLICE_AXES),
        (TaskConfig, "demo_variant", demo.VARIANTS),
        (DataConfig, "on_error", skips.ON_ERROR),
        (DataConfig, "cache_embeddings", embedding_cache.CACHE_EMBEDDINGS),
        (DataConfig, "embedding_dtype", embedding_cache.EMBEDDING_DTYPES),
        (ModelConfig, "preprocess", specs.PREPROCESSES),
        (FinetuneConfig, "name", finetune.MODES),
    ]


@pytest.mark.parametrize(("cls", "key", "owned"), _owned(), ids=lambda x: getattr(x, "__name__", x))
def test_the_checker_allows_exactly_the_owners_values(cls, key, owned):
    """A Literal's values are the owning module's tuple: the checker accepts each of them (with
    its type: true is not 1) and refuses a value the owner does not list."""
    import typing

    from sam_ft.config import _check, type_hints

    hint = type_hints(cls)[key]
    literals = [a for a in typing.get_args(hint) if typing.get_origin(a) is typing.Literal]
    literals += [hint] if typing.get_origin(hint) is typing.Literal else []
    assert [typing.get_args(lit) for lit in literals] == [tuple(owned)]
    for value in owned:
        assert _check(value, hint, key) == value
    with pytest.raises(ConfigError, match=f"^{key}='not_one_of_them': expected one of "):
        _check("not_one_of_them", hint, key)


def test_the_owners_lists_are_what_their_modules_use():
    """Each owner's tuple is what its own code accepts: the specs' preprocessing modes, the
    finetune modes Finetune accepts."""
    from sam_ft.defaults import build_from_yaml
    from sam_ft.model import finetune, specs

    assert {s.preprocess for s in specs.SPECS.values()} == set(specs.PREPROCESSES)
    for mode in finetune.MODES:
        assert build_from_yaml("finetune", mode).name == mode
    with pytest.raises(ConfigError, match="finetune.name"):
        finetune.Finetune("adapters", last_n=2, rank=4, alpha=4.0, encoder_lr_scale=0.1)
