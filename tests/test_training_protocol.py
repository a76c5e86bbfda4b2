"""The training and model protocol choices (docs/protocol.md): each default, checked."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sam_ft.prompts.types import Prompt

CONF = Path(__file__).resolve().parents[1] / "conf"


def _compose(name: str, overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(name, overrides=overrides)


@pytest.mark.parametrize("bf16", [True, False])
def test_encoder_bf16_is_a_model_option(bf16):
    cfg = _compose("eval", [f"model.encoder_bf16={bf16}"])
    model = instantiate(cfg.model)
    assert model.encoder_bf16 is bf16
    # On a CPU nothing runs in bf16, whatever the option says.
    assert model.precision("cpu") == {"encoder": "float32", "decoder": "float32"}


@pytest.mark.parametrize("name", ["paper_vit_b", "paper_vit_h"])
def test_paper_experiment_is_the_papers_recipe(name):
    cfg = _compose("train", [f"experiment={name}", "task=liver_ct"])
    assert cfg.scheduler._target_ == "torch.optim.lr_scheduler.ConstantLR"
    assert cfg.scheduler.factor == 1.0  # constant learning rate
    assert cfg.trainer.gradient_clip_val is None
    assert str(cfg.trainer.precision) == "32" and cfg.model.encoder_bf16 is False
    assert cfg.train.multimask is False and cfg.loss.resolution == "original"
    assert cfg.data.embedding_dtype == "float32"  # the official embeddings are float32
    assert "demo" not in cfg.tags and cfg.task.name == "liver_ct"
    # What the user asks for on the command line still wins.
    cfg = _compose("train", [f"experiment={name}", "task=liver_ct", "trainer.precision=bf16-mixed"])
    assert cfg.trainer.precision == "bf16-mixed"


@pytest.mark.parametrize("name", ["paper_vit_b", "paper_vit_h"])
def test_paper_experiment_without_task_says_what_to_add(name):
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException, match=r"task=<OPTION>[\s\S]*liver_ct"):
        _compose("train", [f"experiment={name}"])


def test_a_named_task_carries_nothing_of_the_demo():
    cfg = _compose("train", ["model=vit_b", "task=liver_ct"])
    assert "demo" not in cfg.tags
    assert _compose("train", ["task=demo"]).tags == ["demo"]  # the demo run itself is tagged
    assert list(_compose("train", []).tags) == []  # the default run (LiteMedSAM on MNI152)


# --- mask outputs and selection (issue 13, items 2 and 3) -----------------------------------

H, W = 64, 80


def _tiny(multimask_output: bool = True):
    from sam_ft.defaults import build_from_yaml

    torch.manual_seed(0)
    return build_from_yaml("model", "tiny", multimask_output=multimask_output).eval()


def _scene():
    """Two objects on a (H, W) image, their (H, W, 3) uint8 image and (K, H, W) masks."""
    yy, xx = np.mgrid[:H, :W]
    masks = np.stack(
        [(yy - 30) ** 2 + (xx - 28) ** 2 < 12**2, (yy > 8) & (yy < 24) & (xx > 48) & (xx < 74)]
    )
    grey = np.full((H, W), 50.0)
    grey[masks[0]], grey[masks[1]] = 160, 220
    image = np.repeat(grey.astype(np.uint8)[..., None], 3, axis=2)
    return image, masks


def _prompts():
    return [
        Prompt(points=[[28, 30]], point_labels=[1]),  # one point: ambiguous
        Prompt(box=[48, 8, 74, 24]),
        Prompt(points=[[28, 30], [60, 16]], point_labels=[1, 0]),
    ]


def test_model_configs_state_their_mask_outputs():
    assert _compose("eval", ["model=vit_b"]).model.multimask_output is True
    assert _compose("eval", ["model=medsam"]).model.multimask_output is False
    assert _tiny(False).multimask_output is False and _tiny().multimask_output is True


def test_auto_selection_is_sams_convention():
    from sam_ft.evaluation.protocol.decode_select import decode_scored

    model = _tiny()
    image, masks = _scene()
    with torch.no_grad():
        emb = model.encode(model.preprocess(image)[None])[0]
        prompts = _prompts()
        gt = masks[[0, 1, 0]]
        got, index, iou, _ = _as_tuple(decode_scored(model, emb, prompts, gt, "auto", 8))
        for i, prompt in enumerate(prompts):
            multi = i == 0  # 3 masks for the single point only, ranked by the IoU head
            low, pred_iou = model.decode(emb, [prompt], (H, W), multi)
            k = int(pred_iou[0].argmax()) if multi else 0
            want = (model.postprocess(low, (H, W))[0, k] > 0).numpy()
            assert index[i] == k and np.array_equal(got[i], want)
            assert iou[i] == pytest.approx(float(pred_iou[0, k]))


@pytest.mark.parametrize("mode", ["oracle", "predicted_iou", "single", "auto"])
def test_single_output_model_uses_its_one_mask_in_every_mode(mode):
    from sam_ft.evaluation.protocol.decode_select import decode_scored

    model = _tiny(multimask_output=False)
    image, masks = _scene()
    with torch.no_grad():
        emb = model.encode(model.preprocess(image)[None])[0]
        prompts = _prompts()
        got, index, _, _ = _as_tuple(decode_scored(model, emb, prompts, masks[[0, 1, 0]], mode, 8))
        low, _ = model.decode(emb, prompts, (H, W), False)
        want = (model.postprocess(low, (H, W))[:, 0] > 0).numpy()
    assert np.array_equal(got, want) and (index == 0).all()


def _cfg(selection: str, multimask=None, model: str = "tiny"):
    return OmegaConf.create(
        {
            "eval": {"mask_selection": selection},
            "train": {"multimask": multimask},
            "model": {"name": model},
            "loss": OmegaConf.load(CONF / "loss" / "dice_ce.yaml"),
        }
    )


def test_training_mask_outputs_default_to_the_papers_single_mask():
    from sam_ft.errors import ConfigError
    from sam_ft.train import train_multimask

    assert _compose("train", []).train.multimask is None
    assert train_multimask(_cfg("oracle"), _tiny()) is False  # the paper's code
    assert train_multimask(_cfg("auto"), _tiny()) == "auto"  # each prompt as auto decodes it
    assert train_multimask(_cfg("predicted_iou"), _tiny()) is True  # the IoU head ranks 3
    assert train_multimask(_cfg("predicted_iou"), _tiny(False)) is False  # MedSAM-like
    assert train_multimask(_cfg("oracle", True), _tiny()) is True
    with pytest.raises(ConfigError, match="train.multimask=true.*single mask output"):
        train_multimask(_cfg("oracle", True, "medsam"), _tiny(False))


@pytest.mark.parametrize(("selection", "weight"), [("oracle", 0.0), ("predicted_iou", 1.0)])
def test_iou_head_is_trained_when_the_selection_reads_it(selection, weight):
    from sam_ft.train import build_loss

    assert build_loss(_cfg(selection)).iou_weight == weight
    cfg = _cfg(selection)
    cfg.loss.iou_weight = 0.5  # an explicit weight wins
    assert build_loss(cfg).iou_weight == 0.5


def _module(model, selection: str, resolution: str = "original"):
    from functools import partial

    from sam_ft.defaults import build_from_yaml
    from sam_ft.training.losses import SegmentationLoss
    from sam_ft.training.module import SamFinetuneModule

    finetune = build_from_yaml("finetune", "decoder")
    finetune.apply(model)
    return SamFinetuneModule(
        model=model,
        finetune=finetune,
        loss=SegmentationLoss(
            "dice_ce", 0.0, 1.0, ce_weight=1.0, iou_on="all", resolution=resolution
        ),
        optimizer=partial(torch.optim.AdamW, lr=1e-4),
        scheduler=None,
        multimask_output=False,
        mask_selection=selection,
        max_nonfinite_steps=10,
        overlays=0,
    )


@pytest.mark.parametrize("selection", ["oracle", "predicted_iou"])
def test_validation_selects_masks_as_the_evaluation_does(selection):
    """val/dice is the mean Dice of the masks eval.mask_selection keeps, computed here from the
    model's 3 masks and IoU predictions: oracle the best Dice of 3, predicted_iou the mask the
    IoU head ranks first (the protocol's rules, not the code under test)."""
    model = _tiny()
    module = _module(model, selection)
    image, masks = _scene()
    prompts = [Prompt(points=[[x, y]], point_labels=[1]) for x, y in ((28, 30), (60, 16))]
    with torch.no_grad():
        emb = model.encode(model.preprocess(image)[None])
        batch = {
            "embedding": emb,
            "prompts": [prompts],
            "original_size": [(H, W)],
            "masks": [torch.from_numpy(masks)],
            "case": ["c"],
        }
        module.validation_step(batch, 0)
        got = float(module.val_dice.compute())
        low, iou = model.decode(emb[0], prompts, (H, W), True)
        preds = (model.postprocess(low, (H, W)) > 0).numpy()  # (objects, 3, H, W)
    dice3 = [
        2 * (p & m).sum(axis=(1, 2)) / (p.sum(axis=(1, 2)) + m.sum())
        for p, m in zip(preds, masks, strict=True)
    ]
    if selection == "oracle":
        want = np.mean([d.max() for d in dice3])
    else:
        want = np.mean([d[int(i.argmax())] for d, i in zip(dice3, iou.numpy(), strict=True)])
    assert got == pytest.approx(want, abs=1e-6)


# --- the loss's resolution (issue 13, item 1) -----------------------------------------------


def _thin_record(h: int = 256, w: int = 256):
    """A 1-px wide vertical vessel (120 px long, kept by the > 50 px filter) and a disc."""
    from sam_ft.data.types import SliceRecord

    yy, xx = np.mgrid[:h, :w]
    vessel = np.zeros((h, w), dtype=bool)
    vessel[60:180, 101] = True
    disc = (yy - 60) ** 2 + (xx - 190) ** 2 < 20**2
    masks = np.stack([vessel, disc])
    grey = np.full((h, w), 40, dtype=np.uint8)
    grey[masks.any(axis=0)] = 200
    image = np.repeat(grey[..., None], 3, axis=2)
    return SliceRecord("thin", 0, image, masks, np.array([1, 2]), ["vessel", "disc"])


@pytest.mark.parametrize("resolution", ["low", "input", "original"])
def test_thin_object_target_is_empty_only_at_low_resolution(resolution):
    from sam_ft.data.dataset import SliceDataset, tight_box_prompts

    model = _tiny()
    module = _module(model, "oracle", resolution)
    rec = _thin_record()
    ds = SliceDataset([rec], model.transform, tight_box_prompts, seed=0, progress=False,
                      target_resolution=resolution)  # fmt: skip
    item = ds[0]
    logits = torch.zeros(2, 1, model.transform.low_res_size, model.transform.low_res_size)
    if resolution == "low":
        target = item["target"]
    else:
        assert torch.equal(item["target"], torch.from_numpy(rec.masks))
        logits, target = module._in_frame(logits, item["target"], rec.original_size)
        assert logits.shape[-2:] == target.shape[-2:]
    vessel_pixels = int(target[0].sum())
    assert (vessel_pixels == 0) == (resolution == "low")
    assert target[1].sum() > 0


def test_loss_default_is_never_low():
    assert _compose("train", []).loss.resolution == "original"
    assert _compose("train", ["loss=focal_dice"]).loss.resolution == "original"


def test_original_resolution_loss_is_the_mean_over_objects_of_images_of_any_size():
    """Two images of different sizes: the batch loss equals the mean per-object loss computed
    on each image's logits upsampled as Sam.postprocess_masks does (the official code)."""
    from sam_ft.training.losses import SegmentationLoss

    model = _tiny()
    module = _module(model, "oracle", "original")
    module.loss = SegmentationLoss(
        "dice_ce", 1.0, 1.0, ce_weight=1.0, iou_on="all", resolution="original"
    )
    s = model.transform.low_res_size
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 3, s, s, generator=gen, requires_grad=True)
    iou = torch.rand(3, 3, generator=gen)
    sizes = [(40, 70), (90, 50)]
    targets = [torch.rand(2, *sizes[0], generator=gen) > 0.5, torch.rand(1, *sizes[1]) > 0.5]
    loss, parts = module._loss(logits, iou, targets, sizes)
    per_object = []
    for i, (b, k) in enumerate(((0, 0), (0, 1), (1, 0))):
        up = model.postprocess(logits[i : i + 1], sizes[b])
        one, _ = module.loss(up, iou[i : i + 1], targets[b][k : k + 1].float())
        per_object.append(one)
    # The IoU MSE over all (object, mask) pairs is a mean too, so the weighting also holds.
    assert loss.item() == pytest.approx(torch.stack(per_object).mean().item(), rel=1e-5)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    assert set(parts) == {"dice", "ce", "iou_mse", "iou"}


