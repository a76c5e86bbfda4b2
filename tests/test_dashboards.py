"""Dashboards (issue #19): one W&B run per multirun job with the evaluation in its summary, the
same scalars in TensorBoard, evaluate.py runs, the Optuna search, and when W&B goes online.

Real subprocesses and the real ``wandb`` (offline) and ``tensorboard`` packages. An offline run
of the installed wandb keeps its summary only in its ``.wandb`` file, which is read back with
wandb's own protobuf records (``tests/wandb_records.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from wandb_records import run_info

ROOT = Path(__file__).resolve().parents[1]
QUICK = [
    # The synthetic demo with the tiny model (the default run is LiteMedSAM on MNI152).
    "model=tiny",
    "task=demo",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "train.overlays=1",
    "eval.prompts=[box]",
]
HF_TOKEN = "hf_SECRETtokenQWERTYUIOPasdfghjkl"


def _env(tmp: Path, **changes: str | None) -> dict[str, str]:
    """Offline W&B with every W&B folder in ``tmp`` and no credentials anywhere."""
    env = dict(os.environ, SAM_FT_CACHE=str(tmp.parent / "cache"), OMP_NUM_THREADS="1")
    for key in ("WANDB_API_KEY", "WANDB_BASE_URL"):
        env.pop(key, None)
    (tmp / "home").mkdir(parents=True, exist_ok=True)
    env.update(
        WANDB_MODE="offline",
        WANDB_DIR=str(tmp / "wandb_dir"),
        WANDB_CONFIG_DIR=str(tmp / "wandb_config"),
        WANDB_CACHE_DIR=str(tmp / "wandb_cache"),
        WANDB_DATA_DIR=str(tmp / "wandb_data"),
        NETRC=str(tmp / "home" / ".netrc"),
    )
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(script: str, args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(ROOT / script), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _wandb_file(job_dir: Path) -> Path:
    (run_file,) = job_dir.glob("wandb/offline-run-*/run-*.wandb")
    return run_file


def _eval_scalars(summary: dict) -> dict[str, float]:
    """The evaluation's numbers among the summary's keys (leaving out the media's metadata)."""
    media = ("/plots/", "/overlays/", "_type", "width", "height", "size", "nrows", "ncols")
    return {
        k: v
        for k, v in summary.items()
        if k.startswith("eval/") and isinstance(v, int | float) and not any(m in k for m in media)
    }


# --------------------------------------------------------------------------------------------
# A 2-job multirun with W&B and TensorBoard


# A Hydra callback that writes what each job's task function returned (what a sweeper
# optimises) to <job dir>/returned.json.
RECORD_RETURN = """
import json
from pathlib import Path

from hydra.experimental.callback import Callback


class RecordReturn(Callback):
    def on_job_end(self, config, job_return, **kwargs):
        out = Path(job_return.hydra_cfg.hydra.runtime.output_dir) / "returned.json"
        out.write_text(json.dumps(job_return.return_value))
"""


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("sweep")
    args = [
        "-m",
        "logger=[wandb,tensorboard]",
        "optimizer.lr=1e-4,3e-4",
        "logger.wandb.log_model=true",
        *QUICK,
        "eval.jitter_px=[[0,10]]",
        "eval.clicks=2",
        "eval.overlays=2",
        f"hydra.sweep.dir={tmp / 'multirun'}",
        "+hydra.callbacks.record_return._target_=record_return.RecordReturn",
    ]
    (tmp / "record_return.py").write_text(RECORD_RETURN)
    path = os.pathsep.join(p for p in (str(tmp), os.environ.get("PYTHONPATH")) if p)
    proc = _run("train.py", args, _env(tmp, PYTHONPATH=path))
    (tmp / "stdout.txt").write_text(proc.stdout)
    return tmp / "multirun"


def _jobs(sweep: Path) -> list[Path]:
    return sorted(p for p in sweep.iterdir() if p.is_dir())


def test_multirun_prints_a_line_per_job_and_one_table_at_the_end(sweep):
    """Not a 100-line report per job: each job's box Dice in one line, then the sweep's table."""
    out = (sweep.parent / "stdout.txt").read_text()
    jobs = _jobs(sweep)
    for job in jobs:
        (line,) = [ln for ln in out.splitlines() if ln.startswith(f"{job.name}: box Dice ")]
        assert "finetuned" in line and "zero_shot" in line and line.endswith("summary.md")
    assert "Dice per prompt" not in out  # no job printed its full headline
    table = out[out.index(f"sweep {sweep}") :]
    assert "zero_shot" in table and f"sam-ft-report {sweep}" in table
    assert out.index(f"sweep {sweep}") > max(out.index(f"{j.name}: box Dice") for j in jobs)


def test_multirun_gives_one_finished_wandb_run_per_job(sweep):
    jobs = _jobs(sweep)
    assert len(jobs) == 2
    runs = [run_info(_wandb_file(job)) for job in jobs]
    names = [r["name"] for r in runs]
    assert len(set(names)) == 2, names
    assert names[0].startswith("0_tiny_demo_decoder optimizer.lr=")
    # What both jobs share is not in the name.
    assert all("max_epochs" not in n for n in names)
    assert runs[0]["group"] == runs[1]["group"] != ""
    for job, run in zip(jobs, runs, strict=True):
        assert run["exit_code"] == 0  # finished at the end of its own job
        assert {"tiny", "demo", "decoder"} <= set(run["tags"])
        assert run["job_type"] == "train"
        # Its own config, not the first job's.
        config = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert run["config"]["optimizer"]["lr"] == config["optimizer"]["lr"]
    assert {r["config"]["optimizer"]["lr"] for r in runs} == {1e-4, 3e-4}


def test_run_summary_holds_the_evaluation(sweep):
    for job in _jobs(sweep):
        summary = run_info(_wandb_file(job))["summary"]
        table = pd.read_csv(job / "eval" / "summary.csv", keep_default_na=False)
        for row in table.itertuples():
            for metric in ("dice", "iou", "hd95", "nsd"):
                key = f"eval/{row.model}/{row.prompt}/{row.jitter}/{metric}"
                assert summary[key] == pytest.approx(getattr(row, f"{metric}_mean")), key
        cases = pd.read_csv(job / "eval" / "summary_case.csv", keep_default_na=False)
        case = cases[(cases["model"] == "finetuned") & (cases["jitter"] == "none")].iloc[0]
        assert summary["eval/finetuned/box/none/case_dice"] == pytest.approx(case["dice_mean"])
        delta = summary["eval/finetuned/box/none/dice"] - summary["eval/zero_shot/box/none/dice"]
        assert summary["eval/delta/finetuned/box/none/dice"] == pytest.approx(delta)
        noc = pd.read_csv(job / "eval" / "noc.csv").set_index("model")
        assert summary["eval/finetuned/clicks/noc85"] == pytest.approx(
            noc.at["finetuned", "noc@85"]
        )
        assert 1 <= summary["eval/zero_shot/clicks/noc90"] <= 2
        assert summary["eval/skipped"] == 0
        # Tables, and the overlays as images with toggleable prediction / ground-truth masks.
        for table_key in ("prompt_table", "per_case", "spearman", "click_curve"):
            assert summary[f"eval/{table_key}/_type"] == "table-file"
        best = "eval/overlays/best_finetuned"
        assert summary[f"{best}/count"] == 2
        assert all({"prediction", "ground_truth"} == set(m) for m in summary[f"{best}/all_masks"])
        assert "prompt" in summary[f"{best}/all_boxes"][0]


def test_exported_model_is_a_wandb_artifact(sweep):
    for job in _jobs(sweep):
        artifacts = run_info(_wandb_file(job))["artifacts"]
        models = [a for a in artifacts if a["type"] == "model"]
        assert len(models) == 1
        assert "best" in models[0]["aliases"]
        assert "sam_finetuned.pth" in models[0]["files"]


def test_tensorboard_has_the_same_scalars_and_images(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for job in _jobs(sweep):
        events = EventAccumulator(str(job / "tensorboard"), size_guidance={"images": 0})
        events.Reload()
        tags = events.Tags()
        expected = _eval_scalars(run_info(_wandb_file(job))["summary"])
        assert "eval/finetuned/box/0-10/nsd" in expected
        # The CI bounds and the paired test reach both dashboards with the means (#29).
        assert "eval/finetuned/box/none/dice_ci_low" in expected
        assert "eval/paired/finetuned/box/none/p_value" in expected
        for key, value in expected.items():
            assert events.Scalars(key)[-1].value == pytest.approx(value, rel=1e-5), key
        assert {"train/loss", "val/dice"} <= set(tags["scalars"])
        assert "val/overlays" in tags["images"]
        assert "eval/plots/overlays_best_finetuned" in tags["images"]
        assert any(t.startswith("eval/report") for t in tags["tensors"])  # summary.md as text


def test_train_returns_the_evaluated_box_dice(sweep):
    """What each job's train.py returned to Hydra (recorded by a Hydra callback) is the finetuned
    model's unjittered box Dice in that job's eval/summary.csv."""
    from sam_ft.logging_results import sweep_objective

    for job in _jobs(sweep):
        returned = json.loads((job / "returned.json").read_text())
        table = pd.read_csv(job / "eval" / "summary.csv", keep_default_na=False)
        row = table[
            (table.model == "finetuned") & (table.prompt == "box") & (table.jitter == "none")
        ]
        assert len(row) == 1 and isinstance(returned, float)
        assert returned == pytest.approx(float(row["dice_mean"].iloc[0]), abs=1e-9)
    assert sweep_objective({"val/dice_best": 0.5}) == 0.5  # train.evaluate=false


# --------------------------------------------------------------------------------------------
# evaluate.py


def test_evaluate_runs_log_scrubbed_config_and_differ_by_model(sweep, tmp_path):
    weights = _jobs(sweep)[0] / "sam_finetuned.pth"
    env = _env(tmp_path, HF_TOKEN=HF_TOKEN)
    args = ["-m", "logger=wandb", "eval.prompts=[box]", "eval.jitter_px=[]", "eval.overlays=1"]
    args += ["+extra.token=${oc.env:HF_TOKEN}", f"ckpt_path=null,{weights}"]
    _run("evaluate.py", [*args, f"hydra.sweep.dir={tmp_path / 'eval'}"], env)
    runs = {}
    for job in _jobs(tmp_path / "eval"):
        run_file = _wandb_file(job)
        assert HF_TOKEN.encode() not in run_file.read_bytes()
        info = run_info(run_file)
        runs[info["name"]] = info
    assert {n.split(" ")[0] for n in runs} == {"0_tiny_demo_zero_shot", "1_tiny_demo_finetuned"}
    for name, info in runs.items():
        assert info["job_type"] == "eval" and info["exit_code"] == 0
        assert info["config"]["eval"]["prompts"] == ["box"]  # the resolved config
        assert info["config"]["extra"]["token"] == "***"
        label = "zero_shot" if "zero_shot" in name else "finetuned"
        assert 0 <= info["summary"][f"eval/{label}/box/none/dice"] <= 1


# --------------------------------------------------------------------------------------------
# Optuna


def test_optuna_search_two_trials_reports_best_value(tmp_path):
    sweep_dir = tmp_path / "optuna"
    args = [
        "hparams_search=optuna",
        "hydra.sweeper.n_trials=2",
        *QUICK,
        "eval.jitter_px=[]",
        "eval.overlays=0",
        "train.overlays=0",
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = _run("train.py", args, _env(tmp_path))
    results = yaml.safe_load((sweep_dir / "optimization_results.yaml").read_text())
    assert set(results["best_params"]) == {
        "optimizer.lr",
        "optimizer.weight_decay",
        "finetune",
        "finetune.rank",
    }
    dice = []
    for job in _jobs(sweep_dir):
        table = pd.read_csv(job / "eval" / "summary.csv")
        dice.append(float(table.loc[table["model"] == "finetuned", "dice_mean"].iloc[0]))
    assert len(dice) == 2
    assert results["best_value"] == pytest.approx(max(dice))  # maximised the evaluated Dice
    assert "Best value" in proc.stdout + proc.stderr


# --------------------------------------------------------------------------------------------
# When W&B goes online


def _netrc(path: Path, machine: str) -> None:
    path.write_text(f"machine {machine}\n  login user\n  password {'k' * 40}\n")
    path.chmod(0o600)


@pytest.fixture
def no_credentials(tmp_path, monkeypatch):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_BASE_URL"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / ".netrc"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb_config"))
    return tmp_path / ".netrc"


def test_wandb_mode_offline_without_credentials(no_credentials, caplog):
    from sam_ft.training.wandb import wandb_mode

    assert wandb_mode() == "offline"
    assert "no API key found" in caplog.text


def test_self_hosted_server_netrc_entry_counts_as_credentials(no_credentials, monkeypatch):
    from sam_ft.training.wandb import wandb_mode

    monkeypatch.setenv("WANDB_BASE_URL", "http://wandb.example.internal:8080")
    _netrc(no_credentials, "api.wandb.ai")  # an entry for another server does not count
    assert wandb_mode() == "offline"
    _netrc(no_credentials, "wandb.example.internal:8080")
    assert wandb_mode() == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit mode wins
    assert wandb_mode() == "offline"


def test_api_key_or_wandb_login_netrc_counts_as_credentials(no_credentials, monkeypatch):
    from sam_ft.training.wandb import wandb_mode

    _netrc(no_credentials, "api.wandb.ai")
    assert wandb_mode() == "online"
    no_credentials.unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_mode() == "online"


def test_report_wandb_offline_without_credentials(tmp_path):
    run = tmp_path / "runs" / "run0"
    run.mkdir(parents=True)
    (run / "summary.csv").write_text(
        "model,task,prompt,jitter,n,dice_mean,dice_std,iou_mean,hd95_mean,nsd_mean,hd95_missing\n"
        "zero_shot,demo,box,none,3,0.5,0.1,0.4,9.0,0.3,0\n"
        "finetuned,demo,box,none,3,0.7,0.1,0.6,5.0,0.5,0\n"
    )
    out = tmp_path / "report" / "report.md"
    # A process of its own: wandb's core writes the .wandb file to its end when the process ends.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sam_ft.report",
            str(tmp_path / "runs"),
            "--out",
            str(out),
            "--wandb",
        ],
        cwd=ROOT,
        env=_env(tmp_path, WANDB_MODE=None),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "no API key found" in proc.stderr
    (run_file,) = (out.parent / "wandb").glob("offline-run-*/run-*.wandb")
    info = run_info(run_file)
    assert info["job_type"] == "report" and info["exit_code"] == 0
    assert info["summary"]["report/table/_type"] == "table-file"


