"""Evaluation pipeline (eval.workers): same files as the serial path, a dying worker, resume."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from wrapped_sam import wrap_sam

from sam_ft import bitmask
from sam_ft.data.loading import CaseData
from sam_ft.data.types import SliceRecord
from sam_ft.errors import ConfigError
from sam_ft.evaluation.metrics.object_metrics import batch_slice_metrics
from sam_ft.evaluation.protocol.engine import evaluate_models
from sam_ft.evaluation.protocol.options import eval_options
from sam_ft.evaluation.protocol.scoring_pool import WorkerDiedError, resolve_workers
from sam_ft.model.builders import build_sam_architecture
from sam_ft.model.trainable import TrainableSam

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
H, W = 48, 56
SEED = 3
# S1 on a 4 x 4 grid, S2/S5 at two jitter levels: every kind of row, few decoder calls.
CFG = {
    "prompts": ["everything", "point1", "box"],
    "jitter_px": [[0, 10]],
    "grid": 4,
    "clicks": 2,
    "overlays": 2,
}
TABLES = ("per_object.csv", "per_case.csv", "clicks.csv", "summary.csv")


@pytest.fixture(scope="module")
def model() -> TrainableSam:
    torch.manual_seed(0)
    return wrap_sam(build_sam_architecture("tiny", image_size=128)).eval()


def _records(case: str, slices, modality="CT") -> list[SliceRecord]:
    out = []
    for s in slices:
        rng = np.random.default_rng([sum(map(ord, case)), s])
        yy, xx = np.mgrid[:H, :W]
        disc = (yy - 24) ** 2 + (xx - 20 - 2 * s) ** 2 < (8 + s) ** 2
        rect = (yy > 5) & (yy < 18) & (xx > 34) & (xx < 52)
        masks = np.stack([disc, rect])
        grey = rng.normal(60, 10, (H, W))
        grey[disc] += 80
        grey[rect] += 110
        image = np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)
        out.append(
            SliceRecord(
                case=case,
                slice_index=s,
                image=image,
                masks=masks,
                labels=np.array([1, 2]),
                names=["disc", "rect"],
                spacing=(0.8, 0.7),
                modality=modality,
                raw=grey.astype(np.float32),
                num_slices=4,
                slice_spacing=2.5,
            )
        )
    return out


def _volume_case(case: str) -> CaseData:
    """A 3D case whose full ground truth has a slice (3) that was never prompted."""
    records = _records(case, (0, 1, 2))
    label = np.zeros((4, H, W), dtype=np.uint8)
    for r in records:
        label[r.slice_index][r.masks[1]] = 2
        label[r.slice_index][r.masks[0]] = 1
    label[3, 20:24, 20:25] = 1
    return CaseData(
        case=case,
        image_id=case,
        image_path=f"{case}.nii.gz",
        label_path=f"{case}_label.nii.gz",
        slices=records,
        label_volume=label,
        objects={"disc": [1], "rect": [2]},
        spacing=(2.5, 0.8, 0.7),
        affine=np.eye(4),
        slice_axis=2,
    )


def _cases():
    two_d = _records("img2d", (0,))
    for r in two_d:
        r.slice_index, r.num_slices = -1, 1
    return [_volume_case("vol0"), _records("vol1", (1, 2)), two_d, _volume_case("vol2")]


def _files(d) -> dict[str, bytes]:
    return {n: (d / n).read_bytes() for n in TABLES}


def test_two_workers_equal_the_serial_path_row_for_row(model, tmp_path):
    kw = dict(task_name="t", seed=SEED, progress=False)
    models = {"zero_shot": model, "finetuned": model}
    serial = evaluate_models(
        models, _cases(), options=eval_options({**CFG, "workers": 0}), out_dir=tmp_path / "w0", **kw
    )
    pooled = evaluate_models(
        models, _cases(), options=eval_options({**CFG, "workers": 2}), out_dir=tmp_path / "w2", **kw
    )
    assert _files(tmp_path / "w2") == _files(tmp_path / "w0")
    assert len(serial.per_object) == 2 * (3 + 2 + 1 + 3) * 2 * 5  # models x objects x variants
    assert set(serial.per_case["case"]) == {"vol0", "vol1", "img2d", "vol2"}
    # The overlays (built from the workers' rows) are the same items too.
    for name, items in serial.overlays.items():
        assert [it[-1] for it in pooled.overlays[name]] == [it[-1] for it in items]
        for a, b in zip(items, pooled.overlays[name], strict=True):
            assert np.array_equal(a[2], b[2])


class _DiesWhenUnpickled(str):
    """A modality whose unpickling ends the process: a worker dying on the job it took."""

    def __reduce__(self):
        return os._exit, (3,)


def test_a_dying_worker_is_an_error_naming_the_case_and_resume_completes(model, tmp_path):
    kw = dict(report=False, task_name="t", seed=SEED, progress=False)
    cfg = {**CFG, "clicks": 0, "workers": 2}
    good = [_records("a0", (0,)), _records("a1", (1,))]
    doomed = _records("doomed", (0, 1), modality=_DiesWhenUnpickled("CT"))
    out = tmp_path / "run"
    with pytest.raises(WorkerDiedError, match="case doomed"):
        evaluate_models(
            {"zero_shot": model},
            [*good, doomed, _records("a2", (2,))],
            options=eval_options(cfg),
            out_dir=out,
            **kw,
        )
    # The cases committed before the worker died are saved and marked done (which of a0, a1
    # were still in flight, and lost with it, depends on timing), nothing else.
    marks = [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]
    marks = [(m["case"], m["status"]) for m in marks]
    assert marks == [("a0", "done"), ("a1", "done")][: len(marks)]

    # Rerun after the crash (the bad job replaced): the same files as one uninterrupted run.
    cases = [*good, _records("doomed", (0, 1)), _records("a2", (2,))]
    evaluate_models({"zero_shot": model}, cases, options=eval_options(cfg), out_dir=out, **kw)
    evaluate_models(
        {"zero_shot": model},
        cases,
        options=eval_options({**cfg, "workers": 0}),
        out_dir=tmp_path / "serial",
        **kw,
    )
    for name in ("per_object.csv", "per_case.csv"):
        assert (out / name).read_bytes() == (tmp_path / "serial" / name).read_bytes()


def test_workers_option_is_checked():
    assert eval_options({"workers": 0}).workers == 0
    assert eval_options({}).workers is None  # null: resolved where the pool starts
    assert resolve_workers(None) == max(len(os.sched_getaffinity(0)) - 1, 0)
    for bad in (-1, "two", 1.5):
        with pytest.raises(ConfigError, match="eval.workers"):
            eval_options({"workers": bad})


DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]


def _numpy_dice_iou(preds: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference: the workers' numpy metrics (``batch_slice_metrics``), one GT per mask."""
    scores = batch_slice_metrics(preds, gt, (1.0, 1.0), 2.0, "area")
    return scores["dice"], scores["iou"]


