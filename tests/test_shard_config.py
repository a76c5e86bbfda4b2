"""Shards refuse to merge unless they scored the same data, weights, preprocessing and
precision: ``shard.json`` records each (``evaluation.protocol.distributed.shard_config``), and
``sam-ft-report merge`` names the first that differs. Real tiny models and the real composed
config; the weights' reference digest is computed here with hashlib."""

from __future__ import annotations

import hashlib

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sam_ft.config import parse_config, run_facts
from sam_ft.defaults import config_dir
from sam_ft.errors import ConfigError
from sam_ft.evaluation.protocol import distributed
from sam_ft.evaluation.protocol.merge import Shard, read_shards, write_shard_file

KEYS, SLICES = ["demo_000", "demo_001"], [5, 7]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir(), version_base="1.3"):
        return compose("eval", overrides=["model=tiny", "task=demo", *overrides])


def shard_config(cfg, models, keys, slices):
    """The shard config of a composed evaluate.py config, as the evaluate task records it."""
    run = parse_config(cfg, "evaluate")
    return distributed.shard_config(run.eval, run_facts(run, None), models, keys, slices)


def _model(cfg, seed: int = 0):
    torch.manual_seed(seed)
    return instantiate(cfg.model)


def _refused(tmp_path, config_a: dict, config_b: dict) -> str:
    """The error of merging two shares scored with these configs."""
    dirs = [tmp_path / "a", tmp_path / "b"]
    write_shard_file(dirs[0], Shard(0, 2), KEYS[:1], config_a)
    write_shard_file(dirs[1], Shard(1, 2), KEYS[1:], config_b)
    with pytest.raises(ConfigError, match="another configuration") as err:
        read_shards(dirs)
    return str(err.value)


def test_shards_of_other_weights_data_or_intensity_do_not_merge(tmp_path):
    cfg = _cfg()
    model = _model(cfg)
    config = shard_config(cfg, {"zero_shot": model}, KEYS, SLICES)
    facts = config["weights"]["zero_shot"]
    reference = hashlib.sha256()
    for name, t in sorted(model.sam.state_dict().items()):
        reference.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        reference.update(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert facts["weights_sha256"] == reference.hexdigest()
    assert facts["preprocess"] == model.transform.mode and facts["precision"]

    # The same model, config and cases: the shares merge.
    write_shard_file(tmp_path / "s0", Shard(0, 2), KEYS[:1], config)
    write_shard_file(
        tmp_path / "s1",
        Shard(1, 2),
        KEYS[1:],
        shard_config(cfg, {"zero_shot": model}, KEYS, SLICES),
    )
    assert len(read_shards([tmp_path / "s0", tmp_path / "s1"])) == 2

    # One weight nudged (same checkpoint file name, same everything else).
    other = _model(cfg)
    with torch.no_grad():
        next(other.sam.mask_decoder.parameters()).view(-1)[0] += 1e-3
    moved = shard_config(cfg, {"zero_shot": other}, KEYS, SLICES)
    assert "weights.zero_shot.weights_sha256=" in _refused(tmp_path / "w", config, moved)

    # Another intensity window: the slices differ though every file is the same.
    window = _cfg("task.intensity.width=300")
    assert "data.slicing.intensity.width=400" in _refused(
        tmp_path / "i", config, shard_config(window, {"zero_shot": model}, KEYS, SLICES)
    )
    # Another split of the cases (a case with another slice count).
    assert "data.cases=" in _refused(
        tmp_path / "d", config, shard_config(cfg, {"zero_shot": model}, KEYS, [5, 8])
    )


def test_the_scoring_worker_count_does_not_block_a_merge():
    cfg = _cfg()
    model = _model(cfg)
    a = shard_config(_cfg("eval.workers=1"), {"m": model}, KEYS, SLICES)
    b = shard_config(_cfg("eval.workers=3"), {"m": model}, KEYS, SLICES)
    assert a == b
