"""eval.mode=propagate through the engine with a tiny random-weight SAM on real NIfTI files in tmp:
pairing with the slices mode, per-volume scores against the whole label volume, and the shards'
merge (the official-loop parity with LiteMedSAM's real weights is in test_propagation.py)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from wrapped_sam import wrap_sam

from sam_ft.evaluation.protocol.engine import evaluate_models
from sam_ft.evaluation.protocol.options import eval_options
from sam_ft.model.builders import build_sam_architecture
from sam_ft.model.trainable import TrainableSam

nib = pytest.importorskip("nibabel")

S, H, W = 9, 48, 56
SEED = 3
CFG = {"prompts": ["box"], "jitter_px": [], "overlays": 0, "workers": 0}


@pytest.fixture(scope="module")
def model() -> TrainableSam:
    torch.manual_seed(0)
    return wrap_sam(build_sam_architecture("tiny", image_size=64)).eval()


def _write_case(root, name: str, shift: int) -> None:
    """A (W, H, S) RAS volume: a bright ellipsoid (label 1, slices 2-6) and a box (label 2,
    slices 1-7, 1 px on slice 7: kept out of the prompts, counted in the 3D score)."""
    x, y, z = np.mgrid[:W, :H, :S]
    ellipsoid = ((x - 20 - shift) / 10) ** 2 + ((y - 24) / 12) ** 2 + ((z - 4) / 2.5) ** 2 < 1
    label = ellipsoid.astype(np.uint8)
    label[38:50, 6:18, 1:7] = 2
    label[40, 10, 7] = 2
    rng = np.random.default_rng(shift)
    image = rng.normal(40, 8, label.shape) + 90 * (label > 0)
    affine = np.diag([0.9, 0.8, 3.0, 1.0])
    for sub, data in (("imagesTr", image.astype(np.float32)), ("labelsTr", label)):
        (root / sub).mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(data, affine), root / sub / f"{name}.nii.gz")


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    from partial_api import find_cases, load_case

    root = tmp_path_factory.mktemp("volumes")
    for i in range(3):
        _write_case(root, f"vol_{i}", shift=2 * i)
    task = {"name": "vol", "source": "folder", "root": str(root), "modality": "MR"}
    task |= {"slice_axis": 2, "intensity": {"mode": "none"}}
    data = {"min_object_pixels": 5}
    return [load_case(f, task, data, keep_images=True) for f in find_cases(root, task)]


def _evaluate(model, cases, out, name, **cfg):
    return evaluate_models(
        {name: model},
        cases,
        task_name="vol",
        options=eval_options({**CFG, **cfg}),
        out_dir=out,
        seed=SEED,
        progress=False,
        report=False,
    )


def test_propagation_pairs_with_the_slices_mode_and_scores_whole_volumes(model, cases, tmp_path):
    """The key slice's mask is the slices mode's on that slice (same prompt, same selection);
    every kept slice is scored in both modes (paired rows); the 3D Dice is the saved volume's
    against the whole label volume; the over/missed counts follow from the rows."""
    slices = _evaluate(model, cases, tmp_path, "m").per_object
    res = _evaluate(
        model, cases, tmp_path, "m_propagate", mode="propagate", save_predictions=True
    )  # fmt: skip
    prop = res.per_object
    keys = ["case", "slice", "label", "prompt", "jitter"]
    assert sorted(map(tuple, prop[keys].values)) == sorted(map(tuple, slices[keys].values))
    table = pd.read_csv(tmp_path / "propagation.csv", dtype={"case": str})
    at_key = [tuple(k) for k in table.loc[table["is_key"], ["case", "slice", "label"]].values]
    assert len(at_key) == 2 * len(cases)  # one key per object
    index = ["case", "slice", "label"]
    np.testing.assert_allclose(
        prop.set_index(index).loc[at_key, "dice"], slices.set_index(index).loc[at_key, "dice"]
    )
    for case in cases:
        for label in (1, 2):
            gt = case.gt_volume(label)
            rows = table.query(f"case == '{case.image_id}' and label == {label}")
            row = res.per_case.query(f"case == '{case.image_id}' and label == {label}").iloc[0]
            # The 3D Dice over the whole label volume, from the per-slice counts.
            inter = (rows["dice"] * (rows["gt_px"] + rows["pred_px"]) / 2).sum()
            assert rows["gt_px"].sum() == gt.sum()  # every slice of the object, kept or not
            assert row["dice"] == pytest.approx(2 * inter / (gt.sum() + rows["pred_px"].sum()))
            z = np.flatnonzero(gt.any(axis=(1, 2)))
            assert (rows["in_extent"] == rows["slice"].between(z[0], z[-1])).all()
            assert (rows["distance"] == rows["slice"] - rows["key_slice"]).all()
            # vanish: a chain's predicted slices are contiguous around its key.
            on = sorted(rows.loc[rows["pred_px"] > 0, "slice"])
            assert on == list(range(on[0], on[-1] + 1)) if on else True


def _files(out) -> dict[str, bytes]:
    names = ("per_object.csv", "per_case.csv", "propagation.csv")
    return {n: (out / n).read_bytes() for n in names}


def test_propagation_shards_merge_and_resume_equal_one_process(model, cases, tmp_path):
    """Shards 0/2 and 1/2 merge to the one-process files (propagation's included), and a run
    killed mid-case resumes to the same files."""
    from sam_ft.evaluation.protocol.distributed import RunFacts, evaluate_cases
    from sam_ft.evaluation.protocol.merge import merge_shards

    def run(out, shard=None, subset=cases):
        # Few bootstrap resamples: the reports' CIs are not what is tested here.
        boot = {"resamples": 100, "method": "percentile"}
        eval_cfg = {**CFG, "mode": "propagate", "shard": shard, "bootstrap": boot}
        facts = RunFacts("vol", SEED, "tiny", checkpoint="", slicing={}, data_split={})
        evaluate_cases(
            {"m_propagate": model}, subset, options=eval_options(eval_cfg), facts=facts,
            out_dir=out, slices=[1] * 3,
        )  # fmt: skip

    run(tmp_path / "one")
    run(tmp_path / "s0", "0/2")
    run(tmp_path / "s1", "1/2")
    merge_shards([tmp_path / "s0", tmp_path / "s1"], tmp_path / "merged")
    one = _files(tmp_path / "one")
    assert _files(tmp_path / "merged") == one
    for name in ("summary.md", "propagation_volumes.csv", "propagation_distance.csv"):
        assert (tmp_path / "merged" / name).read_bytes() == (tmp_path / "one" / name).read_bytes()
    assert "## Propagation" in (tmp_path / "one" / "summary.md").read_text()
    volumes = pd.read_csv(tmp_path / "one" / "propagation_volumes.csv")
    assert len(volumes) == 2 * len(cases) and (volumes["prompts"] == 1).all()
    per_case = pd.read_csv(tmp_path / "one" / "per_case.csv")
    np.testing.assert_array_equal(volumes["dice"], per_case["dice"])

    # A kill in the middle of the second case: its rows appended, no marker, last line cut.
    part = tmp_path / "part"
    _evaluate(model, cases[:1], part, "m_propagate", mode="propagate")
    lines = (tmp_path / "one" / "propagation.csv").read_text().splitlines()
    second = [line for line in lines if f",{cases[1].image_id}," in line]
    with open(part / "propagation.csv", "a") as f:
        f.write("\n".join(second) + "\n" + second[0][: len(second[0]) // 2])
    _evaluate(model, cases, part, "m_propagate", mode="propagate")
    assert _files(part) == one


def test_two_evenly_spaced_keys_split_the_volume(model, cases, tmp_path):
    """key=even keys=2: two prompted slices per object, each slice carried from its nearest."""
    evaluate_models(
        {"m_propagate": model},
        cases[:1],
        task_name="vol",
        out_dir=tmp_path,
        seed=SEED,
        options=eval_options({**CFG, "mode": "propagate", "propagate": {"key": "even", "keys": 2}}),
        progress=False,
        report=True,
    )
    table = pd.read_csv(tmp_path / "propagation.csv")
    volumes = pd.read_csv(tmp_path / "propagation_volumes.csv")
    assert (volumes["prompts"] == 2).all()
    for label, rows in table.groupby("label"):
        keys = sorted(rows.loc[rows["is_key"], "slice"])
        gt = cases[0].gt_volume(int(label))
        area = gt.sum(axis=(1, 2))
        z, kept = np.flatnonzero(area), np.flatnonzero(area > 5)  # data.min_object_pixels 5
        # The extent's two ends, each moved to the nearest slice that was kept (prompted).
        assert keys == [kept[np.abs(kept - e).argmin()] for e in (z[0], z[-1])]
        nearest = [min(keys, key=lambda k, s=s: (abs(k - s), k)) for s in rows["slice"]]
        assert list(rows["key_slice"]) == nearest
    assert (tmp_path / "plots" / "propagation_distance.png").stat().st_size > 0
