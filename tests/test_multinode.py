"""Multi-node training: 2 nodes x 1 process on this machine equals 1 node x 2 processes.

Each "node" is a real ``train.py`` process that learns its place from Lightning's environment
variables (``NODE_RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), as ``torchrun`` or a cluster
scheduler would set them; the two join one gloo process group and share a run directory, like
nodes on a shared file system.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHORT = [
    # The synthetic demo with the tiny model (the default run is LiteMedSAM on MNI152).
    "model=tiny",
    "task=demo",
    "trainer=ddp",
    "trainer.accelerator=cpu",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "train.evaluate=false",
    "train.overlays=0",
    "callbacks.progress=null",
]


def _env(cache: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ, SAM_FT_CACHE=str(cache), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    for key in ("WANDB_API_KEY", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    # A scheduler's variables would make Lightning pick another cluster environment.
    for key in [k for k in env if k.startswith(("SLURM_", "TORCHELASTIC_", "LSB_"))]:
        env.pop(key)
    env.update(extra)
    return env


def _start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *SHORT, *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    return ckpt["state_dict"]


def test_two_nodes_equal_one_node_two_processes(tmp_path):
    cache = tmp_path / "cache"
    one_node, two_nodes = tmp_path / "one_node", tmp_path / "two_nodes"
    port = str(_free_port())
    # All three at once: the reference does not depend on the others.
    runs = [_start(["trainer.devices=2", f"hydra.run.dir={one_node}"], _env(cache))]
    runs += [
        _start(
            ["trainer.devices=1", "trainer.num_nodes=2", f"hydra.run.dir={two_nodes}"],
            _env(cache, NODE_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
        )
        for rank in (0, 1)
    ]
    outs = [run.communicate(timeout=600)[0] for run in runs]
    for run, out in zip(runs, outs, strict=True):
        assert run.returncode == 0, out[-4000:]
    outs = outs[1:]
    # Each process is the only one on its node, and the two form one group of 2 over gloo.
    assert "GLOBAL_RANK: 0, MEMBER: 1/2" in outs[0]
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outs[1]
    assert "gloo" in outs[0]

    want, got = _weights(one_node), _weights(two_nodes)
    assert want.keys() == got.keys()
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, atol=1e-6, rtol=0, msg=key)
    # The runs trained (equal weights are not both the zero-shot model's).
    from sam_ft.defaults import build_from_yaml

    key = "mask_decoder.output_upscaling.0.weight"
    start = build_from_yaml("model", "tiny").sam.state_dict()[key]
    assert not torch.equal(got[f"model.sam.{key}"], start)
    assert (two_nodes / "sam_finetuned.pth").is_file()  # global rank 0 (node 0) exported
