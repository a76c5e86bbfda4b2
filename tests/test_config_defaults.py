"""Defaults live in one place, the YAML: the Python paths that build a config group without Hydra
(``task_options``, ``data_options``, ``eval_options``, ``SliceAugment``) read theirs from it."""

from __future__ import annotations

import importlib
import shutil
from collections.abc import Mapping
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from sam_ft.config import parse_config
from sam_ft.data.augment import SliceAugment
from sam_ft.data.tasks import data_options, task_options
from sam_ft.defaults import group_defaults
from sam_ft.evaluation.protocol.options import eval_options
from sam_ft.prompts.jitter import jitter_levels

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"


def _yaml(path: Path) -> dict:
    """The file as written (PyYAML, independent of the loader under test)."""
    return yaml.safe_load(path.read_text())


def test_python_fallbacks_equal_the_yaml():
    data = _yaml(CONF / "data" / "default.yaml")
    seed = _yaml(CONF / "train.yaml")["seed"]
    # Values only a Hydra run knows: ${seed} -> train.yaml's seed, ${paths...} and ??? -> None.
    assert data["seed"] == "${seed}" and data["cache_dir"].startswith("${paths.")
    assert data_options({}) == {**data, "seed": seed, "cache_dir": None}

    task = _yaml(CONF / "task" / "folder.yaml")
    assert task["root"] == "???"
    # The name is the root's folder name (a resolver); with no root, "folder".
    assert task["name"].startswith("${sam_ft.folder_name:")
    assert task_options({}) == {**task, "root": None, "name": "folder"}
    assert task_options({"root": "/data/Task02_Heart"})["name"] == "Task02_Heart"
    assert task_options({})["intensity"]["keep_zero"] is True  # the study's rule, now in the YAML

    assert SliceAugment({}).cfg == data["augment"]
    assert {"elastic_alpha", "elastic_sigma"} <= set(data["augment"])

    ev = _yaml(CONF / "eval" / "default.yaml")
    opts = eval_options({})
    assert opts.prompts == tuple(ev["prompts"]) and opts.levels == tuple(
        jitter_levels(ev["jitter_px"])
    )
    for key in ("mask_selection", "point_sampling", "nsd_tolerance_mm", "nsd_method", "clicks"):
        assert getattr(opts, key) == ev[key], key
    for key in ("save_predictions", "max_prompts_per_call", "overlays", "volume_gt"):
        assert getattr(opts, key) == ev[key], key
    assert opts.grid == ev["grid"]
    # Bad files follow data.on_error (one key for loading and scoring), whose default is raise.
    assert "on_error" not in ev and opts.on_error == data["on_error"] == "raise"
    for key, value in ev["everything"].items():
        assert getattr(opts.everything, key) == value, key


def test_changing_the_yaml_changes_the_python_defaults(tmp_path, monkeypatch):
    conf = tmp_path / "conf"
    shutil.copytree(CONF, conf)
    edits = {
        ("data", "default"): {"min_object_pixels": 77, "affine_atol": 0.5},
        ("task", "folder"): {"images_dir": "scans", "slice_axis": 1},
        ("eval", "default"): {"grid": 12, "mask_selection": "single", "overlays": 3},
    }
    for (group, name), values in edits.items():
        path = conf / group / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**_yaml(path), **values}))
    data_path = conf / "data" / "default.yaml"
    data = _yaml(data_path)
    data["augment"].update(hflip_p=0.25, elastic_sigma=3.5)
    data_path.write_text(yaml.safe_dump(data))
    train_path = conf / "train.yaml"
    train_path.write_text(train_path.read_text().replace("seed: 42", "seed: 7"))
    monkeypatch.setenv("SAM_FT_CONFIG_DIR", str(conf))

    dopts = data_options({})
    assert dopts["min_object_pixels"] == 77 and dopts["affine_atol"] == 0.5 and dopts["seed"] == 7
    topts = task_options({"root": "/x"})
    assert topts["images_dir"] == "scans" and topts["slice_axis"] == 1
    eopts = eval_options({})
    assert eopts.grid == 12 and eopts.mask_selection == "single"
    assert eopts.overlays == 3
    aug = SliceAugment({"enabled": True})
    assert aug.cfg["hflip_p"] == 0.25 and aug.cfg["elastic_sigma"] == 3.5
    # A caller's value still wins over the YAML.
    assert data_options({"min_object_pixels": 5})["min_object_pixels"] == 5


MODULES = (
    "sam_ft.data.tasks",
    "sam_ft.data.augment",
    "sam_ft.data.datamodule",
    "sam_ft.data.loading",
    "sam_ft.evaluation.protocol.engine",
    "sam_ft.config",
)


@pytest.mark.parametrize(
    ("group", "name", "sub"),
    [("task", "folder", None), ("data", "default", None), ("data", "default", "augment"),
     ("eval", "default", None)],
)  # fmt: skip
def test_no_python_module_holds_a_copy_of_a_group(group, name, sub):
    keys = set(group_defaults(group, name) if sub is None else group_defaults(group, name)[sub])
    for module_name in MODULES:
        module = importlib.import_module(module_name)
        for attr, value in vars(module).items():
            if isinstance(value, Mapping) and not isinstance(value, type):
                shared = keys & {str(k) for k in value}
                assert len(shared) < len(keys) / 2, (
                    f"{module_name}.{attr} repeats {sorted(shared)} of conf/{group}/{name}.yaml"
                )


def test_elastic_options_are_ordinary_overrides(tmp_path):
    """Declared in the YAML, so Hydra takes them without ``+`` and the parse checks them."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            "train",
            ["task=demo", f"paths.data_dir={tmp_path}", "data.augment.elastic_sigma=4.0"],
        )
    run = parse_config(cfg, "train")
    assert run.data.augment["elastic_sigma"] == 4.0 and run.data.augment["elastic_alpha"] == 30.0
