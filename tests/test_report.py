"""Report layer: summary means, NoC, the files write_report makes, and the sam-ft-report CLI."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from sam_ft.evaluation.reports.plots import plot_overlay_grid
from sam_ft.evaluation.reports.summary import write_report
from sam_ft.evaluation.reports.summary_tables import SUMMARY_COLUMNS, noc, summarize
from sam_ft.prompts.types import Prompt
from sam_ft.report import main, merge_summaries


def _row(model, prompt, dice, jitter="none", task="liver", hd95=5.0, case="c0", **extra):
    return {
        "model": model,
        "task": task,
        "case": case,
        "slice": 3,
        "label": 1,
        "name": "liver",
        "prompt": prompt,
        "jitter": jitter,
        "dice": dice,
        "iou": dice / (2 - dice),
        "hd95": hd95,
        "hd95_missing": bool(np.isnan(hd95)),
        "nsd": dice,
        "area_px": extra.get("area_px", 100),
        "aspect_ratio": extra.get("aspect_ratio", 1.0),
        "boundary_complexity": extra.get("boundary_complexity", 1.2),
        "contrast": extra.get("contrast", 0.5),
        "modality": "CT",
    }


@pytest.fixture
def per_object() -> pd.DataFrame:
    rows = [
        # Listed out of display order on purpose.
        _row("finetuned", "box", 0.9, case="c0", area_px=100),
        _row("finetuned", "box", 0.7, case="c1", area_px=50, hd95=float("nan")),
        _row("zero_shot", "box", 0.8, case="c0", hd95=4.0, area_px=100),
        _row("zero_shot", "box", 0.6, case="c1", hd95=8.0, area_px=50),
        _row("zero_shot", "box", 0.5, case="c2", hd95=6.0, area_px=70),
        _row("zero_shot", "box", 0.4, jitter="20-30"),
        _row("zero_shot", "box", 0.6, jitter="0-10"),
        _row("zero_shot", "point1", 0.3),
        _row("zero_shot", "everything", 0.2),
    ]
    return pd.DataFrame(rows)


def test_summarize_means_and_order(per_object):
    s = summarize(per_object)
    assert list(s.columns) == SUMMARY_COLUMNS
    assert list(zip(s["model"], s["prompt"], s["jitter"], strict=True)) == [
        ("zero_shot", "everything", "none"),
        ("zero_shot", "point1", "none"),
        ("zero_shot", "box", "none"),
        ("zero_shot", "box", "0-10"),
        ("zero_shot", "box", "20-30"),
        ("finetuned", "box", "none"),
    ]
    zs = s.iloc[2]
    assert zs["n"] == 3
    assert zs["dice_mean"] == pytest.approx((0.8 + 0.6 + 0.5) / 3)
    assert zs["dice_std"] == pytest.approx(np.std([0.8, 0.6, 0.5]))
    assert zs["hd95_mean"] == pytest.approx(6.0)
    ft = s.iloc[5]
    assert ft["dice_mean"] == pytest.approx(0.8)
    # The missing HD95 is skipped, not counted as 0, and counted as missing.
    assert ft["hd95_mean"] == pytest.approx(5.0)
    assert ft["hd95_missing"] == 1


def test_summarize_reads_hd95_missing_from_csv_strings(per_object, tmp_path):
    per_object.to_csv(tmp_path / "p.csv", index=False)
    s = summarize(pd.read_csv(tmp_path / "p.csv").astype({"hd95_missing": str}))
    assert s.loc[s["model"] == "finetuned", "hd95_missing"].item() == 1


def test_summaries_per_label_value_beside_the_pooled_one(tmp_path):
    """The official code reports each target (liver, tumour) on its own: summary_label.csv has
    one row per (model, task, label, prompt, jitter), with the same statistics as the pooled
    summary computed over that label's objects only."""
    from sam_ft.evaluation.reports.summary_tables import summarize_by_label

    rng = np.random.default_rng(0)
    rows = []
    for k in range(12):
        label, name = (1, "liver") if k % 3 else (2, "liver_tumour")
        dice = float(rng.uniform(0.2, 0.95))
        row = _row("finetuned", "box", dice, case=f"c{k}", hd95=float(rng.uniform(1, 9)))
        row.update(label=label, name=name, hd=2 * row["hd95"], asd=row["hd95"] / 3)
        row["conformity"] = (3 * dice - 2) / dice
        rows.append(row)
    per_object = pd.DataFrame(rows)
    per_object.loc[4, ["hd95", "hd", "asd"]] = np.nan
    per_object.loc[4, "hd95_missing"] = True
    got = summarize_by_label(per_object)
    assert list(got["label"]) == [1, 2] and list(got["name"]) == ["liver", "liver_tumour"]
    for _, r in got.iterrows():
        sub = per_object[per_object["label"] == r["label"]]
        assert r["n"] == len(sub)
        assert r["dice_mean"] == pytest.approx(np.mean(sub["dice"]))
        assert r["dice_std"] == pytest.approx(np.std(sub["dice"]))
        assert r["hd_mean"] == pytest.approx(np.nanmean(sub["hd"]))
        assert r["asd_mean"] == pytest.approx(np.nanmean(sub["asd"]))
        assert r["conformity_mean"] == pytest.approx(np.mean(sub["conformity"]))
        assert r["hd95_missing"] == int(sub["hd95_missing"].sum())
    pooled = summarize(per_object)
    assert len(pooled) == 1 and pooled["n"].item() == 12
    assert pooled["dice_mean"].item() == pytest.approx(per_object["dice"].mean())
    paths = write_report(tmp_path / "eval", per_object).paths
    written = pd.read_csv(paths["summary_label_csv"])
    assert list(written["label"]) == [1, 2]
    assert "## Per target (label value, no jitter)" in paths["summary_md"].read_text()


