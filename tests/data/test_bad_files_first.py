"""One ``on_error`` story (``data.on_error``, default ``raise``): every bad file is found and
named before any training or model work; ``skip`` records each in ``skipped.csv`` and keeps
every good case; a split left without cases fails before training."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

from sam_ft.data.datamodule import SamDataModule
from sam_ft.data.tasks import data_options, task_options
from sam_ft.defaults import config_dir
from sam_ft.errors import DataError
from sam_ft.model.preprocess import SamTransform
from sam_ft.prompts.train_sampling import BoxPrompts

SHAPE = (24, 24, 3)


def _folder(root: Path, h, good: int, bad: int) -> list[Path]:
    """``good`` readable cases and ``bad`` unreadable images; returns the bad files."""
    image = np.random.default_rng(0).normal(100, 20, SHAPE).astype(np.float32)
    label = np.zeros(SHAPE, np.uint8)
    label[4:16, 4:16, :] = 1
    for i in range(good + bad):
        h.write_nifti(root / "imagesTr" / f"case{i}.nii.gz", image)
        h.write_nifti(root / "labelsTr" / f"case{i}.nii.gz", label)
    broken = [root / "imagesTr" / f"case{i}.nii.gz" for i in range(good, good + bad)]
    for path in broken:
        path.write_bytes(b"not a nifti file" * 8)
    (root / "dataset.json").write_text(json.dumps({"labels": {"0": "bg", "1": "organ"}}))
    return broken


def _datamodule(root: Path, run: Path, on_error: str, split_file: Path) -> SamDataModule:
    task = {"root": str(root), "slice_axis": 2, "intensity": {"mode": "percentile"}}
    data = {
        "cache_dir": str(run / "cache"),
        "on_error": on_error,
        "split": {"file": str(split_file)},
        "min_object_pixels": 10,
        "prep_workers": 1,
    }
    return SamDataModule(
        task_options(task),
        data_options(data),
        SamTransform(64),
        BoxPrompts(),
        0,
        run,
        progress=False,
    )


def test_every_bad_file_is_named_and_an_unusable_split_fails_before_training(tmp_path, h):
    broken = _folder(tmp_path / "data", h, good=3, bad=2)
    split = tmp_path / "split.json"
    split.write_text(
        json.dumps({"train": ["case0", "case1"], "val": ["case2"], "test": ["case3", "case4"]})
    )

    # raise (the default): one line naming the first bad file and counting the other; both
    # are listed in skipped.csv, so one run tells every file to fix.
    run = tmp_path / "raise"
    with pytest.raises(DataError) as err:
        _datamodule(tmp_path / "data", run, "raise", split).setup("fit")
    message = str(err.value)
    assert message.startswith(f"{broken[0]}: ") and "\n" not in message
    assert "(and 1 more bad file(s))" in message and str(run / "skipped.csv") in message
    skipped = pd.read_csv(run / "skipped.csv")
    assert skipped["path"].tolist() == [str(p) for p in broken]

    # skip: the test split lost every case; that is an error now, not after training.
    run = tmp_path / "skip"
    with pytest.raises(DataError, match=r"every case of the test split \(2\) was skipped"):
        _datamodule(tmp_path / "data", run, "skip", split).setup("fit")
    assert pd.read_csv(run / "skipped.csv")["path"].tolist() == [str(p) for p in broken]


def _evaluate_cfg(root: Path, out: Path, *overrides: str):
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        return compose(
            "eval",
            [
                "task=folder",
                f"task.root={root}",
                "task.slice_axis=2",
                "data.min_object_pixels=10",
                "data.prep_workers=1",
                "eval.split=all",
                "eval.prompts=[box]",
                "eval.jitter_px=[]",
                "eval.overlays=0",
                "eval.workers=0",
                f"paths.output_dir={out}",
                *overrides,
            ],
        )


def test_evaluate_names_a_bad_file_before_any_model_work_and_skip_keeps_every_good_case(
    tmp_path, h
):
    from sam_ft.evaluate import evaluate

    (bad,) = _folder(tmp_path / "data", h, good=3, bad=1)
    # Weights that cannot be read: had the model been built first, this would be the error.
    weights = tmp_path / "unreadable.pth"
    weights.write_bytes(b"PK\x03\x04 not a checkpoint")
    cfg = _evaluate_cfg(tmp_path / "data", tmp_path / "raise", f"ckpt_path={weights}")
    with pytest.raises(DataError, match="unreadable") as err:
        evaluate(cfg)
    assert err.value.path == str(bad)
    assert not (tmp_path / "raise" / "per_case.csv").exists()

    out = tmp_path / "skip"
    evaluate(_evaluate_cfg(tmp_path / "data", out, "data.on_error=skip"))
    scored = pd.read_csv(out / "per_case.csv")
    assert sorted(scored["case"].unique()) == ["case0", "case1", "case2"]
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["case"].tolist() == ["case3"] and skipped["path"].tolist() == [str(bad)]
