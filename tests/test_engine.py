"""Evaluation engine: SamPredictor parity, encoder cost, resume, 3D aggregation, failures."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from partial_api import lazy_cases
from segment_anything import SamPredictor
from wrapped_sam import wrap_sam

from sam_ft.data.types import SliceRecord
from sam_ft.errors import DataError
from sam_ft.evaluation.metrics.object_metrics import volume_metrics
from sam_ft.evaluation.protocol.cases import LazyCase
from sam_ft.evaluation.protocol.engine import evaluate_models
from sam_ft.evaluation.protocol.options import eval_options
from sam_ft.evaluation.protocol.predictions import CasePredictions
from sam_ft.evaluation.protocol.run_case import _per_case_rows
from sam_ft.model.builders import build_sam_architecture
from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.strategies import make_eval_prompt

H, W = 64, 80
# tiny at a 128 input: 8 x 8 embedding tokens keep the decoder cheap on a CPU.
TINY_INPUT = 128
SEED = 7
# Few prompts per slice: the tiny model's decoder costs ~30 ms per prompt on a CPU core.
FAST = {"prompts": ["point1", "box"], "jitter_px": [], "overlays": 2}


@pytest.fixture(scope="module")
def model() -> TrainableSam:
    torch.manual_seed(0)
    return wrap_sam(build_sam_architecture("tiny", image_size=TINY_INPUT)).eval()


def _image(rng: np.random.Generator, masks: np.ndarray) -> np.ndarray:
    """Noisy grey image where each object is brighter than the background, (H, W, 3) uint8."""
    grey = rng.normal(60, 10, (H, W))
    for k, m in enumerate(masks):
        grey[m] += 80 + 30 * k
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _record(case: str, s: int, num_slices: int = 3, objects: int = 2) -> SliceRecord:
    rng = np.random.default_rng([sum(map(ord, case)), s])
    yy, xx = np.mgrid[:H, :W]
    disc = (yy - 34) ** 2 + (xx - 30 - 2 * s) ** 2 < (10 + s) ** 2
    rect = (yy > 6) & (yy < 22) & (xx > 50) & (xx < 74)
    masks = np.stack([disc, rect][:objects])
    return SliceRecord(
        case=case,
        slice_index=s,
        image=_image(rng, masks),
        masks=masks,
        labels=np.array([1, 2][:objects]),
        names=["disc", "rect"][:objects],
        spacing=(0.8, 0.7),
        modality="CT",
        raw=rng.normal(0, 1, (H, W)).astype(np.float32),
        num_slices=num_slices,
        slice_spacing=2.5,
    )


def _case(name: str, slices=(0, 1), objects: int = 2) -> list[SliceRecord]:
    return [_record(name, s, objects=objects) for s in slices]


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def test_zero_shot_matches_sam_predictor(model, tmp_path):
    """Box and point1 with the oracle mask: Dice equals SamPredictor's best of 3 masks."""
    cases = [_case("p0", slices=(2,)), _case("p1", slices=(1,))]
    res = evaluate_models(
        {"zero_shot": model},
        cases,
        report=False,
        task_name="t",
        options=eval_options({**FAST, "mask_selection": "oracle"}),
        out_dir=tmp_path,
        seed=SEED,
        progress=False,
    )
    table = pd.read_csv(tmp_path / "per_object.csv", dtype={"case": str})
    assert len(table) == len(res.per_object) == 2 * 2 * 2  # slices x objects x prompts
    predictor = SamPredictor(model.sam)
    checked = 0
    for rec in [r for c in cases for r in c]:
        predictor.set_image(rec.image)
        for mask, label in zip(rec.masks, rec.labels, strict=True):
            for strategy in ("box", "point1"):
                p = make_eval_prompt(
                    mask,
                    strategy,
                    None,
                    seed=SEED,
                    case=rec.case,
                    slice_index=rec.slice_index,
                    label=int(label),
                )
                masks, _, _ = predictor.predict(
                    point_coords=p.points, point_labels=p.point_labels, box=p.box
                )
                expected = max(_dice(m, mask) for m in masks)
                row = table[
                    (table["case"] == rec.case)
                    & (table["slice"] == rec.slice_index)
                    & (table["label"] == label)
                    & (table["prompt"] == strategy)
                ]
                assert len(row) == 1 and row["jitter"].item() == "none"
                assert row["dice"].item() == pytest.approx(expected, abs=1e-9)
                checked += 1
    assert checked == 8


