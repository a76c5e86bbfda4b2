"""Each finetuning mode trains exactly the intended parameters, and a step changes only those."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_ft.defaults import build_from_yaml
from sam_ft.model.builders import build_sam_architecture
from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.types import Prompt


def _expected(name: str, mode: str, depth: int = 2) -> bool:
    if name.startswith("sam.mask_decoder."):
        return True
    if mode == "full":
        return True
    if mode == "decoder_prompt":
        return name.startswith("sam.prompt_encoder.")
    if mode == "encoder_last_n":  # last_n=1 in this test
        return name.startswith(
            (f"sam.image_encoder.blocks.{depth - 1}.", "sam.image_encoder.neck.")
        )
    if mode == "lora":
        return name.endswith((".lora_a", ".lora_b"))
    return False


def _model(mode: str):
    torch.manual_seed(0)
    model = TrainableSam(build_sam_architecture("tiny"))
    build_from_yaml("finetune", mode, last_n=1).apply(model)
    return model


@pytest.mark.parametrize("mode", ["decoder", "decoder_prompt", "encoder_last_n", "lora", "full"])
def test_trainable_parameters_by_name(mode):
    model = _model(mode)
    for name, param in model.named_parameters():
        assert param.requires_grad == _expected(name, mode), name


@pytest.mark.parametrize("mode", ["decoder", "encoder_last_n", "lora", "full"])
def test_step_changes_only_trainable(mode):
    model = _model(mode).train()
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    image = np.random.default_rng(0).integers(0, 255, (70, 90, 3), dtype=np.uint8)
    for _ in range(2):  # two steps, so LoRA's A moves once B is non-zero
        emb = model.encode(model.preprocess(image)[None])[0]
        logits, iou = model.decode(emb, [Prompt(box=[10, 10, 50, 40])], (70, 90))
        opt.zero_grad()
        (logits.sigmoid().mean() + iou.mean()).backward()
        opt.step()
    for name, param in model.named_parameters():
        changed = not torch.equal(before[name], param.detach())
        if not _expected(name, mode):
            assert not changed, f"{name} is frozen but changed"
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())]
    assert changed and all(_expected(n, mode) for n in changed)


def test_frozen_modules_stay_in_eval_mode():
    model = _model("decoder").train()
    assert model.sam.mask_decoder.training
    assert not model.sam.image_encoder.training
    assert not model.sam.prompt_encoder.training
    assert model.encoder_frozen
    model = _model("encoder_last_n").train()
    assert (
        model.sam.image_encoder.blocks[1].training
        and not model.sam.image_encoder.blocks[0].training
    )
    assert not model.encoder_frozen


def test_grad_checkpointing_gives_same_gradients():
    grads = []
    for flag in (False, True):
        model = _model("full").train()
        model.grad_checkpointing = flag
        image = np.full((64, 64, 3), 100, np.uint8)
        model.encode(model.preprocess(image)[None]).square().mean().backward()
        grads.append(model.sam.image_encoder.blocks[0].mlp.lin1.weight.grad.clone())
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_encoder_params_get_lower_lr():
    model = _model("encoder_last_n")
    groups = build_from_yaml(
        "finetune", "encoder_last_n", last_n=1, encoder_lr_scale=0.1
    ).param_groups(model, 1e-4)
    lrs = {g["name"]: g["lr"] for g in groups}
    assert lrs == {"decoder": 1e-4, "encoder": pytest.approx(1e-5)}


@pytest.mark.parametrize("mode", ["lora", "full"])
def test_only_pretrained_encoder_weights_get_the_encoder_lr_scale(mode):
    # LoRA adapters live under the image encoder but are new: they learn at the base rate.
    model = _model(mode)
    finetune = build_from_yaml("finetune", mode, encoder_lr_scale=0.1)
    lr_of = {}
    ids = {id(p): n for n, p in model.named_parameters()}
    for group in finetune.param_groups(model, 1e-4):
        for param in group["params"]:
            lr_of[ids[id(param)]] = group["lr"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(lr_of) == trainable  # every trainable parameter in exactly one group
    for name, lr in lr_of.items():
        if name.endswith((".lora_a", ".lora_b")) or not name.startswith("sam.image_encoder."):
            assert lr == 1e-4, name
        else:
            assert lr == pytest.approx(1e-5), name
    assert any(".lora_" in n for n in lr_of) == (mode == "lora")
    assert any(n.startswith("sam.image_encoder.") and lr < 1e-4 for n, lr in lr_of.items()) == (
        mode == "full"
    )
