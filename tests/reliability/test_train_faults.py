"""Training under faults: SIGKILL then resume, SIGTERM, non-finite losses and weights.

The runs are real ``train.py`` processes on the demo task with the tiny model; faults come from
``_faults.py`` callbacks or from the configuration (a learning rate that overflows the weights).
"""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest
import torch
from _train_run import run_train  # tests/reliability/_train_run.py

ROOT = Path(__file__).resolve().parents[2]
EPOCHS, BATCHES = 2, 4
SHORT = [
    # The synthetic demo with the tiny model (the default run is LiteMedSAM on MNI152).
    "model=tiny",
    "task=demo",
    f"trainer.max_epochs={EPOCHS}",
    f"trainer.limit_train_batches={BATCHES}",
    "trainer.limit_val_batches=2",
    "trainer.log_every_n_steps=1",
    "train.evaluate=false",
    "train.overlays=0",
    "callbacks.step_checkpoint.every_n_train_steps=1",
]


def train(run_dir: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    return run_train([*SHORT, *overrides], run_dir, cache, timeout=600)


def fault(step: int, signum: int, when: str = "end") -> list[str]:
    return [
        "+callbacks.fault._target_=_faults.SignalAtStep",
        f"+callbacks.fault.step={step}",
        f"+callbacks.fault.signum={int(signum)}",
        f"+callbacks.fault.when={when}",
    ]


def _last_val_dice(run_dir: Path) -> float:
    """The last ``val/dice`` in the run dir's CSV log (written by the last, resumed, process)."""
    import pandas as pd

    return float(pd.read_csv(run_dir / "csv" / "metrics.csv")["val/dice"].dropna().iloc[-1])


def last_checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, cache) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    proc = train(run_dir, cache)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


# (kill step, when, the step the resume starts from); 4 steps per epoch, validation after each.
KILLS = [
    (2, "end", 1),  # mid-epoch 1, before any validation, before step 2's checkpoint
    (6, "end", 5),  # mid-epoch 2, after the first validation (best-Dice state in the checkpoint)
    (7, "start", 7),  # right after a step checkpoint, before the next batch
]


