"""The validation overlays name each panel's own object."""

from __future__ import annotations

import torch

from sam_ft.training.module import _overlay_title


def test_panels_of_one_case_get_different_titles():
    batch = {
        "case": ["demo_003", "demo_003"],
        "slice_index": [7, 9],
        "labels": [torch.tensor([1, 2]), torch.tensor([1])],
    }
    titles = [_overlay_title(batch, b, k, 0.5) for b, k in ((0, 0), (0, 1), (1, 0))]
    assert len(set(titles)) == 3
    assert titles[0] == "demo_003 slice 7 label 1, Dice 0.50"