@pytest.mark.parametrize("device", DEVICES)
def test_overlap_scores_on_the_device_equal_the_numpy_metrics(device):
    """Dice / IoU from the device's counts are batch_slice_metrics' float64 numbers bit for bit,
    empty ground truth, empty prediction and both empty included."""
    from sam_ft.evaluation.metrics.overlap import overlap_scores

    rng = np.random.default_rng(7)
    n, h, w = 64, 37, 29  # H * W not a multiple of 8
    density = rng.uniform(0.001, 0.9, (n, 1, 1))
    preds, gt = rng.random((n, h, w)) < density, rng.random((n, h, w)) < density[::-1]
    preds[0], gt[1] = False, False  # empty prediction; empty ground truth
    preds[2], gt[2] = False, False  # both empty
    preds[3] = gt[3]  # identical
    preds[4], gt[4] = np.eye(h, w, dtype=bool), np.eye(h, w, 1, dtype=bool)  # disjoint
    dice, iou = overlap_scores(torch.from_numpy(preds).to(device), torch.from_numpy(gt).to(device))
    assert dice.dtype == iou.dtype == torch.float64 and dice.device.type == device
    ref_dice, ref_iou = _numpy_dice_iou(preds, gt)
    assert np.array_equal(dice.cpu().numpy(), ref_dice)  # exact: the CSVs print repr(float)
    assert np.array_equal(iou.cpu().numpy(), ref_iou)
    assert ref_dice[:5].tolist() == [0.0, 0.0, 1.0, 1.0, 0.0]
    assert len(set(ref_dice[5:].tolist())) > 50  # not a degenerate sample


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["oracle", "predicted_iou", "auto"])
def test_selection_on_the_device_picks_what_select_masks_picks(mode, device):
    """Thresholding and selection stay on the model's device; the same channel as the host's
    ``select_masks`` comes out, ties (an empty GT, identical masks) included, with the kept
    masks' Dice / IoU equal to the numpy metrics'."""
    from sam_ft.evaluation.protocol.decode_select import _select_on_device, select_masks

    rng = np.random.default_rng(1)
    binary = torch.from_numpy(rng.random((6, 3, 5, 7)) < 0.4)
    binary[1, 2] = binary[1, 0]  # equal Dice: the lower channel wins
    binary[3, 1] = False  # an empty prediction
    iou = torch.from_numpy(rng.random((6, 3))).float()
    gt = rng.random((6, 5, 7)) < 0.4
    gt[2] = False
    chosen, index, dice, jaccard = _select_on_device(
        binary.to(device), iou.to(device), torch.from_numpy(gt).to(device), mode
    )
    assert chosen.device.type == index.device.type == dice.device.type == device
    expected, expected_index = select_masks(binary.numpy(), iou, gt, mode)
    assert np.array_equal(index.cpu().numpy(), expected_index)
    assert np.array_equal(chosen.cpu().numpy(), expected)
    ref_dice, ref_iou = _numpy_dice_iou(expected, gt)
    assert np.array_equal(dice.cpu().numpy(), ref_dice)
    assert np.array_equal(jaccard.cpu().numpy(), ref_iou)


