"""Config files without duplication or dead keys: the finetune modes extend one base file, every
``paths`` key is read somewhere, and the top-level ``tags`` reach the W&B run."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sam_ft.config import FinetuneConfig

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
MODES = sorted(p.stem for p in (CONF / "finetune").glob("*.yaml"))
BASE = CONF / "finetune" / "_base" / "shared.yaml"


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


def test_every_finetune_mode_has_one_config_file():
    from sam_ft.model import finetune

    assert sorted(finetune.MODES) == MODES


@pytest.mark.parametrize("mode", MODES)
def test_finetune_modes_extend_one_base_file(mode):
    # The mode's own file sets its name only; everything else comes from the base file.
    own = OmegaConf.load(CONF / "finetune" / f"{mode}.yaml")
    assert set(own) - {"defaults"} == {"name"} and own.name == mode
    base = OmegaConf.to_container(OmegaConf.load(BASE))
    # The composed section is the base with the mode's name, key for key (and in order, so the
    # model card and the saved config read as before), and holds exactly the checked keys.
    section = OmegaConf.to_container(_compose("train", [f"finetune={mode}"]).finetune)
    assert list(section) == list(base) and section == {**base, "name": mode}
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert set(section) == fields | {"_target_"}


def test_the_finetune_base_file_is_no_option_and_ships():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib

    assert "_base" not in MODES and "shared" not in MODES
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "sam_ft.conf.finetune._base" in packages["packages"]


def test_every_paths_key_is_read():
    """A ``paths`` key that no config interpolates and no code reads is dead (``root_dir`` was)."""
    sources = [*CONF.rglob("*.yaml"), *(ROOT / "sam_ft").rglob("*.py")]
    sources += [ROOT / f for f in ("train.py", "evaluate.py", "predict.py")]
    text = "\n".join(p.read_text() for p in sources if p != CONF / "paths" / "default.yaml")
    for key in OmegaConf.load(CONF / "paths" / "default.yaml"):
        assert re.search(rf"paths\.{key}\b", text), f"paths.{key} is read nowhere"


def test_top_level_tags_reach_the_wandb_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored after the test; nothing is sent
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    overrides = ["experiment=paper_vit_b", "task=liver_ct", "logger=wandb"]
    cfg = _compose("train", [*overrides, f"paths.output_dir={tmp_path}"])
    assert list(cfg.tags) == ["paper", "vit_b"]
    logger = instantiate(cfg.logger.wandb, offline=True)
    assert logger._wandb_init["tags"] == ["vit_b", "liver_ct", "decoder", "paper"]
    assert logger._experiment is None  # never started
