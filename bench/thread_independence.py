"""Cost of thread-independent CPU evaluation (issue #28, ``sam_ft/reproducible.py``): the image
encoder and a mask decoder call (3 masks, one box) of ``--model`` at its input size, before (MKL
in its default mode, oneDNN convolutions) and after (MKL strict CNR mode, PyTorch's own
convolutions), with each thread count of ``--threads``; whether the outputs are the same bits for
every thread count.

Each (mode, threads) runs in its own subprocess (MKL's mode is fixed at its first call): random
weights, seeded input, ``--repeats`` timed forwards after one warm-up, the median reported.

    python bench/thread_independence.py --model vit_b --threads 1,2

Last line: ``cost_after_vs_before=<median time after / before, at the largest thread count>``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import hashlib, json, statistics, sys, time
import torch

mode, name, threads, repeats = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
if mode == "before":
    torch.ones(64, 64) @ torch.ones(64, 64)  # MKL starts in its default mode: sam_ft comes late
from sam_ft.model.builders import build_sam
from sam_ft.reproducible import mkl_is_strict, thread_independent

torch.set_num_threads(threads)
torch.manual_seed(0)
sam = build_sam(name, None).eval()
size = sam.image_encoder.img_size
x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
box = torch.tensor([[size * 0.2, size * 0.3, size * 0.6, size * 0.7]])


def forward():
    emb = sam.image_encoder(x)
    sparse, dense = sam.prompt_encoder(points=None, boxes=box, masks=None)
    low, iou = sam.mask_decoder(
        image_embeddings=emb, image_pe=sam.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=True,
    )
    return emb, low, iou


with torch.inference_mode():
    context = thread_independent() if mode == "after" else torch.backends.mkldnn.flags(True)
    with context:
        outs = forward()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            forward()
            times.append(time.perf_counter() - t0)
digest = hashlib.sha256(b"".join(t.numpy().tobytes() for t in outs)).hexdigest()[:12]
print(json.dumps({"seconds": statistics.median(times), "digest": digest,
                  "strict": mkl_is_strict()}))
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b")
    p.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="the tiny model, 1 repeat")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.repeats = "tiny", 1
    threads = [int(t) for t in args.threads.split(",")]
    results: dict[tuple[str, int], dict] = {}
    print("| mode | threads | MKL strict | forward (s) | output digest |\n|---|---|---|---|---|")
    for n in threads:  # before and after alternate: a busy host slows both alike
        for mode in ("before", "after"):
            proc = subprocess.run(
                [sys.executable, "-c", CHILD, mode, args.model, str(n), str(args.repeats)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = results[mode, n] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(
                f"| {mode} | {n} | {r['strict']} | {r['seconds']:.2f} | {r['digest']} |", flush=True
            )
    for mode in ("before", "after"):
        same = len({results[mode, n]["digest"] for n in threads}) == 1
        print(f"{mode}: same bits for threads {args.threads}: {same}")
    top = threads[-1]
    cost = results["after", top]["seconds"] / results["before", top]["seconds"]
    print(f"cost_after_vs_before={cost:.3f}")


if __name__ == "__main__":
    main()