def test_encoder_runs_once_per_slice(model, tmp_path):
    """All strategies, jitter levels, Everything and the click curve share one encoding."""
    calls = []
    handle = model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        cfg = {
            "prompts": ["everything", "point1", "point5_neg5", "box"],
            "jitter_px": [[0, 10], [10, 20]],
            "grid": 2,
            "clicks": 2,
            "overlays": 0,
        }
        cases = [_case("e0", slices=(0, 1), objects=1), _case("e1", slices=(2,), objects=1)]
        res = evaluate_models(
            {"zero_shot": model},
            cases,
            report=False,
            task_name="t",
            options=eval_options(cfg),
            out_dir=tmp_path,
            seed=SEED,
            progress=False,
        )
    finally:
        handle.remove()
    assert len(calls) == 3
    # everything (no jitter) + 3 strategies x 3 jitter levels, per slice and object
    assert len(res.per_object) == 3 * (1 + 3 * 3)
    everything = res.per_object[res.per_object["prompt"] == "everything"]
    assert set(everything["jitter"]) == {"none"}
    assert sorted(res.per_object["jitter"].unique()) == ["0-10", "10-20", "none"]
    assert sorted(res.clicks["click"].unique()) == [1, 2]
    # Click 1 is point1 at its centroid point with the same mask selection.
    first = res.clicks[res.clicks["click"] == 1].set_index(["case", "slice", "label"])["dice"]
    rows = res.per_object
    p1 = rows[(rows["prompt"] == "point1") & (rows["jitter"] == "none")]
    p1 = p1.set_index(["case", "slice", "label"])["dice"]
    pd.testing.assert_series_equal(first.sort_index(), p1.sort_index(), check_names=False)


def _files(d) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in ("per_object.csv", "per_case.csv", "clicks.csv")}


