"""SDPA attention equals segment_anything's Attention: outputs, gradients, state-dict keys."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from segment_anything.modeling.image_encoder import Attention, Block
from wrapped_sam import wrap_sam

from sam_ft.model.attention import SdpaAttention, use_original_attention, use_sdpa_attention
from sam_ft.model.builders import SPECS, build_sam_architecture
from sam_ft.prompts.types import Prompt


def _randomise(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    # rel_pos is zero-initialised: random values make the bias (the part that differs) count.
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return module


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, name: str = "") -> None:
    # Gradients of parameters sum over every token: compare relative to the tensor's scale.
    scale = max(1.0, expected.abs().max().item())
    assert (actual - expected).abs().max().item() <= 1e-5 * scale, name


def _pair(dim: int, heads: int, window: int, grid: int):
    """(official, sdpa) ``Block``s with identical random weights, as in the image encoder."""
    block = Block(
        dim=dim,
        num_heads=heads,
        use_rel_pos=True,
        window_size=window,
        input_size=(grid, grid),
    )
    official = _randomise(block)
    sdpa = copy.deepcopy(official)
    assert use_sdpa_attention(sdpa) == 1
    return official, sdpa


# tiny: 2 heads of 48 at window 8 / global 16x16; vit_b-shaped: 12 heads of 64 on a small grid,
# windowed (window 14 on a 20x20 grid, so windows are padded) and global.
CASES = {
    "tiny_window": (SPECS["tiny"].encoder_embed_dim, 2, 8, 16),
    "tiny_global": (SPECS["tiny"].encoder_embed_dim, 2, 0, 16),
    "vit_b_window": (768, 12, 14, 20),
    "vit_b_global": (768, 12, 0, 10),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sdpa_block_equals_official_with_gradients(case):
    dim, heads, window, grid = CASES[case]
    official, sdpa = _pair(dim, heads, window, grid)
    x = torch.randn(2, grid, grid, dim, generator=torch.Generator().manual_seed(1))
    x_ref, x_new = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ref, out_new = official(x_ref), sdpa(x_new)
    torch.testing.assert_close(out_new, out_ref, atol=1e-5, rtol=1e-5)

    weight = torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(2))
    (out_ref * weight).sum().backward()
    (out_new * weight).sum().backward()
    _assert_close(x_new.grad, x_ref.grad)
    params_ref = dict(official.named_parameters())
    for name, p in sdpa.named_parameters():
        assert p.grad is not None, name
        _assert_close(p.grad, params_ref[name].grad, name)
    # The rel-pos tables learn through the bias: their gradient must not be trivially zero.
    assert sdpa.attn.rel_pos_h.grad.abs().max() > 0


def test_without_rel_pos_is_plain_attention():
    official = _randomise(Attention(64, num_heads=4, use_rel_pos=False))
    sdpa = copy.deepcopy(official)
    use_sdpa_attention(sdpa)
    x = torch.randn(3, 5, 7, 64)
    torch.testing.assert_close(sdpa(x), official(x), atol=1e-5, rtol=1e-5)


def test_swap_keeps_state_dict_and_is_idempotent():
    sam = build_sam_architecture("tiny")
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    assert use_sdpa_attention(sam) == SPECS["tiny"].encoder_depth
    assert use_sdpa_attention(sam) == 0
    after = sam.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], before[k]) for k in before)
    # Official weights load strictly into the swapped model and back.
    sam.load_state_dict(before, strict=True)
    assert use_original_attention(sam) == SPECS["tiny"].encoder_depth


def test_tiny_encoder_embedding_equals_official():
    torch.manual_seed(0)
    sam = _randomise(build_sam_architecture("tiny"))
    images = torch.randn(2, 3, 256, 256, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = sam.image_encoder(images)
        use_sdpa_attention(sam)
        ours = sam.image_encoder(images)
    assert all(type(b.attn) is SdpaAttention for b in sam.image_encoder.blocks)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_trainable_sam_uses_sdpa_and_keeps_keys():
    sam = build_sam_architecture("tiny")
    keys = list(sam.state_dict())
    model = wrap_sam(sam)
    assert all(type(b.attn) is SdpaAttention for b in model.sam.image_encoder.blocks)
    assert list(model.sam.state_dict()) == keys


def test_encoder_gradients_with_checkpointing_match_without():
    torch.manual_seed(0)
    base = _randomise(build_sam_architecture("tiny"))
    plain = wrap_sam(copy.deepcopy(base)).train()
    ckpt = wrap_sam(copy.deepcopy(base), grad_checkpointing=True).train()
    images = torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(4))
    for model in (plain, ckpt):
        model.encode(images).square().mean().backward()
    grads = dict(ckpt.sam.image_encoder.named_parameters())
    for name, p in plain.sam.image_encoder.named_parameters():
        _assert_close(grads[name].grad, p.grad, name)


def test_sdpa_encoder_compiles_without_graph_breaks():
    # aot_eager traces like inductor but skips code generation: seconds, no C++ compiler needed.
    model = wrap_sam(build_sam_architecture("tiny", image_size=64)).eval()
    keys = list(model.state_dict())
    images = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = model.encode(images)
        model.sam.image_encoder.compile(backend="aot_eager", fullgraph=True)
        out = model.encode(images)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == keys


def test_encode_stays_float32_on_cpu():
    model = wrap_sam(build_sam_architecture("tiny")).eval()
    for p in model.sam.image_encoder.parameters():
        p.requires_grad_(False)
    emb = model.encode(torch.zeros(1, 3, 256, 256))
    assert emb.dtype == torch.float32
    assert not model.encodes_in_bf16(torch.zeros(1).device)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sdpa_and_bf16_encode_close_to_official():
    torch.manual_seed(0)
    sam = build_sam_architecture("tiny").cuda()
    images = torch.randn(2, 3, 256, 256, device="cuda")
    with torch.no_grad():
        ref = sam.image_encoder(images)
        model = wrap_sam(sam).eval()
        fp32 = wrap_sam(sam, encoder_bf16=False).encode(images)
        mixed = model.encode(images)
    torch.testing.assert_close(fp32, ref, atol=1e-4, rtol=1e-4)
    assert mixed.dtype == torch.float32
    if torch.cuda.is_bf16_supported():
        # bf16 keeps ~3 significant digits: relative error of the embedding, not bit equality.
        rel = (mixed - ref).norm() / ref.norm()
        assert rel < 2e-2, rel.item()
        image = np.zeros((100, 120, 3), np.uint8)
        masks, _, _ = model.predict(image, [Prompt(box=[10, 10, 60, 80])], True)
        assert masks.dtype == torch.float32
