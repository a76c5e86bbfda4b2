"""SAM's mask decoder for N prompts on one image, rewritten around the few prompt tokens.

Without a mask prompt the dense prompt embedding is one learned vector, so all N prompts of an
image start from the same image tokens. ``MaskDecoder.predict_masks`` copies them per prompt
and runs every projection on (N, hw, C) image tokens. This module computes the same function
with the work reassociated around the T prompt tokens (T = 5 output tokens + the point/box
tokens, at most 16 in the study's prompts), which are far fewer than the hw = 4096 image tokens:

- token-to-image attention: the scores q_h k_h^T = (q_h W_k,h) (x + pe)^T and the output
  softmax(.) (x W_v,h^T) = (softmax(.) x) W_v,h^T, so no (N, hw, C/2) keys or values are made
  (the key bias only shifts each score row, which softmax ignores; the rows of the attention
  sum to one, which carries the value bias through);
- image-to-token attention: the scores (x + pe) (W_q,h^T k_h^T), in the (N, heads, T, hw)
  layout where the softmax over T runs along rows, and the output projection folded into the
  values, (attn_h v_h) W_o,h^T = attn_h (v_h W_o,h^T), so no (N, hw, C/2) queries are made;
- the final token-to-image attention only for the tokens that are read out (the IoU token
  and the returned mask tokens);
- the output upscaling's two 2x2 stride-2 transposed convolutions as matrix products on
  channels-last pixels (they do not overlap), with the channel LayerNorm as ``layer_norm``;
  the masks are put in (row, col) order once, at the end.

The first block's image tokens are shared by all prompts, so their projections are made once
per image (:func:`image_side`) and reused by every call of :func:`decode_prompts`. Each rewrite
costs heads x T per image token where the original costs C/2, so it is used when
heads x T <= C/2 (every prompt of the study); longer prompts go through ``MaskDecoder``.
Same weights, same function, results equal up to float rounding, values and gradients
(``tests/test_decoder.py`` against ``MaskDecoder.forward``); weights whose gradient is zero
through SAM's code (the token-to-image key biases, the mask head that is not returned) get none.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from segment_anything.modeling.mask_decoder import MaskDecoder
from segment_anything.modeling.transformer import Attention


def fits_token_path(decoder: MaskDecoder, num_sparse: int) -> bool:
    """Whether prompts with ``num_sparse`` point/box tokens take this module's path."""
    attn = decoder.transformer.layers[0].cross_attn_image_to_token
    tokens = 1 + decoder.num_mask_tokens + num_sparse
    return attn.num_heads * tokens <= attn.internal_dim