@pytest.mark.parametrize("resolution", ["low", "input", "original"])
def test_training_step_with_clicks_on_images_of_two_sizes(resolution):
    """A real batch (two image sizes, one click round) trains at every resolution."""
    from sam_ft.data.dataset import SliceDataset, collate_slices, tight_box_prompts

    model = _tiny()
    module = _module(model, "oracle", resolution)
    module.iterative_rounds = 1
    module.train()
    records = [_thin_record(), _thin_record(200, 230)]
    ds = SliceDataset(records, model.transform, tight_box_prompts, seed=0, progress=False,
                      target_resolution=resolution)  # fmt: skip
    batch = collate_slices([ds[0], ds[1]])
    loss = module.training_step(batch, 0)
    loss.backward()
    assert torch.isfinite(loss)
    # finetune=decoder: the encoders are frozen (no gradient); a small step of the decoder along
    # its gradient lowers the same batch's loss, so the gradient is the loss's.
    frozen = [*model.sam.image_encoder.parameters(), *model.sam.prompt_encoder.parameters()]
    assert all(p.grad is None for p in frozen)
    trained = [p for p in model.sam.mask_decoder.parameters() if p.grad is not None]
    norm = torch.sqrt(sum((p.grad**2).sum() for p in trained))
    assert norm > 0
    with torch.no_grad():
        for p in trained:
            p -= 1e-2 * p.grad / norm
        assert module.training_step(batch, 0) < loss - 1e-3 * norm


