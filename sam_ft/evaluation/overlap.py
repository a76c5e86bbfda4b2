"""Dice and IoU of bool masks, numpy and torch, with one rule for empty masks.

============================  ====  ====  ====  =====================================
case                          Dice  IoU   NSD   HD95
============================  ====  ====  ====  =====================================
both empty                    1     1     1     0
empty pred, non-empty GT      0     0     0     NaN, ``hd95_missing=True``
non-empty pred, empty GT      0     0     0     NaN, ``hd95_missing=True``
============================  ====  ====  ====  =====================================

Every Dice in the package (the engine's scores, the oracle mask selection, Everything mode's
matching, the training module's validation) comes from here.
"""

from __future__ import annotations


def empty_rule(empty_pred: bool, empty_gt: bool) -> dict:
    """Scores for a pair where at least one mask is empty (see the module table)."""
    both = empty_pred and empty_gt
    return {
        "dice": 1.0 if both else 0.0,
        "iou": 1.0 if both else 0.0,
        "hd95": 0.0 if both else float("nan"),
        "nsd": 1.0 if both else 0.0,
        "empty_pred": empty_pred,
        "empty_gt": empty_gt,
        "hd95_missing": not both,
    }