def _heads_first(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(..., L, heads*d) -> (heads, prod(...)*L, d)."""
    return x.reshape(-1, heads, x.shape[-1] // heads).transpose(0, 1)


@dataclass
class ImageSide:
    """What the decoder computes from one image before any prompt: shared by all its prompts.

    Attributes:
        keys: (1, hw, C) image tokens (embedding + no-mask dense embedding), (row, col) order.
        key_pe: (1, hw, C) their dense positional encoding.
        t2i_k, t2i_v: (heads, hw, d) the first block's token-to-image keys and values.
        i2t_q: (heads, hw, d) the first block's image-to-token queries.
        size: (h, w) of the embedding grid.
    """

    keys: torch.Tensor
    key_pe: torch.Tensor
    t2i_k: torch.Tensor
    t2i_v: torch.Tensor
    i2t_q: torch.Tensor
    size: tuple[int, int]


def image_side(
    decoder: MaskDecoder, image_embedding: torch.Tensor, image_pe: torch.Tensor, dense: torch.Tensor
) -> ImageSide:
    """The per-image part of the decoder, for prompts without a mask prompt.

    Args:
        image_embedding: (1, C, h, w).
        image_pe: (1, C, h, w) dense positional encoding.
        dense: (1, C, h, w) dense prompt embedding (the learned no-mask vector), or an expanded
            (N, C, h, w) view of it.
    """
    _, _, h, w = image_embedding.shape
    keys = (image_embedding + dense[:1]).flatten(2).transpose(1, 2)
    key_pe = image_pe.flatten(2).transpose(1, 2)
    keys_pe = keys + key_pe
    first = decoder.transformer.layers[0]
    t2i, i2t = first.cross_attn_token_to_image, first.cross_attn_image_to_token
    return ImageSide(
        keys=keys,
        key_pe=key_pe,
        t2i_k=_heads_first(t2i.k_proj(keys_pe), t2i.num_heads),
        t2i_v=_heads_first(t2i.v_proj(keys), t2i.num_heads),
        i2t_q=_heads_first(i2t.q_proj(keys_pe), i2t.num_heads),
        size=(h, w),
    )


def _shared_token_to_image(
    attn: Attention, q_in: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """``attn`` of (N, T, C) query tokens on shared projected keys and values (heads, hw, d),
    heads batched (no per-prompt copies of them). Returns (N, T, C) after ``out_proj``."""
    n, t, _ = q_in.shape
    heads, d = attn.num_heads, attn.internal_dim // attn.num_heads
    q = _heads_first(attn.q_proj(q_in) * d**-0.5, heads)  # (heads, N*T, d)
    weights = torch.softmax(q @ k.transpose(1, 2), dim=-1)
    return attn.out_proj((weights @ v).transpose(0, 1).reshape(n, t, heads * d))


def _token_to_image(
    attn: Attention,
    q_in: torch.Tensor,
    keys: torch.Tensor,
    key_pe: torch.Tensor,
    keys_pe: torch.Tensor | None = None,
) -> torch.Tensor:
    """``attn(q=q_in, k=keys + key_pe, v=keys)`` for T query tokens and per-prompt image tokens.

    The key projection is folded into the queries and the value projection applied after the
    attention (the rows of the weights sum to one, which carries the value bias; the key bias
    shifts each score row, which softmax ignores).

    Args:
        q_in: (N, T, C) query tokens (positional encoding added).
        keys: (N, hw, C) image tokens.
        key_pe: (1, hw, C) their positional encoding.
        keys_pe: ``keys + key_pe`` when the caller has it.

    Returns:
        (N, T, C), after ``out_proj``.
    """
    n, t, c = q_in.shape
    heads, d = attn.num_heads, attn.internal_dim // attn.num_heads
    q = (attn.q_proj(q_in) * d**-0.5).view(n, t, heads, d)
    w_k = attn.k_proj.weight.view(heads, d, c)
    q_k = torch.einsum("nthd,hdc->nhtc", q, w_k).reshape(n, heads * t, c)
    if keys_pe is not None:
        scores = q_k @ keys_pe.transpose(1, 2)
    else:  # the positional part as its own product: cheaper than a pass over (N, hw, C)
        pe_part = (q_k.reshape(-1, c) @ key_pe[0].T).view(n, heads * t, -1)
        scores = torch.baddbmm(pe_part, q_k, keys.transpose(1, 2))
    weights = torch.softmax(scores, dim=-1)  # (N, heads*T, hw)
    context = (weights @ keys).view(n, heads, t, c)
    w_v = attn.v_proj.weight.view(heads, d, c)
    out = torch.einsum("nhtc,hdc->nthd", context, w_v).reshape(n, t, heads * d)
    return attn.out_proj(out + attn.v_proj.bias)


def _image_to_token(
    attn: Attention,
    keys: torch.Tensor,
    k_in: torch.Tensor,
    v_in: torch.Tensor,
    *,
    q: torch.Tensor | None = None,
    keys_pe: torch.Tensor | None = None,
) -> torch.Tensor:
    """``keys + attn(q=keys + key_pe, k=k_in, v=v_in)``: the image tokens' residual update.

    Args:
        keys: (B, hw, C) image tokens, B = 1 (shared by all prompts) or N.
        k_in, v_in: (N, T, C) prompt tokens with and without their positional encoding.
        q: (heads, hw, d) projected queries of shared image tokens, or
        keys_pe: (N, hw, C) per-prompt image tokens plus positional encoding, whose query
            projection is then folded into the T prompt tokens instead.

    Returns:
        (N, hw, C) updated image tokens (before the block's LayerNorm).
    """
    n, t, c = k_in.shape
    heads, d = attn.num_heads, attn.internal_dim // attn.num_heads
    k = attn.k_proj(k_in) * d**-0.5
    if q is not None:
        scores = _heads_first(k, heads) @ q.transpose(1, 2)  # (heads, N*T, hw)
        scores = scores.view(heads, n, t, -1).transpose(0, 1)
    else:
        k = k.view(n, t, heads, d)
        w_q = attn.q_proj.weight.view(heads, d, c)
        k_q = torch.einsum("nthd,hdc->nhtc", k, w_q).reshape(n, heads * t, c)
        k_bias = torch.einsum("nthd,hd->nht", k, attn.q_proj.bias.view(heads, d))
        scores = torch.baddbmm(k_bias.reshape(n, heads * t, 1), k_q, keys_pe.transpose(1, 2))
        scores = scores.view(n, heads, t, -1)
    # Softmax over each head's T tokens, in a (N, heads, T, hw) layout that runs along rows.
    weights = torch.softmax(scores, dim=2).reshape(n, heads * t, -1)
    v = attn.v_proj(v_in).view(n, t, heads, d)
    w_o = attn.out_proj.weight.view(c, heads, d)
    v_o = torch.einsum("nthd,chd->nhtc", v, w_o).reshape(n, heads * t, c)
    # Each head's weights sum to one, so out_proj's bias rides on the values, 1/heads per head.
    v_o = v_o + attn.out_proj.bias / heads
    update = torch.bmm(weights.transpose(1, 2), v_o)
    # In place where the dtypes agree (baddbmm would first copy the keys: a slower extra pass);
    # under autocast the bf16 update joins the float32 residual stream as in SAM.
    return update.add_(keys) if update.dtype == keys.dtype else keys + update


def _upscale(decoder: MaskDecoder, keys: torch.Tensor, hyper: torch.Tensor, hw: tuple[int, int]):
    """``output_upscaling`` and the hypernetwork product on channels-last image tokens.

    Args:
        keys: (N, h*w, C) image tokens, (row, col) raster order.
        hyper: (N, M, C/8) hypernetwork outputs of the M returned mask tokens.

    Returns:
        (N, M, 4h, 4w) mask logits.
    """
    conv1, norm, act1, conv2, act2 = decoder.output_upscaling
    h, w = hw
    c1, c2 = conv1.out_channels, conv2.out_channels
    # Weights (in, out, kh, kw) -> (in, kh*kw*out): each input pixel owns a 2x2 output patch.
    w1 = conv1.weight.permute(0, 2, 3, 1).reshape(conv1.in_channels, 4 * c1)
    w2 = conv2.weight.permute(0, 2, 3, 1).reshape(c1, 4 * c2)
    b1, b2 = conv1.bias.repeat(4), conv2.bias.repeat(4)
    # A prompt's (16hw, C/8) upscaled embedding is 8 MiB at hw = 64 x 64; glibc returns blocks
    # of 32 MiB and more to the OS when freed, and every new one then page-faults in again at a
    # fraction of the speed, so the prompts go through one at a time.
    out = []
    for x, hyp in zip(keys, hyper, strict=True):
        x = torch.addmm(b1, x, w1).view(-1, c1)  # pixels (i, j, a, b): row 2i+a, col 2j+b
        x = act1(F.layer_norm(x.float(), (c1,), norm.weight, norm.bias, norm.eps).to(x.dtype))
        x = act2(torch.addmm(b2, x, w2)).view(-1, c2)  # pixels (i, j, a, b, a2, b2)
        out.append(hyp @ x.T)  # (M, pixels)
    # Pixels (i, j, a, b, a2, b2) sit at row 4i + 2a + a2, col 4j + 2b + b2: one reorder to
    # channels (a, a2, b, b2) and a 4x pixel shuffle (an 8-dim permute is 2x slower).
    n, m = len(out), hyper.shape[1]
    masks = torch.stack(out).view(n, m, h * w, 2, 2, 2, 2).permute(0, 1, 3, 5, 4, 6, 2)
    return F.pixel_shuffle(masks.reshape(n, m * 16, h, w), 4)


def decode_prompts(
    decoder: MaskDecoder, side: ImageSide, sparse: torch.Tensor, multimask_output: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The mask decoder for N prompts without mask prompts on one image.

    Args:
        side: the image's :func:`image_side`.
        sparse: (N, T', C) point/box embeddings; ``fits_token_path`` must hold for T'.

    Returns:
        mask logits (N, M, 4h, 4w) and IoU predictions (N, M), M = 3 or 1.
    """
    n = sparse.shape[0]
    tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat((tokens.unsqueeze(0).expand(n, -1, -1), sparse), dim=1)
    key_pe = side.key_pe

    transformer = decoder.transformer
    queries, keys = tokens, side.keys
    for i, layer in enumerate(transformer.layers):
        if layer.skip_first_layer_pe:
            queries = layer.self_attn(q=queries, k=queries, v=queries)
        else:
            q = queries + tokens
            queries = queries + layer.self_attn(q=q, k=q, v=queries)
        queries = layer.norm1(queries)
        t2i, i2t = layer.cross_attn_token_to_image, layer.cross_attn_image_to_token
        if i == 0:  # the image tokens are still the shared ones
            attn = _shared_token_to_image(t2i, queries + tokens, side.t2i_k, side.t2i_v)
        else:
            keys_pe = keys + key_pe
            attn = _token_to_image(t2i, queries + tokens, keys, key_pe, keys_pe)
        queries = layer.norm2(queries + attn)
        queries = layer.norm3(queries + layer.mlp(queries))
        if i == 0:
            keys = _image_to_token(i2t, keys, queries + tokens, queries, q=side.i2t_q)
        else:
            keys = _image_to_token(i2t, keys, queries + tokens, queries, keys_pe=keys_pe)
        keys = layer.norm4(keys)

    # Only the IoU token and the returned mask tokens are read after the final attention.
    first = 1 if multimask_output else 0
    count = decoder.num_mask_tokens - 1 if multimask_output else 1
    read = torch.tensor([0, *range(1 + first, 1 + first + count)], device=tokens.device)
    q_read = queries[:, read] + tokens[:, read]
    final = _token_to_image(transformer.final_attn_token_to_image, q_read, keys, key_pe)
    hs = transformer.norm_final_attn(queries[:, read] + final)

    mlps = decoder.output_hypernetworks_mlps[first : first + count]
    hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(mlps)], dim=1)
    masks = _upscale(decoder, keys, hyper, side.size)
    iou_pred = decoder.iou_prediction_head(hs[:, 0])[:, first : first + count]
    return masks, iou_pred


def decode_shared_image(
    decoder: MaskDecoder,
    image_embedding: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    multimask_output: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``decoder(image_embedding, image_pe, sparse, dense, multimask_output)`` for dense
    embeddings shared by all prompts (shapes as in ``MaskDecoder.forward``, image batch 1).

    Returns:
        mask logits (N, M, 4h, 4w) and IoU predictions (N, M), M = 3 or 1.
    """
    if not fits_token_path(decoder, sparse.shape[1]):
        return decoder(image_embedding, image_pe, sparse, dense, multimask_output)
    side = image_side(decoder, image_embedding, image_pe, dense)
    return decode_prompts(decoder, side, sparse, multimask_output)