# --- the zero-shot baseline (issue 13, item 4) ----------------------------------------------


class RecordInitialState(L.Callback):
    """Keeps the SAM weights the trainer starts fitting from (added to a real train() run)."""

    state: dict = {}

    def on_fit_start(self, trainer, pl_module) -> None:
        sam = pl_module.model.sam.state_dict()
        RecordInitialState.state = {k: v.detach().clone() for k, v in sam.items()}


def test_zero_shot_baseline_is_the_finetuned_models_initial_state(tmp_path, monkeypatch):
    """With random weights (model=tiny, the demo) a freshly built model is another network: the
    baseline must be the exact weights finetuning started from."""
    import sam_ft.train as train_task
    from sam_ft.train import train

    seen = {}

    def capture(models, datamodule, options, facts, out_dir, ranks=None):
        seen.update(models)
        return None

    monkeypatch.setattr(train_task, "compare_models", capture)
    cfg = _compose(
        "train",
        [
            "model=tiny",
            "task=demo",
            f"paths.output_dir={tmp_path / 'run'}",
            f"paths.data_dir={tmp_path / 'data'}",
            "trainer=cpu",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "train.overlays=0",
            "+callbacks.record._target_=test_training_protocol.RecordInitialState",
        ],
    )
    train(cfg)
    zero_shot, finetuned = seen["zero_shot"].sam.state_dict(), seen["finetuned"].sam.state_dict()
    initial = RecordInitialState.state
    assert set(zero_shot) == set(initial)
    assert all(torch.equal(zero_shot[k], initial[k].to(zero_shot[k].device)) for k in initial)
    # ... and it is the model that was trained: the decoder moved, the frozen encoder did not.
    assert any(not torch.equal(finetuned[k], initial[k]) for k in initial if "mask_decoder" in k)
    assert all(torch.equal(finetuned[k], initial[k]) for k in initial if "image_encoder" in k)


