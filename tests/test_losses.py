"""Segmentation losses against hand-computed values and MONAI's reference losses."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from monai.losses import DiceCELoss, DiceFocalLoss
from omegaconf import OmegaConf

from sam_ft.training.losses import SegmentationLoss, mask_iou

CONF = Path(__file__).resolve().parents[1] / "conf" / "loss"
LN2 = math.log(2.0)


def make_loss(kind: str, iou_weight: float = 0.0, iou_on: str = "all") -> SegmentationLoss:
    """The loss with the weights the hand values below assume (Dice 1, CE 1; focal 20, alpha
    0.25, gamma 2: SAM's), given here, not taken from a default."""
    pixel = (
        {"focal_weight": 20.0, "focal_alpha": 0.25, "focal_gamma": 2.0}
        if kind == "focal_dice"
        else {"ce_weight": 1.0}
    )
    return SegmentationLoss(kind, iou_weight, 1.0, iou_on=iou_on, resolution="original", **pixel)


def one_pixel_target() -> torch.Tensor:
    """(1, 2, 2) target with one foreground pixel."""
    return torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])


def test_dice_ce_hand_value_at_zero_logits():
    # p = 0.5 everywhere: Dice = 1 - 2*0.5 / (2 + 1) = 2/3; BCE = ln 2 per pixel.
    loss_fn = make_loss("dice_ce")
    loss, parts = loss_fn(torch.zeros(1, 1, 2, 2), None, one_pixel_target())
    assert parts["dice"].item() == pytest.approx(2 / 3, abs=1e-5)
    assert parts["ce"].item() == pytest.approx(LN2, abs=1e-6)
    assert loss.item() == pytest.approx(2 / 3 + LN2, abs=1e-5)


def test_iou_term_hand_value():
    # Zero logits predict nothing: true IoU 0 against one foreground pixel; (0.5 - 0)^2 = 0.25.
    loss_fn = make_loss("dice_ce", iou_weight=1.0)
    loss, parts = loss_fn(torch.zeros(1, 1, 2, 2), torch.tensor([[0.5]]), one_pixel_target())
    assert parts["iou"].item() == 0.0
    assert parts["iou_mse"].item() == pytest.approx(0.25)
    assert loss.item() == pytest.approx(2 / 3 + LN2 + 0.25, abs=1e-5)


def test_focal_dice_hand_value_at_zero_logits():
    # Focal at p = 0.5: alpha_t * 0.5^2 * ln 2, alpha_t = 0.25 on the 1 foreground pixel and 0.75
    # on the 3 background ones -> mean 0.25 * ln 2 * (0.25 + 3 * 0.75) / 4.
    loss_fn = make_loss("focal_dice")
    loss, parts = loss_fn(torch.zeros(1, 1, 2, 2), None, one_pixel_target())
    focal = 0.25 * LN2 * (0.25 + 3 * 0.75) / 4
    assert parts["focal"].item() == pytest.approx(focal, abs=1e-6)
    assert loss.item() == pytest.approx(20 * focal + 2 / 3, abs=1e-5)


def random_batch(n: int = 4, c: int = 1, size: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, size, size, generator=g) * 3
    target = torch.rand(n, size, size, generator=g) < torch.linspace(0.05, 0.6, n)[:, None, None]
    return logits, target.float()


def test_dice_ce_equals_monai():
    logits, target = random_batch()
    ours, _ = make_loss("dice_ce")(logits, None, target)
    ref = DiceCELoss(sigmoid=True)(logits, target[:, None])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_focal_dice_equals_monai():
    logits, target = random_batch(seed=1)
    ours, _ = make_loss("focal_dice")(logits, None, target)
    ref = DiceFocalLoss(sigmoid=True, lambda_dice=1.0, lambda_focal=20.0, gamma=2.0, alpha=0.25)(
        logits, target[:, None]
    )
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)


def test_dice_is_per_object_not_batch_global():
    logits, target = random_batch(n=3, seed=2)
    loss_fn = make_loss("dice_ce")
    batch, parts = loss_fn(logits, None, target)
    singles = [loss_fn(logits[i : i + 1], None, target[i : i + 1])[0] for i in range(3)]
    assert batch.item() == pytest.approx(torch.stack(singles).mean().item(), rel=1e-6)
    global_dice = DiceCELoss(sigmoid=True, batch=True, lambda_ce=0.0)(logits, target[:, None])
    assert abs(parts["dice"].item() - global_dice.item()) > 1e-3


