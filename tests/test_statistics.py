"""Inference over cases (issue #29): the summaries' CIs are scipy.stats.bootstrap's over cases,
the paired p-values scipy.stats.wilcoxon's, Holm's correction the textbook one, and the numbers
do not depend on the row order (as merged shards and DDP ranks deliver rows)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from sam_ft.errors import ConfigError
from sam_ft.evaluation.protocol.options import eval_options
from sam_ft.evaluation.reports.calibration import calibration_table
from sam_ft.evaluation.reports.provenance import config_hash
from sam_ft.evaluation.reports.statistics import Bootstrap, comparison_table, holm
from sam_ft.evaluation.reports.summary import write_report
from sam_ft.evaluation.reports.summary_tables import pooled_summary, summarize

BOOT = Bootstrap(resamples=999, seed=7, method="BCa", confidence=0.95)


def _objects(seed: int = 0, cases: int = 12) -> pd.DataFrame:
    """Two models x two prompts on the same objects: 1-3 objects per case; the finetuned model
    misses case c00 and zero-shot case c11 (left out of their pairings)."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(cases):
        for label in range(1, 1 + int(rng.integers(1, 4))):
            base = rng.uniform(0.3, 0.8)
            for model, gain in (("zero_shot", 0.0), ("finetuned", 0.08)):
                if (model, c) in (("finetuned", 0), ("zero_shot", cases - 1)):
                    continue
                for prompt, shift in (("box", 0.0), ("point1", -0.15)):
                    dice = float(np.clip(base + gain + shift + rng.normal(0, 0.05), 0, 1))
                    rows.append(
                        {"model": model, "task": "liver", "case": f"c{c:02d}", "slice": 4,
                         "label": label, "prompt": prompt, "jitter": "none", "dice": dice,
                         "iou": dice / (2 - dice), "hd95": rng.uniform(1, 9), "nsd": dice,
                         "pred_iou": float(np.clip(dice / (2 - dice) + rng.normal(0, .1), 0, 1)),
                         "distance_unit": "mm"}
                    )  # fmt: skip
    return pd.DataFrame(rows)


def _scipy_ci(values_by_case: list[list[float]], opts: Bootstrap) -> tuple[float, float]:
    """The reference: scipy.stats.bootstrap resampling cases, the statistic being the mean over
    the objects of the resampled cases (sum of their values / number of their objects)."""
    sums = np.array([sum(v) for v in values_by_case])
    counts = np.array([float(len(v)) for v in values_by_case])
    res = stats.bootstrap(
        (sums, counts),
        lambda s, n, axis=-1: s.sum(axis=axis) / n.sum(axis=axis),
        paired=True,
        vectorized=True,
        n_resamples=opts.resamples,
        method=opts.method,
        confidence_level=opts.confidence,
        rng=np.random.default_rng(opts.seed),
    )
    return res.confidence_interval.low, res.confidence_interval.high


def _by_case(rows: pd.DataFrame, column: str) -> list[list[float]]:
    cases = sorted(set(rows["case"]))
    return [rows.loc[rows["case"] == c, column].tolist() for c in cases]


@pytest.mark.parametrize("method", ["BCa", "percentile"])
def test_summary_ci_bounds_are_scipy_bootstraps_over_cases(method):
    opts = Bootstrap(resamples=999, seed=3, method=method, confidence=0.9)
    rows = _objects()
    summary = summarize(rows, opts)
    for metric in ("dice", "iou", "hd95", "nsd"):
        for (model, prompt), group in rows.groupby(["model", "prompt"]):
            got = summary[(summary["model"] == model) & (summary["prompt"] == prompt)].iloc[0]
            low, high = _scipy_ci(_by_case(group, metric), opts)
            assert got[f"{metric}_ci_low"] == pytest.approx(low, rel=1e-12)
            assert got[f"{metric}_ci_high"] == pytest.approx(high, rel=1e-12)
            assert got[f"{metric}_ci_low"] <= got[f"{metric}_mean"] <= got[f"{metric}_ci_high"]
            assert got["n_cases"] == group["case"].nunique()


