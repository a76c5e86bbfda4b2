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