def test_best_of_three_takes_the_minimum():
    _, target = random_batch(n=2, seed=3)
    good = (target * 2 - 1) * 8  # confident and right
    bad = -good  # confident and wrong
    meh = torch.zeros_like(good)
    # Object 0 has its good mask in channel 2, object 1 in channel 0.
    logits = torch.stack(
        [torch.stack([bad[0], meh[0], good[0]]), torch.stack([good[1], bad[1], meh[1]])]
    ).requires_grad_(True)
    loss_fn = make_loss("dice_ce")
    loss, parts = loss_fn(logits, None, target)
    per = loss_fn.per_mask(logits.detach(), target)
    per_total = per["dice"] + per["ce"]  # (2, 3)
    assert loss.item() == pytest.approx(per_total.min(dim=1).values.mean().item(), rel=1e-6)
    assert per_total.argmin(dim=1).tolist() == [2, 0]
    assert parts["iou"].item() == 1.0
    loss.backward()
    # Only the kept masks receive gradient.
    touched = logits.grad.abs().sum(dim=(2, 3)) > 0
    assert touched.tolist() == [[False, False, True], [True, False, False]]


def test_iou_head_trained_on_all_or_best_masks():
    target = torch.zeros(1, 4, 4)
    target[0, :2, :2] = 1  # 4 pixels
    logits = torch.full((1, 3, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5  # exact: IoU 1
    logits[0, 1, :2, :] = 5  # 8 pixels covering the target: IoU 0.5
    # channel 2 empty: IoU 0
    np_iou = mask_iou(logits, target[:, None])
    assert np_iou.tolist() == [[1.0, 0.5, 0.0]]
    iou_pred = torch.tensor([[0.5, 0.5, 0.5]])
    _, all_parts = make_loss("dice_ce", 1.0, iou_on="all")(logits, iou_pred, target)
    _, best_parts = make_loss("dice_ce", 1.0, iou_on="best")(logits, iou_pred, target)
    assert all_parts["iou_mse"].item() == pytest.approx((0.25 + 0 + 0.25) / 3)
    assert best_parts["iou_mse"].item() == pytest.approx(0.25)


def test_empty_masks_have_iou_one_and_missing_iou_pred_raises():
    assert mask_iou(torch.full((1, 3, 3), -1.0), torch.zeros(1, 3, 3)).item() == 1.0
    with pytest.raises(ValueError, match="iou_pred"):
        make_loss("dice_ce", iou_weight=1.0)(torch.zeros(1, 1, 2, 2), None, torch.zeros(1, 2, 2))


def test_no_objects_gives_zero_loss_with_graph():
    logits = torch.zeros(0, 3, 8, 8, requires_grad=True)
    loss, parts = make_loss("dice_ce", 1.0)(logits, torch.zeros(0, 3), torch.zeros(0, 8, 8))
    assert loss.item() == 0.0 and loss.requires_grad
    assert set(parts) == {"dice", "ce", "iou_mse", "iou"}


@pytest.mark.parametrize(
    ("name", "kind", "iou_weight"), [("dice_ce", "dice_ce", 0.0), ("focal_dice", "focal_dice", 1.0)]
)
def test_loss_configs_instantiate(name, kind, iou_weight):
    from sam_ft.train import build_loss

    # dice_ce's iou_weight is null: build_loss sets it from eval.mask_selection (oracle -> 0).
    cfg = OmegaConf.create({"loss": OmegaConf.load(CONF / f"{name}.yaml")})
    cfg.eval = {"mask_selection": "oracle"}
    loss_fn = build_loss(cfg)
    assert isinstance(loss_fn, SegmentationLoss)
    assert loss_fn.kind == kind and loss_fn.iou_weight == iou_weight
    logits, target = random_batch(n=2, c=3, seed=4)
    loss, _ = loss_fn(logits, torch.rand(2, 3), target)
    assert torch.isfinite(loss)