def test_one_object_per_case_is_the_plain_bootstrap_of_the_mean():
    rows = _objects()
    rows = rows[rows["label"] == 1]
    got = summarize(rows, BOOT).iloc[0]
    group = rows[(rows["model"] == got["model"]) & (rows["prompt"] == got["prompt"])]
    x = group.sort_values("case")["dice"].to_numpy()
    ref = stats.bootstrap((x,), np.mean, n_resamples=999, rng=np.random.default_rng(7))
    assert got["dice_ci_low"] == pytest.approx(ref.confidence_interval.low, rel=1e-12)
    assert got["dice_ci_high"] == pytest.approx(ref.confidence_interval.high, rel=1e-12)


def test_statistics_do_not_depend_on_row_order():
    """Merged shards and DDP ranks hand the rows in another order; the case table is sorted."""
    rows = _objects()
    shuffled = rows.sample(frac=1.0, random_state=5).reset_index(drop=True)
    pd.testing.assert_frame_equal(summarize(rows, BOOT), summarize(shuffled, BOOT))
    pd.testing.assert_frame_equal(comparison_table(rows, BOOT), comparison_table(shuffled, BOOT))


def test_paired_comparison_is_wilcoxon_over_cases_with_holm_and_left_out_cases():
    rows = _objects()
    table = comparison_table(rows, BOOT)
    model = table[(table["family"] == "model") & (table["prompt"] == "box")].iloc[0]
    zs = rows[(rows["model"] == "zero_shot") & (rows["prompt"] == "box")]
    ft = rows[(rows["model"] == "finetuned") & (rows["prompt"] == "box")]
    pairs = zs.merge(ft, on=["case", "label"], suffixes=("_a", "_b"))
    pairs["d"] = pairs["dice_b"] - pairs["dice_a"]
    per_case = pairs.groupby("case")["d"].mean()
    assert model["n_cases"] == len(per_case) == 10 and model["n_objects"] == len(pairs)
    assert model["left_out"] == "liver/c00;liver/c11"
    assert model["delta"] == pytest.approx(pairs["d"].mean())
    assert model["mean_b"] - model["mean_a"] == pytest.approx(pairs["d"].mean())
    assert model["p_value"] == pytest.approx(stats.wilcoxon(per_case.to_numpy()).pvalue)
    low, high = _scipy_ci(_by_case(pairs, "d"), BOOT)
    assert (model["delta_ci_low"], model["delta_ci_high"]) == pytest.approx((low, high))
    # Holm within each family: the model family has both prompts, the prompt family both models.
    for _, family in table.groupby("family"):
        assert len(family) == 2
        np.testing.assert_allclose(family["p_holm"], holm(family["p_value"]))
    prompt = table[(table["family"] == "prompt") & (table["model"] == "zero_shot")].iloc[0]
    assert prompt["a"] == "box" and prompt["b"] == "point1" and prompt["delta"] < 0
    assert prompt["left_out"] == ""