def _as_tuple(sel) -> tuple:
    """(masks, chosen channel, predicted IoU, low-res logits) of a ``decode_scored`` result."""
    return sel.masks, sel.index, sel.pred_iou, sel.low


# --- the official loss (issue 25, item 1) ---------------------------------------------------


@pytest.mark.parametrize("second", [(H, W), (48, 40)])
def test_cosmos_official_loss_is_monai_dicece_per_image(second):
    """loss=cosmos_official is train_only_box.py's criterion: MONAI's DiceCELoss(sigmoid=True,
    squared_pred=True) on each image's (1, objects, H, W) upsampled logits, summed over the
    batch's images and divided by their number (one image with 1 object, one with 3)."""
    from monai.losses import DiceCELoss

    from sam_ft.training.losses import SegmentationLoss

    model = _tiny(False)
    module = _module(model, "oracle")
    module.loss = SegmentationLoss(
        "cosmos_official", 0.0, 1.0, ce_weight=1.0, iou_on="all", resolution="original"
    )
    sizes, counts = [(H, W), second], [1, 3]
    g = torch.Generator().manual_seed(0)
    s = model.transform.low_res_size
    logits = torch.randn(4, 1, s, s, generator=g) * 3
    targets = [
        (torch.rand(k, *hw, generator=g) < 0.3).float() for k, hw in zip(counts, sizes, strict=True)
    ]
    got, parts = module._loss(logits, torch.zeros(4, 1), targets, sizes)

    criterion = DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")
    batched_loss = 0.0
    for lg, gt, size in zip(logits.split(counts), targets, sizes, strict=True):
        masks = model.postprocess(lg, size)  # (K, 1, H, W), as Sam.postprocess_masks
        # float: MONAI 1.6 squared_pred rejects the official long targets (2023 versions took them)
        batched_loss += criterion(masks.squeeze(1).unsqueeze(0), gt.unsqueeze(0))
    want = batched_loss / len(sizes)
    assert got.item() == pytest.approx(want.item(), rel=1e-4)
    assert parts["dice"] + parts["ce"] == pytest.approx(got.item(), rel=1e-4)
    with pytest.raises(ValueError, match="cosmos_official.*one mask output"):
        module.loss(torch.zeros(2, 3, s, s), None, torch.zeros(2, s, s))


