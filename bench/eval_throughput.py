"""Evaluation cost of the study's protocol vs one encoder pass per image.

The product's ``sam_ft.evaluation.protocol.engine.evaluate_models`` runs S2-S6 (point1, point5,
point5_neg5, box, box_point1) at no jitter and three jitter levels (0-10, 10-20, 20-30 px): 20
prompts per object, oracle mask selection, Dice / IoU / HD95 / NSD per slice and per case, the
CSVs and overlays.
The reference is the image encoder alone on the same images (preprocess + ``encode``), timed just
before and just after the evaluation and averaged, so a machine that slows down or speeds up
during the run (a shared host) moves both sides alike; one untimed encoder pass comes first, so
neither side pays the first call's one-off costs. Everything the engine adds is prompt work; a
ratio of 1.0 would hide all of it behind the one encoder pass.
Where the extra time goes is measured by wrapping the engine's calls (table 2).

    python bench/eval_throughput.py --model vit_b --images 2

Last line: ``eval_cost_vs_encoder=<evaluation s / encoder-only s>``.

``--pipeline`` measures the evaluation pipeline instead (``eval.workers``, issue #20): the tiny
model (a cheap encoder, a stand-in for a GPU's) runs the same protocol with ``eval.workers`` =
0 (all in the main process), 1 and 2, and reports images/s, the main process's CPU time per
image outside the encoder (what stays on the accelerator's critical path) and the encoder alone's
images/s. The files of all runs must be identical. The main process uses one thread (the
workers take the rest).

    python bench/eval_throughput.py --pipeline --images 16 --size 256

Last line: ``eval_pipeline_speedup=<images/s with 2 workers / images/s with 0>``; with
``--workers`` not holding 0 and 2 (e.g. ``--model vit_b --device cuda --workers auto``, see
``bench/gpu.sh``): ``eval_vs_encoder_rate=<images/s of the last value / encoder alone's>``.
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
    set_threads,
    slice_bench_parser,
    write_ct_task,
)
from hydra.utils import instantiate
from omegaconf import OmegaConf

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
    """Time the engine's parts: encoder, decoder, upsampling, selection, metrics, prompts
    (in this process: the breakdown runs with ``eval.workers=0``)."""
    from sam_ft.evaluation.protocol import decode_select, engine, run_case, scoring_pool

    _wrap(model, "encode", totals, "encoder")
    _wrap(model, "decode", totals, "mask decoder (all prompts)")
    _wrap(model, "postprocess", totals, "upsample logits to original size")
    _wrap(decode_select, "_select_on_device", totals, "oracle mask selection")
    _wrap(scoring_pool, "make_eval_prompt", totals, "prompt generation + jitter")
    _wrap(scoring_pool, "batch_slice_metrics", totals, "2D metrics (Dice, IoU, HD95, NSD)")
    _wrap(scoring_pool, "object_attributes", totals, "object attributes")
    _wrap(run_case, "score_case", totals, "3D per-case metrics")
    _wrap(engine, "_commit_case", totals, "CSV writes")


def _worker_counts(text: str) -> list[int | None]:
    """``--workers 0,1,2`` -> [0, 1, 2]; ``auto`` -> None (eval.workers' default)."""
    return [None if w.strip() == "auto" else int(w) for w in text.split(",")]


def pipeline(args, threads: int) -> float:
    """images/s of the full protocol for each ``--workers`` value, and of the encoder alone."""
    from sam_ft.evaluation.protocol.engine import evaluate_models
    from sam_ft.evaluation.protocol.options import eval_options
    from sam_ft.evaluation.protocol.scoring_pool import (
        ScoringPool,
        default_workers,
        resolve_workers,
    )

    device = torch.device(args.device)
    tmp = Path(tempfile.mkdtemp(prefix="bench_pipeline_"))
    splits = write_ct_task(tmp / "task", args.images, args.size)
    cfg = compose(args.model, tmp / "task", splits, tmp / "cache", [f"eval.prompts={S2_S6}"])
    model = instantiate(cfg.model).eval().to(device)
    dm = make_datamodule(cfg, model, tmp / "run")
    dm.prepare_split("train")
    cases = list(dm.iter_case_data("train"))
    records = [r for c in cases for r in c.slices]
    n = len(records)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    encoder_cpu = {"s": 0.0}
    encode = model.encode

    def timed_encode(*a, **kw):
        t0 = time.process_time()
        try:
            return encode(*a, **kw)
        finally:
            encoder_cpu["s"] += time.process_time() - t0

    def encoder_only() -> float:
        """The reference: the encoder alone, once per image, as the engine calls it."""
        sync()
        start = time.perf_counter()
        with torch.inference_mode():
            for rec in records:
                encode(model.preprocess(rec.image)[None].to(device))
        sync()
        return time.perf_counter() - start

    model.encode = timed_encode
    with torch.inference_mode():  # untimed: first-call costs
        encode(model.preprocess(records[0].image)[None].to(device))
    # Untimed: the pool's forkserver imports torch/MONAI once per process (seconds); the
    # workers each run starts are forked from it (milliseconds, timed).
    with ScoringPool(1) as pool:
        pool.submit(default_workers, None).result()
    t_before = encoder_only()
    rows, rates, files = [], {}, {}
    for workers in _worker_counts(args.workers):
        count = resolve_workers(workers)
        encoder_cpu["s"] = 0.0
        out = tmp / f"eval_w{count}"
        eval_cfg = {**OmegaConf.to_container(cfg.eval, resolve=True), "workers": workers}
        wall0, cpu0 = time.perf_counter(), time.process_time()
        evaluate_models(
            {"bench": model},
            cases,
            report=False,
            task_name="bench",
            options=eval_options(eval_cfg),
            out_dir=out,
            seed=0,
            progress=False,
        )
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        rates[count] = n / wall
        files[count] = [(out / f).read_bytes() for f in ("per_object.csv", "per_case.csv")]
        outside = (cpu - encoder_cpu["s"]) / n
        rows.append([f"eval.workers={count}", wall, rates[count], outside, encoder_cpu["s"] / n])
    t_encoder = (t_before + encoder_only()) / 2
    rows.append(["encoder alone (mean before/after)", t_encoder, n / t_encoder, "", ""])
    if len({tuple(f) for f in files.values()}) > 1:
        raise SystemExit("the CSVs differ between eval.workers values")
    print(f"machine: {machine()} (main threads={threads}, load average {os.getloadavg()})")
    print(
        f"data: {n} synthetic CT slices {args.size}x{args.size} in {len(cases)} case(s), "
        f"model {args.model} (random weights) on {device}; S2-S6 x 4 jitter levels, oracle "
        "selection; identical CSVs"
    )
    print_table(
        "evaluation pipeline: eval.workers",
        [
            "run",
            "total s",
            "images / s",
            "main CPU s / image outside encoder",
            "encoder CPU s / image",
        ],
        rows,
    )
    if 0 in rates and 2 in rates:
        final_line("eval_pipeline_speedup", rates[2] / rates[0])
        return rates[2] / rates[0]
    last = rates[resolve_workers(_worker_counts(args.workers)[-1])]
    final_line("eval_vs_encoder_rate", last / (n / t_encoder))
    return last / (n / t_encoder)


def main(argv: list[str] | None = None) -> float:
    p = slice_bench_parser(__doc__, 2, "slices evaluated")
    p.set_defaults(model=None)  # vit_b; tiny with --pipeline
    p.add_argument("--pipeline", action="store_true", help="images/s per eval.workers value")
    p.add_argument("--workers", default="0,1,2", help="--pipeline: eval.workers values (auto)")
    p.add_argument("--device", default="cpu", help="--pipeline: the model's device (cuda)")
    args, threads = parse_slice_bench(p, argv)
    if args.pipeline:
        args.model = args.model or "tiny"
        if args.threads is None:
            threads = set_threads(1)
        return pipeline(args, threads)
    args.model = args.model or "vit_b"

    from sam_ft.evaluation.protocol.engine import evaluate_models
    from sam_ft.evaluation.protocol.options import eval_options

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
    # The serial path (eval.workers=0): every part runs, and is timed, in this process.
    serial = {**OmegaConf.to_container(cfg.eval, resolve=True), "workers": 0}
    result = evaluate_models(
        {"bench": model},
        cases,
        report=False,
        task_name="bench",
        options=eval_options(serial),
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
            [
                "encoder alone, before evaluate_models()",
                t_before,
                t_before / n,
                t_before / t_encoder,
            ],
            ["encoder alone, after evaluate_models()", t_after, t_after / n, t_after / t_encoder],
            ["encoder alone, mean (the reference)", t_encoder, t_encoder / n, 1.0],
            ["evaluate_models(): S2-S6, 3 jitter levels", t_eval, t_eval / n, ratio],
        ],
    )
    parts = sorted(totals.items(), key=lambda kv: -kv[1])
    rows = [[k, v, v / n, v / t_encoder] for k, v in parts]
    listed = sum(v for k, v in totals.items() if k != "encoder")
    rest = t_eval - totals.get("encoder", 0.0) - listed
    rows.append(["rest (records, rows, overlays, bookkeeping)", rest, rest / n, rest / t_encoder])
    print_table(
        "where evaluate_models() spends its time", ["part", "s", "s / image", "x encoder"], rows
    )
    final_line("eval_cost_vs_encoder", ratio)
    return ratio


if __name__ == "__main__":
    main()
