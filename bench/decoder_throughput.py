"""Mask decoder cost per prompt: ``TrainableSam.decode`` vs SAM's ``MaskDecoder``, same prompts.

The reference is the official batched path, as ``SamPredictor.predict_torch`` runs it: the prompt
encoder, then ``MaskDecoder.forward`` on all prompts of one structure at once (it copies the image
embedding per prompt). Ours is the product's path (``sam_ft.model.decoder``: the image side once
per image, attention reassociated around the prompt tokens, channels-last upscaling). Both run
on the same embedding and prompts, one prompt structure of the study at a time, alternating
rounds; the table gives medians and the largest logit difference between the two.

    python bench/decoder_throughput.py --model vit_b --prompts 8 --rounds 5

Last line: ``decoder_speedup_vs_mask_decoder=<MaskDecoder s / ours s, all structures>``.
"""

from __future__ import annotations

import os

# Set before torch loads OpenMP (see eval_throughput.py).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import statistics
import time

import numpy as np
import torch
from _common import final_line, machine, print_table, set_threads

from sam_ft.model.builders import SPECS, build_sam_architecture
from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.types import Prompt

# (name, positive points, negative points, box): the study's S2-S6.
STRUCTURES = [
    ("point1", 1, 0, False),
    ("point5", 5, 0, False),
    ("point5_neg5", 5, 5, False),
    ("box", 0, 0, True),
    ("box_point1", 1, 0, True),
]


def _prompts(rng: np.random.Generator, n: int, pos: int, neg: int, box: bool, side: int):
    """n prompts of one structure, (x, y) pixels of a (side, side) image."""
    out = []
    for _ in range(n):
        points = labels = None
        if pos + neg:
            points = rng.uniform(0, side, (pos + neg, 2))
            labels = np.array([1] * pos + [0] * neg)
        corners = np.sort(rng.uniform(0, side, (2, 2)), axis=0).reshape(4) if box else None
        out.append(Prompt(points=points, point_labels=labels, box=corners))
    return out


def _official(model: TrainableSam, embedding, prompts, size):
    """SamPredictor.predict_torch's decoder call: prompt encoder + MaskDecoder on all prompts."""
    sam, t = model.sam, model.transform
    points = boxes = None
    if prompts[0].points is not None:
        coords = t.apply_coords(np.stack([p.points for p in prompts]), size)
        labels = np.stack([p.point_labels for p in prompts])
        points = (torch.as_tensor(coords, dtype=torch.float32), torch.as_tensor(labels))
    if prompts[0].box is not None:
        boxes = torch.as_tensor(t.apply_boxes(np.stack([p.box for p in prompts]), size))
        boxes = boxes.float()
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    return sam.mask_decoder(
        embedding[None], sam.prompt_encoder.get_dense_pe(), sparse, dense, multimask_output=True
    )


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _seconds(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="vit_b", choices=sorted(SPECS))
    p.add_argument("--prompts", type=_positive, default=8, help="prompts per structure")
    p.add_argument("--rounds", type=_positive, default=5, help="timed rounds per path (median)")
    p.add_argument("--threads", type=int, default=None, help="default: every core")
    p.add_argument("--quick", action="store_true", help="tiny model, 2 prompts, 1 round (tests)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.prompts, args.rounds, args.threads = "tiny", 2, 1, args.threads or 1
    threads = set_threads(args.threads)

    torch.manual_seed(0)
    sam = build_sam_architecture(args.model)
    model = TrainableSam(
        sam, "sam", grad_checkpointing=False, encoder_bf16=True, multimask_output=True
    ).eval()
    side = model.image_size
    c, (h, w) = model.sam.prompt_encoder.embed_dim, model.sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(c, h, w)
    rng = np.random.default_rng(0)
    size = (side, side)

    rows, total_ref, total_ours = [], 0.0, 0.0
    with torch.inference_mode():
        for name, pos, neg, box in STRUCTURES:
            prompts = _prompts(rng, args.prompts, pos, neg, box, side)
            ref_logits, _ = _official(model, embedding, prompts, size)  # warm-up, reference
            ours_logits, _ = model.decode(embedding, prompts, size, True)
            diff = float((ours_logits - ref_logits).abs().max())
            t_ref, t_ours = [], []
            for _ in range(args.rounds):
                t_ref.append(_seconds(_official, model, embedding, prompts, size))
                t_ours.append(_seconds(model.decode, embedding, prompts, size, True))
            ref, ours = statistics.median(t_ref), statistics.median(t_ours)
            total_ref += ref
            total_ours += ours
            tokens = 5 + pos + neg + (2 if box else 1)  # a padding point without a box
            n = args.prompts
            rows.append([name, tokens, 1000 * ref / n, 1000 * ours / n, ref / ours, diff])

    print(f"machine: {machine()} (threads={threads})")
    print(
        f"model {args.model} (random weights), {args.prompts} prompts per structure, 3 masks each, "
        f"median of {args.rounds} alternating rounds"
    )
    print_table(
        "mask decoder per prompt",
        ["prompt", "tokens", "MaskDecoder ms", "ours ms", "speedup", "max |logit diff|"],
        rows,
    )
    ratio = total_ref / total_ours
    final_line("decoder_speedup_vs_mask_decoder", ratio)
    return ratio


if __name__ == "__main__":
    main()
