"""SAM's image-encoder attention through ``F.scaled_dot_product_attention`` (SDPA).

The official ``Attention`` materialises the (B*heads, L, L) score matrix, adds the decomposed
relative position bias to it, and applies softmax in separate ops. Here the bias is built once
and handed to SDPA as an additive ``attn_mask``: the same attention, fused into one kernel
(memory-efficient or cuDNN on GPU, a fused CPU kernel otherwise).

``use_sdpa_attention`` swaps the class of each ``Attention`` in place: parameters, buffers and
state-dict keys stay those of the official module, so checkpoints load strictly and exports
stay in the official format.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch import nn


def decomposed_rel_pos_bias(
    q: torch.Tensor,
    rel_pos_h: torch.Tensor,
    rel_pos_w: torch.Tensor,
    q_size: tuple[int, int],
    k_size: tuple[int, int],
) -> torch.Tensor:
    """The term ``add_decomposed_rel_pos`` adds to the scores, as an additive attention mask.

    Args:
        q: (B, heads, q_h * q_w, C) queries, NOT scaled (as in the official code).
        rel_pos_h: (2 * q_h - 1, C) height-axis embeddings (interpolated if sizes differ).
        rel_pos_w: (2 * q_w - 1, C) width-axis embeddings.
        q_size: (q_h, q_w) query grid.
        k_size: (k_h, k_w) key grid.

    Returns:
        (B, heads, q_h * q_w, k_h * k_w) bias, bias[.., (i, j), (m, n)] = rel_h[i, j, m] +
        rel_w[i, j, n], in the dtype of ``q``.
    """
    (q_h, q_w), (k_h, k_w) = q_size, k_size
    r_h = get_rel_pos(q_h, k_h, rel_pos_h)  # (q_h, k_h, C)
    r_w = get_rel_pos(q_w, k_w, rel_pos_w)  # (q_w, k_w, C)
    b, heads, _, dim = q.shape
    r_q = q.reshape(b, heads, q_h, q_w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, r_h.to(q.dtype))
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, r_w.to(q.dtype))
    bias = rel_h[:, :, :, :, :, None] + rel_w[:, :, :, :, None, :]
    return bias.reshape(b, heads, q_h * q_w, k_h * k_w)


class SdpaAttention(Attention):
    """``segment_anything`` ``Attention`` computed with SDPA; same parameters and keys."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H, W, dim) tokens of one window (or the whole grid) -> (B, H, W, dim)."""
        b, h, w, _ = x.shape
        # (3, B, heads, H*W, head_dim): SDPA wants heads as a batch dim, not folded into B.
        qkv = self.qkv(x).reshape(b, h * w, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        bias = None
        if self.use_rel_pos:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, (h, w), (h, w))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=self.scale)
        return self.proj(out.transpose(1, 2).reshape(b, h, w, -1))


def use_sdpa_attention(module: nn.Module) -> int:
    """Make every official ``Attention`` inside ``module`` an ``SdpaAttention``, in place.

    Returns:
        how many modules were swapped (0 if already done: the call is idempotent).
    """
    count = 0
    for sub in module.modules():
        if type(sub) is Attention:
            sub.__class__ = SdpaAttention  # same parameters, same state-dict keys
            count += 1
    return count


def use_original_attention(module: nn.Module) -> int:
    """Undo ``use_sdpa_attention`` (benchmarks and parity tests compare the two)."""
    count = 0
    for sub in module.modules():
        if type(sub) is SdpaAttention:
            sub.__class__ = Attention
            count += 1
    return count