def test_decode_scored_packed_equals_unpacked(model):
    from sam_ft.evaluation.protocol.decode_select import decode_scored
    from sam_ft.prompts.strategies import make_eval_prompt

    rec = _records("p", (1,))[0]
    prompts = [
        make_eval_prompt(m, s, None, seed=0, case="p", slice_index=1, label=i + 1)
        for i, m in enumerate(rec.masks)
        for s in ("point1", "box")
    ]
    gt = np.repeat(rec.masks, 2, axis=0)
    with torch.inference_mode():
        emb = model.encode(model.preprocess(rec.image)[None])[0]
        m, index, _, _ = _as_tuple(decode_scored(model, emb, prompts, gt, "oracle", 3))
        p, index_p, _, _ = _as_tuple(
            decode_scored(model, emb, prompts, gt, "oracle", 3, packed=True)
        )
    assert np.array_equal(bitmask.unpack(p, (H, W)), m) and np.array_equal(index, index_p)


@pytest.mark.parametrize("mode", ["oracle", "predicted_iou"])
def test_decode_scored_gives_the_numpy_metrics_with_one_gt_per_object(model, mode):
    """One GT per object on the device (``gt_of``) gives what one GT per prompt gives, and the
    scores are the numpy metrics of the kept masks against their object's GT."""
    from sam_ft.evaluation.protocol.decode_select import decode_scored
    from sam_ft.prompts.strategies import make_eval_prompt

    rec = _records("q", (2,))[0]
    strategies = ("point1", "point5_neg5", "box", "box_point1")
    prompts = [
        make_eval_prompt(m, s, None, seed=0, case="q", slice_index=2, label=i + 1)
        for i, m in enumerate(rec.masks)
        for s in strategies
    ]
    gt_of = np.repeat(np.arange(len(rec.masks)), len(strategies))
    per_prompt = rec.masks[gt_of]
    with torch.inference_mode():
        emb = model.encode(model.preprocess(rec.image)[None])[0]
        sel = decode_scored(model, emb, prompts, rec.masks, mode, 3, gt_of=gt_of, keep_low=False)
        m, index, pred_iou, _ = _as_tuple(decode_scored(model, emb, prompts, per_prompt, mode, 3))
    assert sel.low is None
    assert np.array_equal(sel.masks, m) and np.array_equal(sel.index, index)
    assert np.array_equal(sel.pred_iou, pred_iou)
    ref_dice, ref_iou = _numpy_dice_iou(m, per_prompt)
    assert np.array_equal(sel.dice, ref_dice) and np.array_equal(sel.iou, ref_iou)
    assert ref_dice.min() > 0 and len(set(ref_dice.tolist())) > 1
    # Both selections' Dice are recorded whatever the mode (the IoU-head calibration's gap):
    # they are what the oracle and the predicted-IoU selections keep.
    other = "predicted_iou" if mode == "oracle" else "oracle"
    with torch.inference_mode():
        alt = decode_scored(model, emb, prompts, rec.masks, other, 3, gt_of=gt_of, keep_low=False)
    oracle, head = (sel, alt) if mode == "oracle" else (alt, sel)
    for s in (sel, alt):
        assert np.array_equal(s.dice_oracle, oracle.dice)
        assert np.array_equal(s.dice_top_iou, head.dice)
    assert (oracle.dice >= head.dice).all()
    with pytest.raises(ValueError, match="ground-truth mask each"):
        decode_scored(model, emb, prompts, rec.masks, mode, 3)  # 8 prompts, 2 masks