def test_noc_hand_computed():
    dice = {"a": [0.5, 0.86, 0.92], "b": [0.88, 0.89, 0.89], "c": [0.1, 0.2]}
    rows = [
        {
            "model": "zero_shot",
            "task": "t",
            "case": c,
            "slice": 0,
            "label": 1,
            "click": k + 1,
            "dice": d,
        }  # fmt: skip
        for c, ds in dice.items()
        for k, d in enumerate(ds)
    ]
    t = noc(pd.DataFrame(rows)).iloc[0]
    # NoC@85: a at click 2, b at 1, c never -> N = 3. NoC@90: a at 3, b and c never -> 3.
    assert t["n"] == 3
    assert t["noc@85"] == pytest.approx((2 + 1 + 3) / 3)
    assert t["noc@90"] == pytest.approx(3.0)
    assert t["dice@1"] == pytest.approx((0.5 + 0.88 + 0.1) / 3)
    # c stopped after 2 clicks: its last Dice carries forward.
    assert t["dice@3"] == pytest.approx((0.92 + 0.89 + 0.2) / 3)


def _overlay_items():
    image = np.zeros((32, 32, 3), np.uint8)
    gt = np.zeros((32, 32), bool)
    gt[8:20, 8:20] = True
    pred = np.roll(gt, 2, axis=1)
    return [
        (image, gt, pred, Prompt(box=[8, 8, 19, 19]), "box"),
        (image, gt, pred, {"points": [[14, 14], [2, 2]], "point_labels": [1, 0]}, "points"),
        (image, gt, np.zeros_like(gt), None, "empty prediction"),
    ]