# --- auto selection trains what it ranks (issue 25, item 10) --------------------------------


def test_auto_selection_trains_the_iou_outputs_it_ranks():
    """With eval.mask_selection=auto a lone point is decoded with 3 masks in training, as at
    evaluation, so the IoU-head outputs of tokens 1-3 (which auto ranks) get gradients; a box
    keeps the single mask (token 0)."""
    from sam_ft.train import build_loss, train_multimask

    model = _tiny()
    module = _module(model, "auto")
    module.multimask_output = train_multimask(_cfg("auto"), model)
    module.loss = build_loss(_cfg("auto"))
    assert module.loss.iou_weight == 1.0
    image, masks = _scene()
    prompts = [Prompt(points=[[28, 30]], point_labels=[1]), Prompt(box=[48, 8, 74, 24])]
    with torch.no_grad():
        emb = model.encode(model.preprocess(image)[None])
    batch = {
        "embedding": emb,
        "prompts": [prompts],
        "original_size": [(H, W)],
        "target": [torch.from_numpy(masks).float()],
        "case": ["c"],
    }
    logits, iou = module._decode_all(emb, [prompts], [(H, W)])
    with torch.no_grad():
        want_point, _ = model.decode(emb[0], prompts[:1], (H, W), True)
        want_box, _ = model.decode(emb[0], prompts[1:], (H, W), False)
    torch.testing.assert_close(logits[0], want_point[0])
    for k in range(3):
        torch.testing.assert_close(logits[1, k], want_box[0, 0])
    model.zero_grad()
    module.training_step(batch, 0).backward()
    last = model.sam.mask_decoder.iou_prediction_head.layers[-1].weight.grad  # (4, hidden)
    assert (last[1:].abs().sum(dim=1) > 0).all()  # tokens 1-3: the outputs auto ranks


def test_auto_selection_warns_when_no_training_prompt_is_ranked(caplog):
    from sam_ft.train import train_multimask

    model = _tiny()
    module = _module(model, "auto")
    module.multimask_output = train_multimask(_cfg("auto"), model)
    image, masks = _scene()
    with torch.no_grad():
        emb = model.encode(model.preprocess(image)[None])
    module._decode_all(emb, [[Prompt(box=[48, 8, 74, 24])]], [(H, W)])  # boxes only
    with caplog.at_level("WARNING"):
        module.on_train_end()
    assert "no training prompt was a single point" in caplog.text
    caplog.clear()
    module._decode_all(emb, [[Prompt(points=[[28, 30]], point_labels=[1])]], [(H, W)])
    module.on_train_end()
    assert "single point" not in caplog.text
