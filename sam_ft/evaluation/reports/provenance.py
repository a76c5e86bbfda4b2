"""How an evaluation's numbers were computed, written in every summary: the metric
implementations, the NSD method and tolerance, the spacing, the statistics, the sam_ft version
and a hash of the evaluation protocol.

The hash covers what decides the numbers (the ``eval`` options but the scoring worker count and
the queue's size, which never change a CSV, and the prompt seed), so one process, merged shards
and a DDP run of one configuration write the same provenance.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from sam_ft import __version__

if TYPE_CHECKING:
    from sam_ft.evaluation.protocol.options import EvalOptions

NSD_WORDS = {
    "area": "DeepMind's surface Dice (surface-distance's area-weighted surface elements, as "
    "monai.metrics.compute_surface_dice(use_subvoxels=True))",
    "count": "fraction of surface voxels within the tolerance "
    "(monai.metrics.compute_surface_dice without sub-voxels)",
}


def config_hash(options: EvalOptions, seed: int | None) -> str:
    """12 hex digits of SHA-256 over the options that decide the numbers, and the seed (in the
    layout the hash has always had, so runs before and after compare)."""
    fields = {
        "prompts": list(options.prompts),
        "levels": list(options.levels),
        **{k: getattr(options, k) for k in HASHED},
        "everything": dataclasses.asdict(options.generator),
        "bootstrap": dataclasses.asdict(options.bootstrap),
    }
    if options.mode != "slices":
        # eval.propagate decides nothing in the slices mode: the hash it had before the modes.
        fields.update(mode=options.mode, propagate=dataclasses.asdict(options.propagate))
    body = json.dumps({"eval": fields, "seed": seed}, sort_keys=True, default=str)
    return hashlib.sha256(body.encode()).hexdigest()[:12]


HASHED = (
    "mask_selection", "point_sampling", "nsd_tolerance_mm", "nsd_method", "clicks",
    "save_predictions", "max_prompts_per_call", "overlays", "volume_gt", "on_error",
)  # fmt: skip
"""The plain options in the hash (which cases, and how many processes score them, change no
row's numbers)."""


def provenance(options: EvalOptions, seed: int | None, units: Iterable[str]) -> dict[str, Any]:
    """The provenance of a summary whose per-object rows have these distance units."""
    units = sorted(set(units))
    return {
        "sam_ft_version": __version__,
        "config_hash": config_hash(options, seed),
        "seed": seed,
        "dice_iou": "sam_ft.evaluation.metrics.overlap (one Dice and IoU on the original-size "
        "masks; "
        "empty masks by its table)",
        "hd95": "MONAI's (monai.metrics.compute_hausdorff_distance, percentile=95); missing "
        "when a mask is empty, never 0",
        "hd_asd": "HD: MONAI's compute_hausdorff_distance (the maximum); ASD: MONAI's "
        "compute_average_surface_distance(symmetric=False), prediction to ground truth",
        "conformity": "(3 Dice - 2) / Dice, 0 where Dice is 0",
        "nsd": f"{options.nsd_method}: {NSD_WORDS[options.nsd_method]}",
        "nsd_tolerance": f"{options.nsd_tolerance_mm:g} mm (pixels for 2D images without spacing)",
        "spacing": "each image's own voxel spacing from its header, in mm; 2D images without a "
        "spacing in pixels; distance units here: " + (", ".join(units) or "mm"),
        "mask_selection": options.mask_selection,
        "confidence_intervals": options.bootstrap.describe(),
        "paired_test": "scipy.stats.wilcoxon (two-sided) over per-case mean differences of the "
        "objects both sides scored; Holm's correction within one table",
    }


def provenance_lines(info: dict[str, Any]) -> list[str]:
    """Markdown lines of :func:`provenance`."""
    lines = ["## Provenance", ""]
    lines += [f"- {key}: {value}" for key, value in info.items()]
    return [*lines, ""]