def test_write_report_creates_every_file(per_object, tmp_path):
    clicks = pd.DataFrame(
        [
            {
                "model": m,
                "task": "liver",
                "case": "c0",
                "slice": 3,
                "label": 1,
                "click": k,
                "dice": 0.5 + 0.1 * k,
            }  # fmt: skip
            for m in ("zero_shot", "finetuned")
            for k in (1, 2, 3, 4)
        ]
    )
    per_case = per_object.drop(columns=["slice"])
    paths = write_report(
        tmp_path / "eval",
        per_object,
        per_case,
        clicks=clicks,
        overlays={"best": _overlay_items(), "worst": _overlay_items()[:1]},
    ).paths
    expected = {
        "summary_csv",
        "summary_label_csv",
        "summary_md",
        "summary_txt",
        "summary_case_csv",
        "spearman_csv",
        "noc_csv",
        "plot_dice_per_prompt",
        "plot_dice_vs_jitter",
        "plot_dice_vs_clicks",
        "plot_attributes",
        "plot_overlays_best",
        "plot_overlays_worst",
        "comparisons_csv",
        "calibration_csv",
        "provenance_json",
        "plot_iou_reliability",
    }
    assert set(paths) == expected
    for key, path in paths.items():
        assert path.is_file() and path.stat().st_size > 0, key
        if key.startswith("plot_"):
            assert path.parent == tmp_path / "eval" / "plots"
            assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    md = paths["summary_md"].read_text()
    # Box, no jitter: finetuned 0.800 vs zero-shot 0.633 over their own cases; paired on c0
    # and c1 (c2 has no finetuned row): +0.1 each, Wilcoxon p = 0.5 on 2 cases.
    assert "Δ finetuned − zero_shot" in md
    box = "| S5 box | 0.633 [0.500, 0.800] | 0.800 [0.700, 0.900] | +0.100 [+0.100, +0.100] |"
    assert box in md
    assert "| 0.5 | 2 |" in md
    assert "Robustness to prompt jitter" in md and "NoC@t" in md
    assert "![dice_per_prompt](plots/dice_per_prompt.png)" in md
    written = pd.read_csv(paths["summary_csv"])
    assert list(written.columns)[: len(SUMMARY_COLUMNS)] == SUMMARY_COLUMNS and len(written) == 6
    assert {"n_cases", "dice_ci_low", "dice_ci_high", "hd95_ci_low"} <= set(written.columns)


def test_overlay_grid_alone(tmp_path):
    path = plot_overlay_grid(tmp_path / "grid.png", _overlay_items(), ncols=2)
    assert path.stat().st_size > 1000


def test_overlay_grid_takes_tensors(tmp_path):
    # The training loop passes torch tensors, the image channel-first.
    image, gt, pred, _, _ = _overlay_items()[0]
    item = (
        torch.from_numpy(image).permute(2, 0, 1),
        torch.from_numpy(gt),
        torch.from_numpy(pred),
        {"box": torch.tensor([8.0, 8.0, 19.0, 19.0])},
        "tensors",
    )
    assert plot_overlay_grid(tmp_path / "t.png", [item]).stat().st_size > 1000


def _fake_run(folder, size, mode, dice_zero, dice_ft, task="liver"):
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(
        f"model:\n  name: {size}\nfinetune:\n  name: {mode}\ntask:\n  name: {task}\n"
        "paths:\n  output_dir: ${hydra:runtime.output_dir}\n"
    )
    rows = [
        _row("zero_shot", "box", dice_zero, task=task),
        _row("finetuned", "box", dice_ft, task=task),
    ]
    rows += [_row("finetuned", "box", dice_ft - 0.2, jitter="20-30", task=task)]
    (folder / "eval").mkdir()
    summarize(pd.DataFrame(rows)).to_csv(folder / "eval" / "summary.csv", index=False)