def test_device_dice_iou_give_the_files_of_the_numpy_metrics(model, tmp_path, monkeypatch):
    """End to end: the CSVs with Dice / IoU from the device equal, byte for byte, those of a
    run whose Dice / IoU are the numpy metrics of the same masks (what the workers computed
    before), Everything mode and the click curve included."""
    from sam_ft.evaluation.protocol import run_case as scoring
    from sam_ft.evaluation.protocol.decode_select import decode_scored

    kw = dict(task_name="t", seed=SEED, progress=False)
    cfg = {**CFG, "workers": 0, "prompts": ["everything", "point1", "point5_neg5", "box"]}
    models = {"zero_shot": model}
    evaluate_models(models, _cases(), options=eval_options(cfg), out_dir=tmp_path / "device", **kw)

    calls = {"decode": 0, "everything": 0}

    def numpy_scored(m, emb, prompts, gt, mode, max_per_call, **opts):
        sel = decode_scored(m, emb, prompts, gt, mode, max_per_call, **opts)
        masks = bitmask.unpack(sel.masks, gt.shape[1:]) if opts.get("packed") else sel.masks
        gt_of = opts.get("gt_of")
        sel.dice, sel.iou = _numpy_dice_iou(masks, gt if gt_of is None else gt[gt_of])
        calls["decode"] += 1
        return sel

    def numpy_overlap(pred, gt):
        calls["everything"] += 1
        return tuple(map(torch.from_numpy, _numpy_dice_iou(pred.numpy(), gt.numpy())))

    monkeypatch.setattr(scoring, "decode_scored", numpy_scored)
    monkeypatch.setattr(scoring, "overlap_scores", numpy_overlap)
    evaluate_models(models, _cases(), options=eval_options(cfg), out_dir=tmp_path / "numpy", **kw)
    assert calls["decode"] > 0 and calls["everything"] > 0
    assert _files(tmp_path / "device") == _files(tmp_path / "numpy")


def test_workers_end_when_the_main_process_is_killed(tmp_path):
    """SIGKILL of the main process (what a resume follows) leaves no worker process behind."""
    import subprocess
    import sys
    import time

    script = (
        "import os, signal\n"
        "from sam_ft.evaluation.protocol.scoring_pool import ScoringPool, default_workers\n"
        "pool = ScoringPool(2)\n"
        "pool.submit(default_workers, None).result()\n"
        "print(' '.join(str(p) for p in pool._executor._processes), flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert proc.returncode == -9, proc.stderr[-2000:]
    pids = [int(p) for p in proc.stdout.split()]
    assert pids

    def alive(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False

    deadline = time.monotonic() + 20
    while any(alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(alive(p) for p in pids)


def test_next_case_loads_in_a_thread_while_this_one_is_evaluated(model, tmp_path):
    """Loading (LazyCase.load) runs one case ahead off the main thread; a finished case is
    never loaded on resume; the files are those of cases given already loaded."""
    import threading

    from sam_ft.evaluation.protocol.cases import LazyCase

    loads: list[tuple[str, str]] = []

    def loader(name: str, slices):
        def load():
            loads.append((name, threading.current_thread().name))
            return _records(name, slices)

        return load

    names = {"l0": (0,), "l1": (1, 2), "l2": (2,)}
    lazy = [LazyCase(n, loader(n, s), f"{n}.nii.gz") for n, s in names.items()]
    kw = dict(report=False, task_name="t", seed=SEED, progress=False)
    cfg = {**CFG, "clicks": 0, "workers": 0}
    evaluate_models(
        {"zero_shot": model}, lazy[:1], options=eval_options(cfg), out_dir=tmp_path / "lazy", **kw
    )
    loads.clear()
    evaluate_models(
        {"zero_shot": model}, lazy, options=eval_options(cfg), out_dir=tmp_path / "lazy", **kw
    )  # l0 is done: not loaded
    assert [n for n, _ in loads] == ["l1", "l2"]
    assert all(t.startswith("eval-load") for _, t in loads)
    loaded = [_records(n, s) for n, s in names.items()]
    evaluate_models(
        {"zero_shot": model}, loaded, options=eval_options(cfg), out_dir=tmp_path / "ready", **kw
    )
    for name in ("per_object.csv", "per_case.csv"):
        assert (tmp_path / "lazy" / name).read_bytes() == (tmp_path / "ready" / name).read_bytes()


def _as_tuple(sel) -> tuple:
    """(masks, chosen channel, predicted IoU, low-res logits) of a ``decode_scored`` result."""
    return sel.masks, sel.index, sel.pred_iou, sel.low