def test_sigkill_resume_equals_uninterrupted(tmp_path, cache, uninterrupted):
    # One run dir killed at each point in turn, resumed each time: it must end exactly like the
    # uninterrupted run. A wrong resume at any point leaves its mark on the final weights.
    for i, (step, when, resumes_from) in enumerate(KILLS):
        resume = ["ckpt_path=last"] if i else []
        killed = train(tmp_path, cache, *resume, *fault(step, signal.SIGKILL, when))
        assert killed.returncode == -signal.SIGKILL, (step, when, killed.stderr[-3000:])
        state = last_checkpoint(tmp_path)
        assert state["global_step"] == resumes_from, (step, when)
        has_best = any(
            v.get("best_model_score") is not None
            for k, v in state["callbacks"].items()
            if "val/dice" in k
        )
        assert has_best == (resumes_from >= BATCHES), (step, when)

    resumed = train(tmp_path, cache, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    want, got = last_checkpoint(uninterrupted), last_checkpoint(tmp_path)
    assert got["global_step"] == want["global_step"] == EPOCHS * BATCHES
    assert got["epoch"] == want["epoch"]
    assert want["state_dict"].keys() == got["state_dict"].keys()
    for key, value in want["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][key], value, atol=1e-6, rtol=0, msg=key)
    best = next(v for k, v in want["callbacks"].items() if "val/dice" in k)
    best_got = next(v for k, v in got["callbacks"].items() if "val/dice" in k)
    # The best-by-val/dice state that picks the exported checkpoint. (Not `current_score`: Lightning
    # does not restore it, it is only the last top-k score this process saw.)
    torch.testing.assert_close(
        best_got["best_model_score"], best["best_model_score"], atol=1e-6, rtol=0
    )
    assert Path(best_got["best_model_path"]).name == Path(best["best_model_path"]).name
    scores = {Path(k).name: float(v) for k, v in best["best_k_models"].items()}
    assert {Path(k).name: float(v) for k, v in best_got["best_k_models"].items()} == scores
    # The last validation (after the final kill's resume) scores the same as uninterrupted.
    assert _last_val_dice(tmp_path) == pytest.approx(_last_val_dice(uninterrupted), abs=1e-6)
    exported = torch.load(tmp_path / "sam_finetuned.pth", weights_only=True)
    reference = torch.load(uninterrupted / "sam_finetuned.pth", weights_only=True)
    for key, value in reference.items():
        torch.testing.assert_close(exported[key], value, atol=1e-6, rtol=0, msg=key)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["TERM", "USR1"])
def test_sigterm_saves_checkpoint_and_exits_nonzero(tmp_path, cache, signum):
    stopped = train(tmp_path, cache, *fault(3, signum))
    assert stopped.returncode == 1, stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr
    assert "stopped by signal 15" in stopped.stderr
    assert "ckpt_path=last" in stopped.stderr  # says how to resume
    assert last_checkpoint(tmp_path)["global_step"] >= 3
    assert not (tmp_path / "sam_finetuned.pth").exists()


def _all_finite(path: Path) -> bool:
    """Whether every model weight in a Lightning checkpoint is finite."""
    state = torch.load(path, weights_only=True)["state_dict"]
    return all(v.isfinite().all() for k, v in state.items() if k.startswith("model."))


def test_nonfinite_loss_skipped_then_stops(tmp_path, cache):
    nan_from_step_3 = ["loss._target_=_faults.NanLossFrom", "+loss.first_nan=3"]
    proc = train(tmp_path, cache, *nan_from_step_3, "train.max_nonfinite_steps=3")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "3 steps in a row had a non-finite loss" in proc.stderr
    assert "last batch: cases demo_" in proc.stderr  # names the cases to look at
    assert "Traceback" not in proc.stderr
    assert (proc.stdout + proc.stderr).count("step skipped") == 3
    # Lightning counts a skipped step as a step; the checkpoint before the stop is finite.
    assert last_checkpoint(tmp_path)["global_step"] == 4
    assert _all_finite(tmp_path / "checkpoints" / "last.ckpt")
    assert not (tmp_path / "sam_finetuned.pth").exists()


def test_nonfinite_model_never_exported(tmp_path, cache):
    proc = train(tmp_path, cache, "optimizer.lr=inf")
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "the weights became non-finite at step 1" in proc.stderr
    assert not (tmp_path / "sam_finetuned.pth").exists()
    for ckpt in (tmp_path / "checkpoints").glob("*.ckpt"):
        assert _all_finite(ckpt), ckpt


def test_gradient_verdict_rule():
    from sam_ft.training.module import gradient_verdict

    assert gradient_verdict(grads_finite=True, scaled=False) == "ok"
    assert gradient_verdict(grads_finite=True, scaled=True) == "ok"
    # GradScaler skips an overflowing step and lowers its scale: not an error.
    assert gradient_verdict(grads_finite=False, scaled=True) == "overflow"
    assert gradient_verdict(grads_finite=False, scaled=False) == "nonfinite"


def test_fp16_overflow_steps_are_counted_apart_and_never_stop_the_run(tmp_path, cache):
    # A real GradScaler on CPU: from 2**60, scaled by 2**-10 per overflow, the first steps overflow
    # fp16 (as after a loss spike). Before, 3 of them in a row stopped the run.
    start = [
        "+callbacks.fault._target_=_faults.Fp16WithScaler",
        "+callbacks.fault.init_scale=1.152921504606847e18",
        "+callbacks.fault.backoff_factor=0.0009765625",
        "train.max_nonfinite_steps=3",
    ]
    proc = train(tmp_path, cache, *start)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = last_checkpoint(tmp_path)
    assert state["sam_ft"]["overflow_steps"] >= 3, state["sam_ft"]
    assert state["sam_ft"]["nonfinite_steps"] == 0
    assert state["global_step"] == EPOCHS * BATCHES
    assert _all_finite(tmp_path / "checkpoints" / "last.ckpt")
    assert (tmp_path / "sam_finetuned.pth").exists()


def test_loggers_continue_the_run_they_resume(tmp_path, cache):
    import pandas as pd

    loggers = "logger=[csv,tensorboard,wandb]"
    killed = train(tmp_path, cache, loggers, *fault(6, signal.SIGKILL))
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    resumed = train(tmp_path, cache, loggers, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # The CSV keeps the killed process's rows (Lightning's CSVLogger deleted them) and the
    # resumed one's, under one header.
    steps = pd.read_csv(tmp_path / "csv" / "metrics.csv")["step"]
    assert steps.min() == 0 and steps.max() == EPOCHS * BATCHES - 1
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    # Both processes logged to one W&B run: two offline segments of the same run id.
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({r.name.rsplit("-", 1)[1] for r in runs}) == 1, runs


def test_logger_none_trains(tmp_path, cache):
    proc = train(tmp_path, cache, "logger=none", "trainer.max_epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "sam_finetuned.pth").is_file()
    assert not (tmp_path / "csv").exists()