def test_report_cli_merges_runs(tmp_path, capsys):
    multirun = tmp_path / "multirun"
    _fake_run(multirun / "0", "vit_b", "decoder", 0.70, 0.80)
    _fake_run(multirun / "1", "vit_b", "lora", 0.70, 0.85)
    single = tmp_path / "single"
    _fake_run(single, "vit_h", "decoder", 0.75, 0.90)
    provenance = {"sam_ft_version": "9.9", "config_hash": "abc123def456"}
    (single / "eval" / "provenance.json").write_text(json.dumps(provenance))

    merged = merge_summaries([multirun, single])
    # Each row says which protocol produced it (a run written before provenance.json: empty).
    hashes = merged.groupby("model_size")["config_hash"].agg(lambda h: set(h.fillna("")))
    assert hashes["vit_h"] == {"abc123def456"} and hashes["vit_b"] == {""}
    keys = list(zip(merged["model_size"], merged["finetune"], merged["jitter"], strict=True))
    assert keys == [
        ("vit_b", "zero_shot", "none"),
        ("vit_b", "decoder", "none"),
        ("vit_b", "lora", "none"),
        ("vit_b", "decoder", "20-30"),
        ("vit_b", "lora", "20-30"),
        ("vit_h", "zero_shot", "none"),
        ("vit_h", "decoder", "none"),
        ("vit_h", "decoder", "20-30"),
    ]
    delta = merged.set_index(["model_size", "finetune", "jitter"])["delta_dice"]
    assert delta[("vit_b", "lora", "none")] == pytest.approx(0.15)
    assert delta[("vit_h", "decoder", "none")] == pytest.approx(0.15)
    # Deltas compare at the same jitter; zero-shot was not run jittered here.
    assert math.isnan(delta[("vit_b", "decoder", "20-30")])
    assert math.isnan(delta[("vit_b", "zero_shot", "none")])

    assert main([str(multirun), str(single)]) == 0
    md = (multirun / "report.md").read_text()
    assert "| vit_b | liver | S5 box | 0.700 | 0.800 (+0.100) | 0.850 (+0.150) |" in md
    assert "| vit_h | liver | S5 box | 0.750 | 0.900 (+0.150) | – |" in md
    assert (multirun / "report.png").stat().st_size > 0
    assert len(pd.read_csv(multirun / "report.csv")) == 8

    out = tmp_path / "elsewhere" / "r.md"
    assert main([str(single), "--out", str(out)]) == 0
    assert out.is_file() and (out.parent / "report.png").is_file()
    capsys.readouterr()


def test_report_cli_names_the_folder_without_summaries(tmp_path, capsys):
    empty = tmp_path / "nothing_here"
    empty.mkdir()
    assert main([str(empty)]) == 1
    err = capsys.readouterr().err
    assert str(empty) in err and "no summary.csv" in err


def test_every_table_ranks_nondefault_jitter_levels_numerically(tmp_path):
    """Levels [[0, 5], [5, 10], [10, 20]]: as text "10-20" < "5-10"; every table must order
    none, 0-5, 5-10, 10-20 and the robustness drop must go to 10-20, the largest level."""
    from sam_ft.evaluation.protocol.order import sort_table
    from sam_ft.evaluation.reports.summary_tables import jitter_table

    dice = {"none": 0.9, "0-5": 0.8, "5-10": 0.7, "10-20": 0.5}
    order = list(dice)
    shuffled = ["10-20", "5-10", "none", "0-5"]
    rows = [_row(m, "box", dice[j], jitter=j) for m in ("zero_shot", "finetuned") for j in shuffled]
    per_object = pd.DataFrame(rows)

    # per_object.csv / per_case.csv order (the engine's canonical sort).
    sorted_rows = sort_table(per_object)
    assert list(sorted_rows["jitter"][:4]) == order
    assert list(sorted_rows["model"][:4]) == ["zero_shot"] * 4

    summary = summarize(per_object)
    assert list(summary["jitter"]) == order * 2

    robust = jitter_table(summary)
    drop = [c for c in robust.columns if c.startswith("drop")]
    assert drop == ["drop none→10-20"]
    assert robust[drop[0]].tolist() == pytest.approx([0.4, 0.4])
    assert [c for c in robust.columns if c.startswith("Dice ")] == [f"Dice {j}" for j in order]

    paths = write_report(tmp_path / "eval", per_object).paths
    md = paths["summary_md"].read_text()
    assert "drop none→10-20" in md
    assert md.index("Dice 5-10") < md.index("Dice 10-20")
    assert list(pd.read_csv(paths["summary_csv"])["jitter"].astype(str)) == order * 2

    # The merged report (sam-ft-report) shares the sort.
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(
        "model:\n  name: vit_b\nfinetune:\n  name: decoder\ntask:\n  name: liver\n"
    )
    summary.sample(frac=1.0, random_state=0).to_csv(run / "summary.csv", index=False)
    merged = merge_summaries([run])
    assert list(merged["jitter"][merged["finetune"] == "zero_shot"]) == order


