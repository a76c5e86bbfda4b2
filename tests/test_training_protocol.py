"""The training and model protocol choices (docs/protocol.md): each default, checked."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("bf16", [True, False])
def test_encoder_bf16_is_a_model_option(bf16):
    cfg = _compose("eval", [f"model.encoder_bf16={bf16}"])
    model = instantiate(cfg.model)
    assert model.encoder_bf16 is bf16
    # On a CPU nothing runs in bf16, whatever the option says.
    assert model.precision("cpu") == {"encoder": "float32", "decoder": "float32"}


@pytest.mark.parametrize("name", ["paper_vit_b", "paper_vit_h"])
def test_paper_experiment_is_the_papers_recipe(name):
    cfg = _compose("train", [f"experiment={name}", "task=liver_ct"])
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.ConstantLR"
    assert cfg.scheduler.factor == 1.0  # constant learning rate
    assert cfg.trainer.gradient_clip_val is None
    assert str(cfg.trainer.precision) == "32" and cfg.model.encoder_bf16 is False
    assert "demo" not in cfg.tags and cfg.task.name == "liver_ct"
    # What the user asks for on the command line still wins.
    cfg = _compose("train", [f"experiment={name}", "task=liver_ct", "trainer.precision=bf16-mixed"])
    assert cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("name", ["paper_vit_b", "paper_vit_h"])
def test_paper_experiment_without_task_says_what_to_add(name):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"task=<OPTION>[\s\S]*liver_ct"):
        _compose("train", [f"experiment={name}"])


def test_a_named_task_carries_nothing_of_the_demo():
    cfg = _compose("train", ["model=vit_b", "task=liver_ct"])
    assert "demo" not in cfg.tags
    assert _compose("train", []).tags == ["demo"]  # the demo run itself is tagged
