"""What the commands print when they finish, for people reading a terminal or a SLURM log: plain
text that never wraps (Markdown stays in the files), one block per run, one line per job of a
multirun and one table for the whole sweep at its end (``PrintSweepSummary``)."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback


def in_multirun() -> bool:
    """True inside a job of a Hydra multirun (``-m``: a sweep, Optuna, SLURM jobs)."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    except Exception:
        return False


def job_line(eval_dir: Path, name: str) -> str:
    """``<job>: finetuned box Dice 0.557 [0.544, 0.571], zero_shot 0.113 [...]; <summary.md>``:
    a multirun job's result in one line (the box prompt without jitter, the study's headline)."""
    import pandas as pd

    from sam_ft.evaluation.reports.summary_tables import ci_cells

    summary = pd.read_csv(eval_dir / "summary.csv", dtype={"jitter": str, "prompt": str})
    rows = summary[(summary["prompt"] == "box") & (summary["jitter"] == "none")]
    if rows.empty:  # no box prompt evaluated: the first prompt without jitter
        rows = summary[summary["jitter"] == "none"]
        rows = rows[rows["prompt"] == rows["prompt"].iloc[0]] if not rows.empty else rows
    if "dice_ci_low" in rows:
        cells = ci_cells(rows, "dice")
    else:
        cells = [f"{v:.3f}" for v in rows["dice_mean"]]
    models = sorted(zip(rows["model"], cells, strict=True), key=lambda mc: mc[0] == "zero_shot")
    prompt = rows["prompt"].iloc[0] if not rows.empty else "?"
    scores = ", ".join(f"{m} {c}" for m, c in models)
    return f"{name}: {prompt} Dice {scores}; {eval_dir / 'summary.md'}"


def print_evaluation(eval_dir: Path, name: str) -> None:
    """The run's headline (``summary.txt``), or its one line inside a multirun."""
    if not (eval_dir / "summary.csv").is_file():
        return
    if in_multirun():
        print(job_line(eval_dir, name), flush=True)
        return
    text = (eval_dir / "summary.txt").read_text()
    print(text.replace("summary.md", str(eval_dir / "summary.md")), end="", flush=True)


class PrintSweepSummary(Callback):
    """Hydra callback: when a multirun ends, one table of every job's results (``sam-ft-report``
    merges them; the full report is one command away)."""

    def on_multirun_end(self, config, **kwargs) -> None:
        from sam_ft.errors import SamFtError
        from sam_ft.evaluation.reports.summary_tables import to_text
        from sam_ft.report import dice_overview, merge_summaries

        sweep_dir = Path(str(config.hydra.sweep.dir))
        try:
            merged = merge_summaries([sweep_dir])
        except (SamFtError, ValueError):  # no job wrote a summary (e.g. train.evaluate=false)
            return
        print(f"\nsweep {sweep_dir}: Dice per job, no jitter (zero-shot difference in brackets)")
        print(to_text(dice_overview(merged)), end="")
        print(f"full report: sam-ft-report {sweep_dir}", flush=True)
