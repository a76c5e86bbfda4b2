"""Run by test_memory.py in a fresh process: evaluate task folders, print peak memory as JSON.

Usage: ``python _evaluate_big.py JOBS_JSON`` with a list of ``{"root", "out", "cfg"}``. Each job
resets the kernel's peak-RSS counter first (``/proc/self/clear_refs``), so its ``peak_bytes``
covers that evaluation alone, and one interpreter start serves every job.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from sam_ft.data.folder import find_cases
from sam_ft.data.tasks import data_options, task_options
from sam_ft.evaluation.protocol.cases import lazy_cases
from sam_ft.evaluation.protocol.engine import evaluate_models
from sam_ft.evaluation.protocol.options import eval_options
from sam_ft.model.builders import build_sam_architecture
from sam_ft.model.trainable import TrainableSam

TASK = task_options({"modality": "CT", "intensity": {"mode": "window", "level": 40, "width": 400}})


def _status(field: str) -> int:
    """``VmRSS`` / ``VmHWM`` (peak RSS) of this process in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def run(model: TrainableSam, job: dict) -> dict:
    upsampled = [0]
    postprocess = model.postprocess

    def recording_postprocess(low, size):
        out = postprocess(low, size)
        upsampled[0] = max(upsampled[0], out.numel() * out.element_size())
        return out

    model.postprocess = recording_postprocess  # the largest full-size logits held at once
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status("VmRSS")
    t0 = time.perf_counter()
    result = evaluate_models(
        {"zero_shot": model},
        lazy_cases(find_cases(job["root"], TASK), TASK, data_options(None)),
        report=False,
        task_name="big",
        options=eval_options(job["cfg"]),
        out_dir=job["out"],
        seed=0,
        progress=False,
    )
    return {
        "extra_bytes": _status("VmHWM") - before,
        "max_upsample_bytes": upsampled[0],
        "prompts": sorted(set(result.per_object["prompt"])),
        "slices": sorted(set(result.per_object["slice"])),
        "per_case_rows": len(result.per_case),
        "seconds": time.perf_counter() - t0,
    }


def main(jobs_json: str) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    # tiny at a 128 input: the encoder and decoder are cheap; the memory at stake is the
    # full-resolution masks and volumes, which do not depend on the input size.
    sam = build_sam_architecture("tiny", image_size=128)
    # conf/model/tiny.yaml's settings
    model = TrainableSam(
        sam, "sam", grad_checkpointing=False, encoder_bf16=True, multimask_output=True
    ).eval()
    print(json.dumps([run(model, job) for job in json.loads(jobs_json)]))


if __name__ == "__main__":
    main(sys.argv[1])