# --------------------------------------------------------------------------------------------
# The scalars from hand-made evaluation files


def test_evaluation_scalars_hand_computed(tmp_path):
    from sam_ft.evaluation.reports.summary import write_report
    from sam_ft.logging_results import box_dice, evaluation_scalars

    nan = float("nan")
    objects = {  # (model, task): (dice, hd95) of its two objects
        ("zero_shot", "liver"): ((0.4, 10.0), (0.6, 10.0)),
        ("zero_shot", "spleen"): ((0.7, nan), (0.7, nan)),
        ("finetuned", "liver"): ((0.9, 4.0), (0.9, nan)),
        ("finetuned", "spleen"): ((0.7, 2.0), (0.7, 2.0)),
    }
    rows = [
        {"model": model, "task": task, "case": f"c{i}", "slice": 0, "label": 1, "prompt": "box",
         "jitter": "none", "dice": dice, "iou": dice, "hd95": hd95,
         "hd95_missing": hd95 != hd95, "nsd": dice, "distance_unit": "mm"}
        for (model, task), found in objects.items()
        for i, (dice, hd95) in enumerate(found)
    ]  # fmt: skip
    # NoC: finetuned liver's object reaches Dice 0.85 at click 2 and 0.90 at click 3; each of
    # spleen's three objects at clicks 4 and 5.
    curves = {("liver", 0): (0.5, 0.86, 0.95)}
    curves |= {("spleen", i): (0.5, 0.6, 0.7, 0.87, 0.95) for i in range(3)}
    clicks = pd.DataFrame(
        [
            {"model": "finetuned", "task": task, "case": f"c{i}", "slice": 0, "label": 1,
             "click": k + 1, "dice": d}
            for (task, i), dice in curves.items()
            for k, d in enumerate(dice)
        ]
    )  # fmt: skip
    (tmp_path / "skipped.csv").write_text(
        "case,path,reason,stage,model,task\n"
        "c1,x,bad,evaluate,zero_shot,liver\nc1,x,bad,evaluate,finetuned,liver\n"
    )
    report = write_report(tmp_path, pd.DataFrame(rows), clicks=clicks)
    s = evaluation_scalars(report, tmp_path)
    # Two tasks of 2 objects each: the object-weighted mean.
    assert s["eval/zero_shot/box/none/dice"] == pytest.approx(0.6)
    assert s["eval/finetuned/box/none/dice"] == pytest.approx(0.8)
    assert s["eval/delta/finetuned/box/none/dice"] == pytest.approx(0.2)
    # HD95 over the objects that have one: zero-shot only liver's 2; finetuned (4*1 + 2*2) / 3.
    assert s["eval/zero_shot/box/none/hd95"] == pytest.approx(10)
    assert s["eval/finetuned/box/none/hd95"] == pytest.approx(8 / 3)
    assert s["eval/finetuned/clicks/noc85"] == pytest.approx((2 * 1 + 4 * 3) / 4)
    assert s["eval/finetuned/clicks/noc90"] == pytest.approx((3 * 1 + 5 * 3) / 4)
    assert s["eval/skipped"] == 1  # one case, skipped for both models
    assert not any("case_" in k for k in s)  # no summary_case.csv
    # The box Dice of one task: its summary row's mean, over that task's objects only.
    assert box_dice(report, ["finetuned"], "liver") == {"eval/finetuned/box_dice": 0.9}


def test_run_name_has_own_overrides_but_no_secret(monkeypatch):
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    from sam_ft.training.wandb import job_run_name

    monkeypatch.setenv("HF_TOKEN", HF_TOKEN)
    overrides = [
        "model=tiny",
        "task=demo",
        "optimizer.lr=0.001",
        "logger=wandb",
        f"+extra.note=see{HF_TOKEN}",  # a secret typed literally, under an innocent key
        "+extra.api_token=abc12345",  # under a secret-looking key
    ]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    assert job_run_name("base") == "base"  # outside a Hydra job
    HydraConfig.instance().set_config(cfg)
    try:
        name = job_run_name(cfg.run_name)
    finally:
        HydraConfig.instance().cfg = None
    assert name == "tiny_demo_decoder optimizer.lr=0.001,+extra.note=see***,+extra.api_token=***"
