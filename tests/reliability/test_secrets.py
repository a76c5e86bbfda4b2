"""The W&B key and other tokens in the environment never reach a run dir. Issue #8, item 5.

A quick real training run (W&B logger, offline) with fake secrets in the environment, one of
two of them also pulled into the config through interpolations; then every byte of the run dir
(checkpoints, exported weights, ``.hydra/*.yaml``, logs, the W&B offline run) and the console
output is searched for the secret strings, raw and base64-encoded.
"""

from __future__ import annotations

import base64
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SECRETS = {
    "WANDB_API_KEY": "0123456789abcdef0123456789abcdefSECRETwb",
    "HF_TOKEN": "hf_SECRETtokenQWERTYUIOPasdfghjkl",
    "GITHUB_TOKEN": "ghp_SECRETzxcvbnmZXCVBNM1234567890",
}
QUICK = [
    # The synthetic demo with the tiny model (the default run is LiteMedSAM on MNI152).
    "model=tiny",
    "task=demo",
    "logger=wandb",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "train.evaluate=false",
    "train.overlays=0",
    # Config values read from the environment, under a secret-looking key and under an innocent
    # one: Hydra saves the unresolved interpolation; the W&B config gets a copy scrubbed by key
    # name and by value (sam_ft.training.wandb.scrub).
    "+extra.hf_token=${oc.env:HF_TOKEN}",
    "+extra.note=${oc.env:GITHUB_TOKEN}",
]


def _needles() -> dict[str, bytes]:
    out = {}
    for name, value in SECRETS.items():
        out[name] = value.encode()
        out[f"{name} (base64)"] = base64.b64encode(value.encode())[:24]
    return out


def test_no_secret_in_run_dir_or_output(tmp_path):
    run_dir = tmp_path / "run"
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env.update(SECRETS, WANDB_MODE="offline")  # a key is set, yet nothing may leave the machine
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *QUICK, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:].decode(errors="replace")
    files = [p for p in run_dir.rglob("*") if p.is_file()]
    kinds = {p.suffix for p in files}
    # The scan is only meaningful if the places a secret could land were written.
    assert {".ckpt", ".pth", ".yaml", ".log", ".wandb"} <= kinds, kinds
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    leaks = [
        f"{name} in {where}"
        for name, needle in _needles().items()
        for where, data in [
            ("stdout", proc.stdout),
            ("stderr", proc.stderr),
            *((str(p.relative_to(run_dir)), p.read_bytes()) for p in files),
        ]
        if needle in data
    ]
    assert leaks == []


def test_scrub_hides_secrets_by_key_name_and_by_value(monkeypatch):
    from sam_ft.training.wandb import scrub

    monkeypatch.setenv("HF_TOKEN", SECRETS["HF_TOKEN"])
    cfg = {"logger": {"api_key": "abc"}, "x": [f"Bearer {SECRETS['HF_TOKEN']}", 3], "lr": 0.1}
    assert scrub(cfg) == {"logger": {"api_key": "***"}, "x": ["Bearer ***", 3], "lr": 0.1}