def test_holm_hand_computed():
    # Sorted 0.01, 0.03, 0.04 (m = 3): 3 x 0.01, max(0.03, 2 x 0.03), max(0.06, 1 x 0.04).
    np.testing.assert_allclose(holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    # NaN is no test (m = 2); 2 x 0.5 = 1, then max(1, 0.9): adjusted p never decrease.
    np.testing.assert_allclose(holm([0.5, np.nan, 0.9]), [1.0, np.nan, 1.0])


def test_calibration_spearman_and_mace():
    rows = _objects()
    table = calibration_table(rows, BOOT)
    got = table[(table["model"] == "zero_shot") & (table["prompt"] == "box")].iloc[0]
    ref = rows[(rows["model"] == "zero_shot") & (rows["prompt"] == "box")]
    assert got["spearman_rho"] == pytest.approx(stats.spearmanr(ref["pred_iou"], ref["iou"])[0])
    error = (ref["pred_iou"] - ref["iou"]).abs()
    assert got["mace"] == pytest.approx(error.mean())
    low, high = _scipy_ci(_by_case(ref.assign(e=error), "e"), BOOT)
    assert (got["mace_ci_low"], got["mace_ci_high"]) == pytest.approx((low, high))
    assert np.isnan(got["dice_gap"])  # no dice_oracle / dice_top_iou columns recorded
    # With them: oracle minus the IoU head's choice, its CI over cases.
    loss = np.random.default_rng(2).uniform(0, 0.1, len(rows))
    rows = rows.assign(dice_oracle=rows["dice"], dice_top_iou=rows["dice"] - loss)
    table = calibration_table(rows, BOOT)
    got = table[(table["model"] == "zero_shot") & (table["prompt"] == "box")].iloc[0]
    ref = rows[(rows["model"] == "zero_shot") & (rows["prompt"] == "box")]
    gap = ref["dice_oracle"] - ref["dice_top_iou"]
    assert got["dice_gap"] == pytest.approx(gap.mean())
    low, high = _scipy_ci(_by_case(ref.assign(g=gap), "g"), BOOT)
    assert (got["dice_gap_ci_low"], got["dice_gap_ci_high"]) == pytest.approx((low, high))


def test_pooled_ci_resamples_the_cases_of_every_task():
    rows = _objects()
    other = _objects(seed=1).assign(task="prostate")  # same case ids in another task
    both = pd.concat([rows, other], ignore_index=True)
    got = pooled_summary(both, BOOT)
    got = got[(got["model"] == "zero_shot") & (got["prompt"] == "box")].iloc[0]
    sel = both[(both["model"] == "zero_shot") & (both["prompt"] == "box")]
    assert got["n_cases"] == 22
    by_case = [g["dice"].tolist() for _, g in sel.groupby(["task", "case"])]
    assert (got["dice_ci_low"], got["dice_ci_high"]) == pytest.approx(_scipy_ci(by_case, BOOT))


def test_bootstrap_options_are_checked():
    assert eval_options({"bootstrap": {"seed": 4}}).bootstrap.seed == 4
    with pytest.raises(ConfigError, match="eval.bootstrap.method"):
        eval_options({"bootstrap": {"method": "jackknife"}})
    with pytest.raises(ConfigError, match="eval.bootstrap.resamples"):
        eval_options({"bootstrap": {"resamples": 10}})


def test_report_writes_provenance_and_the_config_hash_survives_json(tmp_path):
    cfg = {"prompts": ["box", "point1"], "jitter_px": [], "nsd_method": "count", "workers": 0}
    options = eval_options(cfg)
    again = eval_options(json.loads(json.dumps({**cfg, "workers": 3})))  # as shard.json keeps it
    assert config_hash(options, 1) == config_hash(again, 1) != config_hash(options, 2)
    paths = write_report(tmp_path, _objects(), options=options, seed=1).paths
    info = json.loads(paths["provenance_json"].read_text())
    assert info["config_hash"] == config_hash(options, 1) and info["sam_ft_version"]
    assert "count" in info["nsd"] and "999" not in info["confidence_intervals"]
    md = paths["summary_md"].read_text()
    assert "## Provenance" in md and info["config_hash"] in md
    assert "## IoU-head calibration" in md and paths["plot_iou_reliability"].is_file()
    assert "liver/c00;liver/c11" in paths["comparisons_csv"].read_text()
    # The tables state the bootstrap settings beside their CIs; summary.md says them once.
    for key in ("summary_csv", "comparisons_csv", "calibration_csv"):
        table = pd.read_csv(paths[key])
        assert set(table["ci_resamples"]) == {options.bootstrap.resamples}, key
        assert set(table["ci_seed"]) == {options.bootstrap.seed} and set(table["ci_method"]) == {
            "BCa"
        }
    assert "ci_seed" not in md and f"{options.bootstrap.resamples} resamples, seed 0" in md


def test_logged_scalars_carry_the_ci_bounds_and_the_paired_test(tmp_path):
    from sam_ft.logging_results import evaluation_scalars

    rows = _objects()
    report = write_report(tmp_path, rows, options=eval_options(None))
    scalars = evaluation_scalars(report, tmp_path)
    summary = pd.read_csv(tmp_path / "summary.csv")
    box = summary[(summary["model"] == "finetuned") & (summary["prompt"] == "box")].iloc[0]
    assert scalars["eval/finetuned/box/none/dice"] == pytest.approx(box["dice_mean"])
    assert scalars["eval/finetuned/box/none/dice_ci_low"] == box["dice_ci_low"]
    assert scalars["eval/finetuned/box/none/hd95_ci_high"] == box["hd95_ci_high"]
    paired = pd.read_csv(tmp_path / "comparisons.csv")
    paired = paired[(paired["family"] == "model") & (paired["prompt"] == "box")].iloc[0]
    assert scalars["eval/paired/finetuned/box/none/p_value"] == paired["p_value"]
    assert scalars["eval/paired/finetuned/box/none/ci_low"] == paired["delta_ci_low"]
