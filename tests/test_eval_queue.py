"""The evaluation's queue of decoded cases waiting for their scoring is bounded in bytes
(``eval.queue_mb``, at least one case), not only in count (``eval.workers + 1``): a rank on a
16-core node no longer holds 16 whole 2 GB cases. The tables do not depend on the bound."""

from __future__ import annotations

import json
from functools import partial

import numpy as np
import pytest
import torch
from wrapped_sam import wrap_sam

from sam_ft.data.types import SliceRecord
from sam_ft.errors import ConfigError
from sam_ft.evaluation.protocol.cases import LazyCase
from sam_ft.evaluation.protocol.engine import evaluate_models
from sam_ft.evaluation.protocol.options import eval_options
from sam_ft.model.builders import build_sam_architecture

SIZE, SLICES, CASES = 256, 5, 4  # ~1.3 MB of slices per case: above a 1 MiB queue


def _case(name: str, progress, seen: list) -> list[SliceRecord]:
    """A case generated when its turn comes; records how many cases were committed then."""
    seen.append((name, _committed(progress)))
    yy, xx = np.mgrid[:SIZE, :SIZE]
    records = []
    for s in range(SLICES):
        disc = (yy - 128) ** 2 + (xx - 100 - 4 * s) ** 2 < (40 + 3 * s) ** 2
        grey = np.where(disc, 160, 60).astype(np.uint8)
        records.append(
            SliceRecord(
                case=name, slice_index=s, image=np.repeat(grey[..., None], 3, axis=2),
                masks=disc[None], labels=np.array([1]), names=["disc"], num_slices=SLICES,
                image_id=name,
            )
        )  # fmt: skip
    return records


def _committed(progress) -> int:
    if not progress.is_file():
        return 0
    return sum(json.loads(line)["status"] == "done" for line in progress.read_text().splitlines())


def _run(model, out, queue_mb: int) -> list:
    seen: list = []
    progress = out / "progress.jsonl"
    cases = [LazyCase(f"c{i}", partial(_case, f"c{i}", progress, seen)) for i in range(CASES)]
    cfg = {"prompts": ["box"], "jitter_px": [], "overlays": 0, "workers": 2, "queue_mb": queue_mb}
    options = eval_options(cfg)
    evaluate_models({"m": model}, cases, task_name="t", options=options, out_dir=out, seed=0,
                    progress=False, report=False)  # fmt: skip
    return seen


def test_cases_over_the_byte_bound_are_committed_before_the_next_is_started(tmp_path):
    torch.manual_seed(0)
    model = wrap_sam(build_sam_architecture("tiny", image_size=128)).eval()
    seen = _run(model, tmp_path / "bound", queue_mb=1)
    # Case i loads (one ahead) while case i-1 is decoded: every case before i-1 was committed
    # (with only the count bound, up to workers + 1 = 3 could still wait for their scoring).
    for i, (name, committed) in enumerate(seen):
        assert committed >= i - 1, (name, seen)
    _run(model, tmp_path / "count", queue_mb=1024)
    for name in ("per_object.csv", "per_case.csv"):
        assert (tmp_path / "bound" / name).read_bytes() == (tmp_path / "count" / name).read_bytes()


def test_a_pending_case_counts_its_slices_volume_and_predictions():
    from sam_ft.evaluation.protocol.predictions import CasePredictions
    from sam_ft.evaluation.protocol.run_case import PendingCase

    records = _case("c", type("P", (), {"is_file": lambda self: False})(), [])
    store = CasePredictions((SIZE, SIZE))
    for r in records:
        store.add(("box", 1), r.slice_index, r.masks[0])
    case = PendingCase("c", ["m"], records, None, "", {"m": store}, {}, [], None, (True, 5, ()))
    want = sum(r.image.nbytes + r.masks.nbytes + r.labels.nbytes for r in records)
    want += SLICES * SIZE * SIZE // 8  # one packed mask per slice
    assert case.nbytes() == want


def test_queue_mb_is_checked():
    with pytest.raises(ConfigError, match="eval.queue_mb must be an integer >= 1"):
        eval_options({"queue_mb": 0})
