"""`python train.py` end to end on the demo task, through the real entry point (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    # The synthetic demo with the tiny model (the default run is LiteMedSAM on MNI152).
    "model=tiny",
    "task=demo",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "eval.prompts=[box,point1]",
    "eval.jitter_px=[[0,10]]",
    "train.overlays=2",
]


def _run(args: list[str], cache: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, SAM_FT_CACHE=str(cache), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("demo")
    run_dir = tmp / "run"
    proc = _run([*QUICK, f"hydra.run.dir={run_dir}"], tmp / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir, proc


def test_demo_writes_comparison(demo_run):
    run_dir, proc = demo_run
    summary = pd.read_csv(run_dir / "eval" / "summary.csv")
    assert {"zero_shot", "finetuned"} <= set(summary["model"])
    assert {"box", "point1"} == set(summary["prompt"])
    assert {"none", "0-10"} == set(summary["jitter"])
    assert summary["dice_mean"].between(0, 1).all()
    for name in ("per_object.csv", "per_case.csv", "summary.md"):
        assert (run_dir / "eval" / name).is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # One checkpoint per role: the last and the best (no last-v1.ckpt copies of 48 MB each).
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert len(kept) == 2 and kept[1] == "last.ckpt" and kept[0].startswith("epoch_"), kept
    assert (run_dir / "sam_finetuned.pth").is_file()
    assert (run_dir / "splits.json").is_file()
    info = json.loads((run_dir / "eval" / "run_info.json").read_text())
    for name in ("zero_shot", "finetuned"):  # precision is recorded with the results
        assert info["models"][name]["precision"] == {"encoder": "float32", "decoder": "float32"}
    # The printed headline is summary.txt: plain text (Markdown wraps and breaks in logs), the
    # object count that the rows' n counts, and where the Markdown report is.
    printed = (run_dir / "eval" / "summary.txt").read_text()
    assert printed.replace("summary.md", str(run_dir / "eval" / "summary.md")) in proc.stdout
    assert "zero_shot Dice [CI]" in printed and "finetuned Dice [CI]" in printed
    assert "|" not in printed and max(len(line) for line in printed.splitlines()) < 300
    objects = int(printed.splitlines()[1].split()[0])
    assert set(summary["n"]) == {objects}  # every row scores each object once
    card = json.loads((run_dir / "sam_finetuned.json").read_text())
    splits = json.loads((run_dir / "splits.json").read_text())
    for split in ("train", "val", "test"):  # the cases behind the weights and the scores, by id
        assert card["cases"][split] == sorted(splits[split])
    assert card["evaluation_protocol"]["prompts"] == ["box", "point1"]
    # The headline states predict's mask choice for these weights (a number, or why there is none).
    assert card["headline"]["prompt"] == "box" and card["headline"]["mask_selection"] in (
        "single",
        "predicted_iou",
    )
    assert card["headline"]["dice"] is not None or card["headline"]["why"]
    for noise in ("💡 Tip", "LeafSpec", "module(s) in eval mode"):  # sam_ft.quiet
        assert noise not in proc.stdout + proc.stderr


def test_exported_weights_load_in_segment_anything_classes(demo_run):
    import torch

    from sam_ft.model.builders import build_sam_architecture

    run_dir, _ = demo_run
    sam = build_sam_architecture("tiny")
    sam.load_state_dict(torch.load(run_dir / "sam_finetuned.pth", weights_only=True), strict=True)


def test_resume_without_checkpoint_fails_clearly(tmp_path):
    args = ["model=tiny", "task=demo", "ckpt_path=last", f"hydra.run.dir={tmp_path / 'nothing'}"]
    proc = _run(args, tmp_path / "cache")
    assert proc.returncode == 1
    assert "ckpt_path=last: no checkpoint to resume from" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "nothing" / "checkpoints").exists()


def test_error_while_building_the_model_is_one_line(tmp_path):
    # Raised inside Hydra's instantiate, which wraps it: still our one line, no traceback.
    args = ["model=tiny", "task=demo", "model.image_size=128", f"hydra.run.dir={tmp_path / 'bad'}"]
    proc = _run(args, tmp_path / "cache")
    assert proc.returncode == 1
    assert "error: model.image_size=128" in proc.stderr
    assert "Traceback" not in proc.stderr and "InstantiationException" not in proc.stderr


def test_exported_weights_have_a_model_card(demo_run):
    import json

    from sam_ft.inference.card import sha256_file

    run_dir, _ = demo_run
    card = json.loads((run_dir / "sam_finetuned.json").read_text())
    assert card["sha256"] == sha256_file(run_dir / "sam_finetuned.pth")
    assert (card["architecture"], card["image_size"], card["preprocess"]) == ("tiny", 256, "sam")
    # The demo trains one mask output, as the paper's code (train.multimask: null, oracle eval).
    assert card["multimask_output"] is False and card["finetune"]["name"] == "decoder"
    assert card["task"]["name"] == "demo" and card["task"]["modality"] == "CT"
    assert card["task"]["intensity"] == {"mode": "window", "level": 40, "width": 400}
    assert set(card["labels"]) == {"liver", "kidney", "lesion"}
    assert set(card["evaluation"]) == {"zero_shot", "finetuned"}
    assert 0 <= card["evaluation"]["finetuned"]["box_dice"] <= 1
    prompts = card["evaluation"]["zero_shot"]["prompts"]
    assert set(prompts) == {"box", "point1"} and 0 <= prompts["point1"]["dice"] <= 1


@pytest.mark.parametrize("weights", ["sam_finetuned.pth", "checkpoints/last.ckpt"])
def test_predict_cli_with_the_run_weights(demo_run, tmp_path, weights):
    """``python predict.py`` from another directory, with the exported weights (card) or the
    run's Lightning checkpoint (its .hydra/config.yaml); prompts from the demo label map."""
    import nibabel as nib

    run_dir, _ = demo_run
    demo = run_dir.parent / "cache" / "data" / "demo"
    image, label = demo / "imagesTr" / "demo_000.nii.gz", demo / "labelsTr" / "demo_000.nii.gz"
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "predict.py"),
            f"checkpoint={run_dir / weights}",
            f"input={image}",
            f"labels={label}",
            f"output={tmp_path / 'out'}",
            "prompt=point1",
            f"hydra.run.dir={tmp_path / 'log'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = nib.load(tmp_path / "out" / "demo_000.nii.gz")
    src = nib.load(image)
    assert out.shape == src.shape and (out.affine == src.affine).all()
    assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1, 2, 3}
    assert (tmp_path / "out" / "demo_000_overlay.png").is_file()
