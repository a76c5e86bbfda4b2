"""Segmentation losses for SAM's mask decoder (Hydra config group ``loss``).

Two mask losses per object and per predicted mask, averaged over objects, and the official one:

* ``dice_ce``: soft Dice + binary cross-entropy on sigmoid logits, each object on its own (the
  default: a documented correction of the study's loss, see ``cosmos_official``).
* ``focal_dice``: 20 x focal + 1 x Dice, SAM's own training loss (focal alpha 0.25, gamma 2, as
  in DETR / ``torchvision.ops.sigmoid_focal_loss``).
* ``cosmos_official``: the official ``train_only_box.py`` loss, MONAI
  ``DiceCELoss(sigmoid=True, squared_pred=True)`` on each image's logits laid out as
  (1, objects, H, W), averaged over images: objects are channels, so the Dice is squared and
  averaged over an image's objects, and the cross-entropy is MONAI's for that layout (a softmax
  across the image's objects for several, binary for one in MONAI 1.6; 0 for one in the 2023
  versions). One mask output.

With multimask output (C = 3) only the mask with the lowest loss counts for each object, as SAM
trains its ambiguity-aware output. An optional MSE term trains the IoU head towards the true IoU
of each binarised mask, which keeps ``predicted_iou`` mask selection meaningful after finetuning.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from monai.losses import DiceCELoss, DiceLoss, FocalLoss
from torch import nn

LossKind = Literal["dice_ce", "focal_dice", "cosmos_official"]
KINDS: tuple[str, ...] = ("dice_ce", "focal_dice", "cosmos_official")
Resolution = Literal["low", "input", "original"]
RESOLUTIONS: tuple[str, ...] = ("low", "input", "original")


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """IoU of ``logits > 0`` with a {0, 1} target, per mask: (..., h, w) -> (...).

    Two empty masks have IoU 1 (perfect agreement), so the IoU head is not taught that a correct
    empty prediction is a failure.
    """
    pred = logits > 0
    tgt = target > 0.5
    inter = (pred & tgt).sum(dim=(-2, -1)).float()
    union = (pred | tgt).sum(dim=(-2, -1)).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union))


class SegmentationLoss(nn.Module):
    """Per-object mask loss with best-of-C selection and an optional IoU-head MSE.

    Args:
        kind: ``"dice_ce"`` (per object), ``"focal_dice"`` (SAM's) or ``"cosmos_official"``
            (the official code's, per image; ``per_image`` is then True and ``forward`` needs
            ``groups``).
        iou_weight: weight of the IoU-head MSE; 0 disables it (``iou_pred`` may then be None).
        dice_weight: weight of the Dice term.
        ce_weight: weight of the cross-entropy term (``dice_ce``, ``cosmos_official``: required
            there, unused by ``focal_dice``).
        focal_weight: weight of the focal term (``focal_dice``, required there; SAM uses 20 with
            Dice at 1).
        focal_alpha: focal loss weight of the foreground class (conf/loss/focal_dice.yaml: 0.25 as
            in SAM/DETR; None = no class weighting).
        focal_gamma: focal loss focusing exponent (``focal_dice``, required there).
        The values live in conf/loss/<kind>.yaml (``sam_ft.defaults.build_from_yaml("loss",
        kind)`` builds one from it).
        iou_on: ``"all"`` trains the IoU head on all C masks (it must rank them to select one at
            inference); ``"best"`` only on the mask that the mask loss kept.
        smooth: Dice smoothing added to numerator and denominator (MONAI's default 1e-5).
        resolution: the frame where logits meet targets, applied by the training module:
            ``original`` (logits upsampled to the image's size as ``Sam.postprocess_masks`` does,
            against the original mask: the official code; a kept object never has an empty
            target), ``input`` (logits upsampled 4x to the model input frame, mask resized into
            it, nearest: empty only for objects thinner than the downscale of images larger than
            the input), ``low`` (the 256x256 logits against the mask 4x4-averaged and thresholded
            at 0.5: fastest, but objects under ~2 input pixels wide get an empty target).
    """

    def __init__(
        self,
        kind: LossKind,
        iou_weight: float,
        dice_weight: float,
        *,
        iou_on: Literal["all", "best"],
        resolution: Resolution,
        ce_weight: float | None = None,
        focal_weight: float | None = None,
        focal_alpha: float | None = None,
        focal_gamma: float | None = None,
        smooth: float = 1e-5,
    ) -> None:
        super().__init__()
        if resolution not in RESOLUTIONS:
            raise ValueError(f"loss.resolution must be one of {RESOLUTIONS}, got {resolution!r}")
        if iou_weight is None:
            raise ValueError(
                "loss.iou_weight is null: build the loss with sam_ft.train.build_loss, "
                "which sets it from eval.mask_selection, or give a number"
            )
        if kind not in KINDS:
            raise ValueError(f"loss kind must be one of {KINDS}, got {kind!r}")
        if iou_on not in ("all", "best"):
            raise ValueError(f"iou_on must be 'all' or 'best', got {iou_on!r}")
        needed = ("focal_weight", "focal_gamma") if kind == "focal_dice" else ("ce_weight",)
        given = {"ce_weight": ce_weight, "focal_weight": focal_weight, "focal_gamma": focal_gamma}
        for key in needed:
            if given[key] is None:
                raise ValueError(f"loss.{key} is required by loss kind {kind!r}")
        self.kind = kind
        self.iou_weight = float(iou_weight)
        self.dice_weight = float(dice_weight)
        self.pixel_weight = float(focal_weight if kind == "focal_dice" else ce_weight)
        self.pixel_name = "focal" if kind == "focal_dice" else "ce"
        self.per_image = kind == "cosmos_official"
        self.official = (
            DiceCELoss(
                sigmoid=True,
                squared_pred=True,
                lambda_dice=dice_weight,
                lambda_ce=ce_weight,
                smooth_nr=smooth,
                smooth_dr=smooth,
            )
            if self.per_image
            else None
        )
        self.iou_on = iou_on
        self.resolution = resolution
        # reduction="none" keeps one Dice per (object, mask): per-object Dice, never batch-global.
        self.dice = DiceLoss(sigmoid=True, reduction="none", smooth_nr=smooth, smooth_dr=smooth)
        self.focal = (
            FocalLoss(gamma=focal_gamma, alpha=focal_alpha, reduction="none")
            if kind == "focal_dice"
            else None
        )

    def per_mask(self, logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unweighted Dice and pixel (CE or focal) loss of every mask -> dict of (N, C) tensors."""
        t = target.to(logits.dtype).unsqueeze(1).expand_as(logits)
        dice = self.dice(logits, t).reshape(logits.shape[:2])
        if self.focal is None:
            pix = F.binary_cross_entropy_with_logits(logits, t, reduction="none")
        else:
            pix = self.focal(logits, t)
        return {"dice": dice, self.pixel_name: pix.mean(dim=(-2, -1))}

    def per_image_official(
        self, logits: torch.Tensor, target: torch.Tensor, groups: list[int]
    ) -> dict[str, torch.Tensor]:
        """``cosmos_official``: MONAI DiceCE on each image's (1, K, h, w) logits, mean over images.

        Args:
            logits: (N, 1, h, w), the objects of the images concatenated.
            target: (N, h, w) {0, 1}.
            groups: objects per image, summing to N.
        Returns:
            ``{"total", "dice", "ce"}`` scalars.
        """
        if logits.shape[1] != 1:
            raise ValueError(
                "loss=cosmos_official is the official single-mask loss: it needs one mask output "
                f"(train.multimask=false), got {logits.shape[1]} masks per object"
            )
        if sum(groups) != logits.shape[0]:
            raise ValueError(f"groups {groups} do not add up to {logits.shape[0]} objects")
        total, dice = [], []
        for lg, t in zip(logits.split(groups), target.split(groups), strict=True):
            x, y = lg.transpose(0, 1), t[None]  # (1, K, h, w): objects as channels
            total.append(self.official(x, y))
            dice.append(self.official.dice(x, y) * self.official.lambda_dice)
        total_t, dice_t = torch.stack(total).mean(), torch.stack(dice).mean()
        return {"total": total_t, "dice": dice_t, "ce": total_t - dice_t}

    def forward(
        self,
        logits: torch.Tensor,
        iou_pred: torch.Tensor | None,
        target: torch.Tensor,
        groups: list[int] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Loss of a batch of objects.

        Args:
            logits: (N, C, h, w) mask logits, C = 1 or 3 (multimask).
            iou_pred: (N, C) IoU-head predictions, or None when ``iou_weight == 0``.
            target: (N, h, w) float {0, 1} ground truth at the logits' resolution (the module
                brings both into the ``resolution`` frame).
            groups: objects per image (summing to N), for ``cosmos_official``; None = one image.

        Returns:
            ``(loss, parts)``: the scalar loss, and detached scalars ``dice``, ``ce`` or
            ``focal``, ``iou_mse`` and ``iou`` (true IoU of the kept masks), each averaged over
            objects.
        """
        if logits.ndim != 4 or target.shape != (logits.shape[0], *logits.shape[2:]):
            raise ValueError(
                f"expected logits (N, C, h, w) and target (N, h, w), got {tuple(logits.shape)} "
                f"and {tuple(target.shape)}"
            )
        # Losses in float32 even under mixed precision: sigmoid/log terms lose too much in fp16.
        logits = logits.float()
        target = target.float()
        n = logits.shape[0]
        if n == 0:
            zero = logits.sum() * 0.0
            return zero, {
                "dice": zero.detach(),
                self.pixel_name: zero.detach(),
                "iou_mse": zero.detach(),
                "iou": zero.detach(),
            }
        rows = torch.arange(n, device=logits.device)
        if self.per_image:
            official = self.per_image_official(logits, target, groups or [n])
            loss = official.pop("total")
            best = torch.zeros(n, dtype=torch.long, device=logits.device)
            parts = {k: v.expand(n, 1) for k, v in official.items()}
        else:
            parts = self.per_mask(logits, target)
            seg = self.dice_weight * parts["dice"] + self.pixel_weight * parts[self.pixel_name]
            best = seg.detach().argmin(dim=1)  # (N,) mask kept per object
            loss = seg[rows, best].mean()

        with torch.no_grad():
            true_iou = mask_iou(logits, target.unsqueeze(1))  # (N, C)
        iou_mse = torch.zeros((), device=logits.device)
        if iou_pred is not None:
            iou_pred = iou_pred.float().reshape(n, -1)
            if self.iou_on == "all":
                iou_mse = F.mse_loss(iou_pred, true_iou)
            else:
                iou_mse = F.mse_loss(iou_pred[rows, best], true_iou[rows, best])
        elif self.iou_weight > 0:
            raise ValueError("iou_pred is needed when iou_weight > 0")
        if self.iou_weight > 0:
            loss = loss + self.iou_weight * iou_mse

        out = {k: v[rows, best].mean().detach() for k, v in parts.items()}
        out["iou_mse"] = iou_mse.detach()
        out["iou"] = true_iou[rows, best].mean()
        return loss, out

    def extra_repr(self) -> str:
        return (
            f"kind={self.kind}, dice_weight={self.dice_weight:g}, "
            f"{self.pixel_name}_weight={self.pixel_weight:g}, iou_weight={self.iou_weight:g}, "
            f"iou_on={self.iou_on}, resolution={self.resolution}"
        )
