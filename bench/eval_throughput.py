"""Evaluation cost of the study's protocol vs one encoder pass per image.

The product's ``sam_ft.evaluation.engine.evaluate`` runs S2-S6 (point1, point5, point5_neg5, box,
box_point1) at no jitter and three jitter levels (0-10, 10-20, 20-30 px): 20 prompts per object,
oracle mask selection, Dice / IoU / HD95 / NSD per slice and per case, the CSVs and overlays.
The reference is the image encoder alone on the same images (preprocess + ``encode``), timed just
before and just after the evaluation and averaged, so a machine that slows down or speeds up
during the run (a shared host) moves both sides alike; one untimed encoder pass comes first, so
neither side pays the first call's one-off costs. Everything the engine adds is prompt work; a
ratio of 1.0 would hide all of it behind the one encoder pass.
Where the extra time goes is measured by wrapping the engine's calls (table 2).

    python bench/eval_throughput.py --model vit_b --images 2

Last line: ``eval_cost_vs_encoder=<evaluation s / encoder-only s>``.
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP. On a shared machine spinning worker threads made the decoder's
# small ops 3-5x slower whenever another process held a core; sleeping ones cost ~nothing.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import functools
import tempfile
import time
from pathlib import Path

import torch

# bench/ is on sys.path when a bench runs as a script.
from _common import (
    compose,
    final_line,
    machine,
    make_datamodule,
    parse_slice_bench,
    print_table,
    slice_bench_parser,
    write_ct_task,
)
from hydra.utils import instantiate

S2_S6 = "[point1,point5,point5_neg5,box,box_point1]"


def _wrap(owner, name: str, totals: dict[str, float], label: str) -> None:
    """Replace ``owner.name`` by a version that adds its wall time to ``totals[label]``."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            totals[label] = totals.get(label, 0.0) + time.perf_counter() - t0

    setattr(owner, name, timed)


def _instrument(model, totals: dict[str, float]) -> None:
    """Time the engine's parts: encoder, decoder, upsampling, selection, metrics, prompts."""
    from sam_ft.evaluation import engine, selection

    _wrap(model, "encode", totals, "encoder")
    _wrap(model, "decode", totals, "mask decoder (all prompts)")
    _wrap(model, "postprocess", totals, "upsample logits to original size")
    _wrap(selection, "select_masks", totals, "oracle mask selection")
    _wrap(engine, "make_eval_prompt", totals, "prompt generation + jitter")
    _wrap(engine, "batch_slice_metrics", totals, "2D metrics (Dice, IoU, HD95, NSD)")
    _wrap(engine, "object_attributes", totals, "object attributes")
    _wrap(engine, "_per_case_rows", totals, "3D per-case metrics")
    _wrap(engine, "_commit_case", totals, "CSV writes")


def main(argv: list[str] | None = None) -> float:
    p = slice_bench_parser(__doc__, 2, "slices evaluated")
    args, threads = parse_slice_bench(p, argv)

    from sam_ft.evaluation.engine import evaluate

    tmp = Path(tempfile.mkdtemp(prefix="bench_eval_"))
    splits = write_ct_task(tmp / "task", args.images, args.size)
    cfg = compose(args.model, tmp / "task", splits, tmp / "cache", [f"eval.prompts={S2_S6}"])
    model = instantiate(cfg.model).eval()
    dm = make_datamodule(cfg, model, tmp / "run")
    dm.prepare_split("train")
    cases = list(dm.iter_case_data("train"))  # the bench's few slices, held for the reference
    records = [r for c in cases for r in c.slices]
    objects = sum(len(r.masks) for r in records)

    def encoder_only() -> float:
        """The reference: the encoder alone, once per image, as the engine calls it."""
        start = time.perf_counter()
        with torch.inference_mode():
            for rec in records:
                model.encode(model.preprocess(rec.image)[None])
        return time.perf_counter() - start

    with torch.inference_mode():  # untimed: first-call costs (allocations, kernel choice)
        model.encode(model.preprocess(records[0].image)[None])
    t_before = encoder_only()
    totals: dict[str, float] = {}
    _instrument(model, totals)
    t0 = time.perf_counter()
    result = evaluate(
        model,
        cases,
        model_name="bench",
        task_name="bench",
        cfg=cfg.eval,
        out_dir=tmp / "eval",
        seed=0,
        progress=not args.quick,
    )
    t_eval = time.perf_counter() - t0
    prompts = len(result.per_object)
    totals = dict(totals)  # the encoder-only pass below is timed on its own
    t_after = encoder_only()
    t_encoder = (t_before + t_after) / 2
    ratio = t_eval / t_encoder

    n = len(records)
    print(f"machine: {machine()} (threads={threads})")
    print(
        f"data: {n} synthetic CT slices {args.size}x{args.size} in {len(cases)} case(s), "
        f"{objects} objects, model {args.model} (random weights); S2-S6 x 4 jitter levels "
        f"(none, 0-10, 10-20, 20-30 px) = {prompts} scored prompts, oracle selection"
    )
    print_table(
        "evaluation vs encoder alone",
        ["run", "total s", "s / image", "x encoder"],
        [
            ["encoder alone, before evaluate()", t_before, t_before / n, t_before / t_encoder],
            ["encoder alone, after evaluate()", t_after, t_after / n, t_after / t_encoder],
            ["encoder alone, mean (the reference)", t_encoder, t_encoder / n, 1.0],
            ["evaluate(): S2-S6, 3 jitter levels", t_eval, t_eval / n, ratio],
        ],
    )
    parts = sorted(totals.items(), key=lambda kv: -kv[1])
    rows = [[k, v, v / n, v / t_encoder] for k, v in parts]
    listed = sum(v for k, v in totals.items() if k != "encoder")
    rest = t_eval - totals.get("encoder", 0.0) - listed
    rows.append(["rest (records, rows, overlays, bookkeeping)", rest, rest / n, rest / t_encoder])
    print_table("where evaluate() spends its time", ["part", "s", "s / image", "x encoder"], rows)
    final_line("eval_cost_vs_encoder", ratio)
    return ratio


if __name__ == "__main__":
    main()
