"""The shared-image decoder path equals SAM's ``MaskDecoder.forward``, values and gradients."""

from __future__ import annotations

import pytest
import torch

from sam_ft.model.builders import build_sam_architecture
from sam_ft.model.decoder import (
    decode_prompts,
    decode_shared_image,
    fits_token_path,
    image_side,
)


@pytest.fixture(scope="module")
def sam():
    torch.manual_seed(0)
    return build_sam_architecture("tiny")


def _inputs(sam, n: int, with_points: bool):
    torch.manual_seed(n)
    side = sam.prompt_encoder.input_image_size[0]
    boxes = torch.sort(torch.rand(n, 2, 2) * side, dim=1).values.reshape(n, 4)
    points = None
    if with_points:
        points = (torch.rand(n, 3, 2) * side, torch.randint(0, 2, (n, 3)))
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    c, (h, w) = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, c, h, w, requires_grad=True)
    return embedding, sam.prompt_encoder.get_dense_pe(), sparse, dense


@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("with_points", [False, True])
def test_same_masks_and_iou_as_mask_decoder(sam, n, multimask, with_points):
    embedding, pe, sparse, dense = _inputs(sam, n, with_points)
    ref_masks, ref_iou = sam.mask_decoder(embedding, pe, sparse, dense, multimask)
    masks, iou = decode_shared_image(sam.mask_decoder, embedding, pe, sparse, dense, multimask)
    assert masks.shape == ref_masks.shape == (n, 3 if multimask else 1, *ref_masks.shape[2:])
    torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)


def test_same_gradients_as_mask_decoder(sam):
    """Training goes through this path: every decoder weight and the embedding get the same
    gradient as through SAM's own forward. Weights whose true gradient is zero (the key biases
    of token-to-image attention, which softmax ignores, and the unreturned mask token's head)
    may get ``None`` here where SAM's forward gives zeros or rounding noise."""
    embedding, pe, sparse, dense = _inputs(sam, 4, with_points=True)
    params = [embedding, *sam.mask_decoder.parameters()]

    def grads(fn):
        masks, iou = fn(embedding, pe, sparse, dense, True)
        loss = masks.sigmoid().mean() + iou.square().mean()
        return torch.autograd.grad(loss, params, allow_unused=True)

    ref = grads(sam.mask_decoder)
    got = grads(lambda *a: decode_shared_image(sam.mask_decoder, *a))
    assert got[0] is not None  # the embedding trains through this path (encoder finetuning)
    for p, r, g in zip(params, ref, got, strict=True):
        r = torch.zeros_like(p) if r is None else r
        g = torch.zeros_like(p) if g is None else g
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-4)


def test_prompts_too_long_for_the_token_path_use_mask_decoder(sam):
    """heads x T > C/2 (12 points and a padding point: T = 5 + 13) falls back to SAM's code."""
    torch.manual_seed(3)
    side = sam.prompt_encoder.input_image_size[0]
    points = (torch.rand(2, 12, 2) * side, torch.randint(0, 2, (2, 12)))
    sparse, dense = sam.prompt_encoder(points=points, boxes=None, masks=None)
    assert not fits_token_path(sam.mask_decoder, sparse.shape[1])
    c, (h, w) = sam.prompt_encoder.embed_dim, sam.prompt_encoder.image_embedding_size
    embedding = torch.randn(1, c, h, w)
    pe = sam.prompt_encoder.get_dense_pe()
    ref_masks, ref_iou = sam.mask_decoder(embedding, pe, sparse, dense, True)
    masks, iou = decode_shared_image(sam.mask_decoder, embedding, pe, sparse, dense, True)
    torch.testing.assert_close(masks, ref_masks)
    torch.testing.assert_close(iou, ref_iou)


def test_one_image_side_serves_every_call(sam):
    """The per-image part is made once and reused by calls of different prompt structures."""
    embedding, pe, boxes_only, dense = _inputs(sam, 3, with_points=False)
    _, _, with_points, _ = _inputs(sam, 3, with_points=True)
    side = image_side(sam.mask_decoder, embedding, pe, dense)
    for sparse in (boxes_only, with_points):
        ref_masks, ref_iou = sam.mask_decoder(embedding, pe, sparse, dense, True)
        masks, iou = decode_prompts(sam.mask_decoder, side, sparse, True)
        torch.testing.assert_close(masks, ref_masks, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(iou, ref_iou, atol=1e-5, rtol=1e-5)