def test_resume_after_kill_gives_same_files(model, tmp_path):
    cfg = {**FAST, "clicks": 2}
    cases = [_case(f"r{i}", slices=(0,), objects=1) for i in range(3)]
    kw = dict(report=False, task_name="t", options=eval_options(cfg), seed=SEED, progress=False)

    full = tmp_path / "full"
    evaluate_models({"zero_shot": model}, cases, out_dir=full, **kw)

    part = tmp_path / "part"
    evaluate_models({"zero_shot": model}, cases[:1], out_dir=part, **kw)
    # A kill in the middle of the next case: rows of r1 appended, no marker, last line cut.
    rows = (full / "per_object.csv").read_text().splitlines()
    r1 = [line for line in rows if ",r1," in line]
    with open(part / "per_object.csv", "a") as f:
        f.write("\n".join(r1) + "\n" + r1[0][: len(r1[0]) // 2])
    resumed = evaluate_models({"zero_shot": model}, cases, out_dir=part, **kw)
    assert _files(part) == _files(full)
    assert len(resumed.per_object) == 3 * 2

    # A third run finds everything done and encodes nothing.
    calls = []
    handle = model.sam.image_encoder.register_forward_hook(lambda *a: calls.append(1))
    try:
        evaluate_models({"zero_shot": model}, cases, out_dir=part, **kw)
    finally:
        handle.remove()
    assert calls == [] and _files(part) == _files(full)


def test_per_case_3d_matches_volume_metrics():
    """Slices stacked back into the volume (gaps empty) give volume_metrics' numbers."""
    rng = np.random.default_rng(0)
    num_slices, kept_slices = 6, (1, 2, 4)
    gt = np.zeros((num_slices, H, W), dtype=bool)
    pred = np.zeros_like(gt)
    records = []
    for s in kept_slices:
        gt[s, 10 + s : 40, 12:50] = True
        pred[s] = gt[s] ^ (rng.random((H, W)) < 0.02)  # a noisy prediction
        pred[s, 50:55, 60:66] = True  # and a false positive away from the object
        rec = _record("v", s, num_slices=num_slices, objects=1)
        rec.masks = gt[s][None]
        records.append(rec)
    store = CasePredictions((H, W))
    for s in kept_slices:
        store.add((1, "box", "none"), s, pred[s])
    opts = eval_options({"nsd_tolerance_mm": 1.5})
    (row,) = _per_case_rows(records, None, store, opts, "v")
    expected = volume_metrics(pred, gt, (2.5, 0.8, 0.7), 1.5, "area")
    for key in ("dice", "iou", "hd95", "nsd", "hd", "asd", "conformity"):
        assert row[key] == pytest.approx(expected[key], rel=1e-6), key
    assert row["num_slices"] == 3 and row["hd95_missing"] is False


def test_per_case_scores_against_full_ground_truth_by_default():
    """eval.volume_gt=full (default): a slice where the object had <= 50 px (so it was never
    prompted) still counts in the reference volume; ``kept`` leaves it out."""
    from sam_ft.data.loading import CaseData

    num_slices = 4
    label = np.zeros((num_slices, H, W), dtype=np.uint8)
    records = []
    store = CasePredictions((H, W))
    for s in (0, 1, 2):
        label[s, 10:40, 12:50] = 1
        rec = _record("f", s, num_slices=num_slices, objects=1)
        rec.masks = (label[s] == 1)[None]
        records.append(rec)
        store.add((1, "box", "none"), s, label[s] == 1)  # a perfect prediction where prompted
    label[3, 20:25, 20:26] = 1  # 30 px: dropped by the size filter, never prompted
    case = CaseData(
        case="f",
        image_id="f",
        image_path="f.nii.gz",
        label_path="f_label.nii.gz",
        slices=records,
        label_volume=label,
        objects={"disc": [1]},
        spacing=(2.5, 0.8, 0.7),
        affine=np.eye(4),
        slice_axis=2,
    )
    assert eval_options({}).volume_gt == "full"
    (full,) = _per_case_rows(records, case, store, eval_options({}), "f")
    (kept,) = _per_case_rows(records, case, store, eval_options({"volume_gt": "kept"}), "f")
    assert kept["dice"] == pytest.approx(1.0)
    pred = np.zeros_like(label, dtype=bool)
    pred[:3] = label[:3] == 1
    expected = volume_metrics(pred, label == 1, (2.5, 0.8, 0.7), 2.0, "area")
    assert full["dice"] == pytest.approx(expected["dice"]) and full["dice"] < 1.0
    assert full["nsd"] == pytest.approx(expected["nsd"], rel=1e-6)


def test_per_case_end_to_end_with_saved_predictions(model, tmp_path):
    """per_case.csv equals volume_metrics on the written NIfTI prediction vs the stacked GT."""
    nib = pytest.importorskip("nibabel")
    records = _case("n0", slices=(0, 2), objects=1)  # slice 1 of 3 has no kept object
    res = evaluate_models(
        {"zero_shot": model},
        [records],
        report=False,
        task_name="t",
        options=eval_options({**FAST, "save_predictions": True}),
        out_dir=tmp_path,
        seed=SEED,
        progress=False,
    )
    path = tmp_path / "predictions" / "zero_shot" / "box" / "n0.nii.gz"
    pred = np.asarray(nib.load(path).dataobj) == 1  # (slice, row, col) without a CaseData
    gt = np.zeros((3, H, W), dtype=bool)
    for rec in records:
        gt[rec.slice_index] = rec.masks[0]
    assert not pred[1].any()
    expected = volume_metrics(pred, gt, (2.5, 0.8, 0.7), 2.0, "area")
    row = res.per_case[(res.per_case["prompt"] == "box") & (res.per_case["jitter"] == "none")]
    assert row["dice"].item() == pytest.approx(expected["dice"], rel=1e-9)
    assert row["nsd"].item() == pytest.approx(expected["nsd"], rel=1e-6)


def test_failing_case_is_skipped_and_others_scored(model, tmp_path):
    bad = _case("bad", slices=(0,), objects=1)
    bad[0].masks = np.zeros((1, H - 1, W), dtype=bool)  # label map of the wrong size

    def unreadable():
        raise DataError(str(tmp_path / "broken.nii.gz"), "unreadable or truncated file")

    cases = [
        _case("ok0", slices=(0,), objects=1),
        bad,
        LazyCase("broken", unreadable, str(tmp_path / "broken.nii.gz")),
        _case("ok1", slices=(1,), objects=1),
    ]
    # The default (data.on_error=raise) stops at the first bad case, naming its file.
    with pytest.raises(DataError, match="bad: slice 0: mask/image sizes differ"):
        evaluate_models(
            {"zero_shot": model},
            cases,
            report=False,
            task_name="t",
            options=eval_options(FAST),
            out_dir=tmp_path / "raise",
            seed=SEED,
            progress=False,
        )
    res = evaluate_models(
        {"zero_shot": model},
        cases,
        report=False,
        task_name="t",
        options=eval_options({**FAST, "on_error": "skip"}),
        out_dir=tmp_path,
        seed=SEED,
        progress=False,
    )
    assert sorted(res.per_object["case"].unique()) == ["ok0", "ok1"]
    skipped = pd.read_csv(tmp_path / "skipped.csv")
    assert sorted(skipped["case"]) == ["bad", "broken"]
    assert skipped.set_index("case").loc["broken", "reason"] == "unreadable or truncated file"
    assert set(res.overlays) == {"best_zero_shot", "worst_zero_shot"}


def test_a_bug_is_never_a_skipped_case(model, tmp_path):
    """data.on_error=skip skips only data errors: any other exception stops the run."""

    def buggy():
        raise KeyError("a bug in the loader, not bad data")

    cases = [_case("ok0", slices=(0,), objects=1), LazyCase("buggy", buggy, "buggy.nii.gz")]
    with pytest.raises(KeyError, match="a bug"):
        evaluate_models(
            {"zero_shot": model},
            cases,
            report=False,
            task_name="t",
            options=eval_options({**FAST, "on_error": "skip"}),
            out_dir=tmp_path,
            seed=SEED,
            progress=False,
        )
    skipped = tmp_path / "skipped.csv"
    assert not skipped.exists() or "buggy" not in skipped.read_text()


def test_skipped_cases_are_counted_in_summary_and_logger(model, tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from sam_ft.logging_results import log_evaluation

    def unreadable(name):
        def load():
            raise DataError(str(tmp_path / f"{name}.nii.gz"), "unreadable or truncated file")

        return LazyCase(name, load, str(tmp_path / f"{name}.nii.gz"))

    cases = [_case("ok0", slices=(0,), objects=1), unreadable("b1"), unreadable("b2")]
    out = tmp_path / "eval"
    skip = {**FAST, "on_error": "skip"}
    result = evaluate_models(
        {"zero_shot": model},
        cases,
        task_name="t",
        options=eval_options(skip),
        out_dir=out,
        seed=SEED,
        progress=False,
    )
    md = (out / "summary.md").read_text()
    assert "**2 case(s) skipped**" in md and "| b1 |" in md and "| b2 |" in md
    logger = CSVLogger(tmp_path / "logs", name="")
    log_evaluation(out, result.report, [logger])
    logger.save()
    metrics = pd.read_csv(Path(logger.log_dir) / "metrics.csv")
    assert metrics["eval/skipped"].dropna().tolist() == [2.0]

    clean = tmp_path / "clean"
    evaluate_models(
        {"zero_shot": model},
        cases[:1],
        task_name="t",
        options=eval_options(FAST),
        out_dir=clean,
        seed=SEED,
        progress=False,
    )
    assert "No case was skipped." in (clean / "summary.md").read_text()


def test_two_models_share_prompts_and_report(model, tmp_path):
    """evaluate_and_report: one summary with both models; identical model -> identical Dice."""
    res = evaluate_models(
        {"zero_shot": model, "finetuned": model},
        [_case("m0", slices=(0,), objects=1)],
        task_name="t",
        options=eval_options(FAST),
        out_dir=tmp_path,
        seed=SEED,
        progress=False,
    )
    summary = pd.read_csv(tmp_path / "summary.csv")
    assert set(summary["model"]) == {"zero_shot", "finetuned"}
    assert (tmp_path / "plots" / "overlays_best_finetuned.png").exists()
    a = res.per_object[res.per_object["model"] == "zero_shot"]["dice"].to_numpy()
    b = res.per_object[res.per_object["model"] == "finetuned"]["dice"].to_numpy()
    np.testing.assert_array_equal(a, b)
    assert list(res.per_object["model"].unique()) == ["zero_shot", "finetuned"]


def test_config_errors():
    from sam_ft.errors import ConfigError

    with pytest.raises(ConfigError, match=r"unknown option eval\.promts \(did you mean"):
        eval_options({"promts": ["box"]})
    with pytest.raises(ConfigError, match="mask_selection"):
        eval_options({"mask_selection": "best"})
    opts = eval_options({"prompts": ["box", "everything"], "jitter_px": [[0, 10]]})
    assert opts.prompts == ("everything", "box")
    assert [v[0] for v in opts.variants] == ["box", "box"]


def test_real_png_files_match_sam_predictor(model, tmp_path):
    """8-bit PNGs on disk -> data loaders -> engine: box/point1 oracle Dice equals SamPredictor."""
    from partial_api import find_cases, load_case

    from sam_ft.data.demo import ensure_demo

    root = ensure_demo(tmp_path / "demo_2d", "2d", num_cases=2)
    task = {"name": "demo_2d", "source": "demo", "root": str(root), "modality": "MR"}
    task["intensity"] = {"mode": "none"}
    files = find_cases(root, task)
    res = evaluate_models(
        {"zero_shot": model},
        lazy_cases(files, task),
        report=False,
        task_name="demo_2d",
        options=eval_options(FAST),
        out_dir=tmp_path / "eval",
        seed=SEED,
        progress=False,
    )
    table = res.per_object.set_index(["case", "label", "prompt"])
    predictor = SamPredictor(model.sam)
    checked = 0
    for f in files:
        (rec,) = load_case(f, task).slices
        predictor.set_image(rec.image)
        for mask, label in zip(rec.masks, rec.labels, strict=True):
            for strategy in ("box", "point1"):
                p = make_eval_prompt(
                    mask, strategy, None, seed=SEED, case=f.image_id, slice_index=-1, label=label
                )
                masks, _, _ = predictor.predict(
                    point_coords=p.points, point_labels=p.point_labels, box=p.box
                )
                expected = max(_dice(m, mask) for m in masks)
                got = table.loc[(f.image_id, int(label), strategy), "dice"]
                assert got == pytest.approx(expected, abs=1e-9)
                checked += 1
    assert checked == len(res.per_object) > 0
    assert (res.per_object["slice"] == -1).all() and (res.per_case["num_slices"] == 1).all()


def test_the_bar_shows_the_slice_being_decoded(model, tmp_path, capsys):
    """Inside a long case the bar names the case and slice, so a slow case does not look hung."""
    cases = [_case("p0", slices=(0, 1, 2), objects=1)]
    evaluate_models(
        {"zero_shot": model},
        cases,
        report=False,
        task_name="t",
        options=eval_options({**FAST, "prompts": ["box"], "overlays": 0}),
        out_dir=tmp_path,
        seed=SEED,
        progress=True,
    )
    err = capsys.readouterr().err
    assert "p0: slice 1/3" in err and "p0: slice 3/3" in err


def test_everything_keeping_no_mask_is_said_not_silent(model, tmp_path, caplog):
    """A predicted-IoU threshold above 1 keeps no mask: S1's zeros come with a warning naming
    how many objects and the threshold."""
    cfg = {**FAST, "prompts": ["everything"], "grid": 2, "overlays": 0}
    cfg["everything"] = {"pred_iou_thresh": 1.5, "stability_score_thresh": 0.0}
    with caplog.at_level("WARNING", logger="sam_ft"):
        res = evaluate_models(
            {"zero_shot": model},
            [_case("w0", slices=(0,), objects=2)],
            report=False,
            task_name="t",
            options=eval_options(cfg),
            out_dir=tmp_path,
            seed=SEED,
            progress=False,
        )
    assert (res.per_object["dice"] == 0).all()
    said = [r.getMessage() for r in caplog.records if "kept no mask" in r.getMessage()]
    assert len(said) == 1 and "2 of 2 objects" in said[0] and "pred_iou_thresh=1.5" in said[0]