def test_2d_images_without_spacing_report_distances_in_pixels(tmp_path):
    """HD95 of 2D images without a spacing is in pixels: every table says px, not mm."""
    rows = [{**_row("zero_shot", "box", 0.8), "distance_unit": "px"}]
    paths = write_report(tmp_path / "px", pd.DataFrame(rows)).paths
    assert pd.read_csv(paths["summary_csv"])["distance_unit"].tolist() == ["px"]
    md = paths["summary_md"].read_text()
    assert "HD95 (px)" in md and "HD95 (mm)" not in md and "HD95 in pixels" in md
    # Volumes stay in mm; a table mixing both keeps the unit beside each row.
    mm = write_report(tmp_path / "mm", pd.DataFrame([_row("zero_shot", "box", 0.8)]))
    assert "HD95 (mm)" in mm.paths["summary_md"].read_text()
    mixed = [rows[0], {**_row("zero_shot", "box", 0.8, task="spleen"), "distance_unit": "mm"}]
    md = write_report(tmp_path / "mixed", pd.DataFrame(mixed)).paths["summary_md"].read_text()
    assert "| px |" in md and "| mm |" in md and "HD95 (mm)" not in md


def test_engine_labels_png_distances_px_and_volumes_mm():
    from sam_ft.data.types import SliceRecord
    from sam_ft.evaluation.protocol.run_case import distance_unit

    def rec(s, spacing):
        m = np.zeros((1, 8, 8), bool)
        return SliceRecord("c", s, np.zeros((8, 8, 3), np.uint8), m, np.array([1]), ["o"], spacing)

    assert distance_unit(rec(-1, (1.0, 1.0))) == "px"
    assert distance_unit(rec(-1, (0.3, 0.3))) == "mm"
    assert distance_unit(rec(4, (1.0, 1.0))) == "mm"


def test_jitter_plot_tells_zero_shot_from_finetuned_by_colour():
    """Two models: each model one colour across its prompts, the two models two colours; the
    prompts of one model differ in line style. One model: the prompts get the colours."""
    from matplotlib.colors import to_hex

    from sam_ft.evaluation.reports.plots import jitter_figure

    rows = [
        {"model": m, "prompt": p, "jitter": j, "dice_mean": d}
        for m, base in (("zero_shot", 0.4), ("finetuned", 0.8))
        for p in ("box", "point1")
        for j, d in (("none", base), ("0-10", base - 0.1))
    ]
    lines = jitter_figure(pd.DataFrame(rows), ["none", "0-10"]).axes[0].get_lines()
    style = {ln.get_label(): (to_hex(ln.get_color()), ln.get_linestyle()) for ln in lines}
    assert style["zero_shot / box"][0] == style["zero_shot / point1"][0]
    assert style["finetuned / box"][0] == style["finetuned / point1"][0]
    assert style["zero_shot / box"][0] != style["finetuned / box"][0]
    assert style["zero_shot / box"][1] != style["zero_shot / point1"][1]
    one = pd.DataFrame([r for r in rows if r["model"] == "finetuned"])
    colours = {to_hex(ln.get_color()) for ln in jitter_figure(one, ["none"]).axes[0].get_lines()}
    assert len(colours) == 2
