"""SAM's mask decoder for N prompts on one image, with the image-side work done once.

``MaskDecoder.predict_masks`` copies the (C, h, w) image embedding and its positional encoding
once per prompt and then projects every copy. Without a mask prompt the dense prompt embedding
is the same learned vector for every prompt, so until the first image-to-token attention the
image tokens are identical for all N prompts: the token-to-image keys and values and the
image-to-token queries of the first block are computed here once, on a batch of 1, and
broadcast over the prompts. From then on the image tokens differ per prompt and the official
modules run unchanged. Same weights, same operations, same results up to float rounding
(checked against ``MaskDecoder.forward`` in ``tests/test_decoder.py``).
"""

from __future__ import annotations

import math

import torch
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention


def _attend(attn: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``Attention.forward`` on already projected q (Bq, Nq, c), k and v (Bk, Nk, c), where the
    batch sizes broadcast (one of them may be 1). Returns (B, Nq, C) after ``out_proj``."""
    q = attn._separate_heads(q, attn.num_heads)
    k = attn._separate_heads(k, attn.num_heads)
    v = attn._separate_heads(v, attn.num_heads)
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    out = torch.softmax(scores, dim=-1) @ v
    return attn.out_proj(attn._recombine_heads(out))


def decode_shared_image(
    decoder: MaskDecoder,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``decoder(image_embedding, image_pe, sparse, dense, multimask_output)`` for dense
    embeddings shared by all prompts.

    Args:
        image_embedding: (1, C, h, w).
        image_pe: (1, C, h, w) dense positional encoding.
        sparse: (N, T, C) point/box embeddings of N prompts.
        dense: (1, C, h, w) or an expanded (N, C, h, w) view of it (no mask prompts).

    Returns:
        mask logits (N, M, 4h, 4w) and IoU predictions (N, M), M = 3 or 1.
    """
    n = sparse.shape[0]
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
    _, c, h, w = image_embedding.shape
    keys = (image_embedding + dense[:1]).flatten(2).transpose(1, 2)  # (1, hw, C)
    key_pe = image_pe.flatten(2).transpose(1, 2)  # (1, hw, C)

    transformer = decoder.transformer
    first, rest = transformer.layers[0], transformer.layers[1:]
    # First block (it skips the query positional encoding in self-attention).
    queries = first.norm1(first.self_attn(q=tokens, k=tokens, v=tokens))
    t2i = first.cross_attn_token_to_image
    attn = _attend(
        t2i, t2i.q_proj(queries + tokens), t2i.k_proj(keys + key_pe), t2i.v_proj(keys)
    )  # shared keys and values: computed for one image, broadcast over the prompts
    queries = first.norm2(queries + attn)
    queries = first.norm3(queries + first.mlp(queries))
    i2t = first.cross_attn_image_to_token
    attn = _attend(
        i2t, i2t.q_proj(keys + key_pe), i2t.k_proj(queries + tokens), i2t.v_proj(queries)
    )  # (N, hw, C): from here on the image tokens are per prompt
    keys = first.norm4(keys + attn)
    for layer in rest:
        queries, keys = layer(queries=queries, keys=keys, query_pe=tokens, key_pe=key_pe)
    final = transformer.final_attn_token_to_image
    queries = queries + final(q=queries + tokens, k=keys + key_pe, v=keys)
    hs = transformer.norm_final_attn(queries)

    # The rest of MaskDecoder.predict_masks and forward, unchanged.
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(n, c, h, w))
    mask_tokens = hs[:, 1 : 1 + decoder.num_mask_tokens]
    hyper_in = torch.stack(
        [mlp(mask_tokens[:, i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], dim=1
    )
    _, c_up, h_up, w_up = upscaled.shape
    masks = (hyper_in @ upscaled.view(n, c_up, h_up * w_up)).view(n, -1, h_up, w_up)
    iou_pred = decoder.iou_prediction_head(hs[:, 0])
    selection = slice(1, None) if multimask_output else slice(0, 1)
    return masks[:, selection], iou_pred[:, selection]
