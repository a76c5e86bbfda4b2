"""SAM-HQ (Ke et al., "Segment Anything in High Quality", NeurIPS 2023; SysCV/sam-hq): SAM's
ViT and prompt encoder with ``MaskDecoderHQ`` from the ``segment-anything-hq`` package (the
``samhq`` extra), which installs the module ``segment_anything_hq`` beside ``segment_anything``.

The HQ decoder adds an output token (``hf_token``, ``hf_mlp``) and three fusion layers
(``compress_vit_feat``, ``embedding_encoder``, ``embedding_maskfeature``) that also read the ViT's
features after its FIRST global-attention block. Our encoder (segment_anything's ViT, the same
weights and state-dict keys as SAM-HQ's) therefore returns both, as one tensor:

    embedding (B, 256 + D, h, w) = cat(neck output (B, 256, h, w),
                                       early ViT features (B, D, h, w), channels first)

(D = the ViT width), so the embedding cache, the engine and training carry it unchanged, and
``TrainableSamHQ.decode`` splits it. The decoder returns ONE mask per prompt (``multimask_output``
of the model is False): ``hq_token_only=False`` (the official default) adds SAM's mask token's
logits to the HQ token's, ``True`` keeps the HQ token's alone.

Finetuning: the HQ parts are submodules of ``mask_decoder``, so ``finetune=decoder`` trains them
and SAM's mask decoder; the SAM-HQ paper trains the HQ parts only (SAM's decoder frozen).
"""

from __future__ import annotations

import importlib.util
import warnings

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from sam_ft.errors import ConfigError
from sam_ft.model.specs import SamSpec
from sam_ft.model.trainable import LayerNorm2dFp32, TrainableSam

PACKAGE = "segment_anything_hq"
PIP_HINT = "pip install 'sam_ft[samhq]' (the segment-anything-hq package)"


def import_hq():
    """The ``segment_anything_hq`` package, or one line naming the extra to install."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise ConfigError(f"SAM-HQ models need the package segment-anything-hq: {PIP_HINT}")
    with warnings.catch_warnings():  # its TinyViT registers into timm's registry on import
        warnings.simplefilter("ignore")
        try:
            import segment_anything_hq
        except ImportError as err:  # e.g. timm, which it imports without declaring it
            raise ConfigError(f"segment-anything-hq does not import ({err}): {PIP_HINT}") from None
    return segment_anything_hq


def hq_mask_decoder(spec: SamSpec) -> nn.Module:
    """A random ``MaskDecoderHQ`` as ``segment_anything_hq.build_sam`` configures it."""
    modeling = import_hq().modeling
    embed = spec.prompt_embed_dim
    return modeling.MaskDecoderHQ(
        num_multimask_outputs=3,
        transformer=modeling.TwoWayTransformer(
            depth=2, embedding_dim=embed, mlp_dim=spec.decoder_mlp_dim, num_heads=8
        ),
        transformer_dim=embed,
        iou_head_depth=3,
        iou_head_hidden_dim=256,
        vit_dim=spec.encoder_embed_dim,
    )


class TrainableSamHQ(TrainableSam):
    """``TrainableSam`` for SAM-HQ: the encoder also returns the early ViT features, the decoder
    is ``MaskDecoderHQ`` (one mask per prompt). ``hq_token_only``: see the module docstring."""

    def __init__(self, sam, *args, hq_token_only: bool, **kwargs):
        super().__init__(sam, *args, **kwargs)
        self.hq_token_only = bool(hq_token_only)
        hq_norm = import_hq().modeling.common.LayerNorm2d
        for module in sam.mask_decoder.modules():
            if type(module) is hq_norm:  # the same module as SAM's: computed in float32 too
                module.__class__ = LayerNorm2dFp32

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) -> (B, 256 + D, S/16, S/16): ``ImageEncoderViT.forward`` (blocks
        recomputed in backward with ``grad_checkpointing``), keeping the first global block's
        output as SAM-HQ's ``interm_embeddings[0]``."""
        enc = self.sam.image_encoder
        recompute = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        x = enc.patch_embed(images)
        if enc.pos_embed is not None:
            x = x + enc.pos_embed
        early = None
        for block in enc.blocks:
            trains = recompute and any(p.requires_grad for p in block.parameters())
            x = checkpoint(block, x, use_reentrant=False) if trains else block(x)
            if early is None and block.window_size == 0:
                early = x
        embedding = enc.neck(x.permute(0, 3, 1, 2))
        return torch.cat([embedding, early.permute(0, 3, 1, 2).to(embedding.dtype)], dim=1)

    def decode(self, embedding, prompts, original_size, multimask_output: bool):
        """As ``TrainableSam.decode``, with M = 1 always: the HQ decoder's single mask, decoded
        as SAM-HQ's ``SamPredictor.predict(..., multimask_output=False)`` (its demo's setting;
        the official ``True`` picks SAM's part among its 3 masks, which is not offered here)."""
        return super().decode(embedding, prompts, original_size, False)

    def _decode_group(self, embedding, prompts, original_size, multimask_output, shared):
        decoder, pe = self.sam.mask_decoder, self.sam.prompt_encoder
        width = pe.embed_dim
        image, early = embedding[None, :width], embedding[None, width:]
        if not shared:  # the HQ features, once per image
            shared.append(decoder.embedding_encoder(image) + decoder.compress_vit_feat(early))
        sparse, dense = pe(**self._prompt_tensors(prompts, original_size, embedding.device))
        masks, iou = decoder.predict_masks(
            image_embeddings=image,
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            hq_features=shared[0],
        )
        # MaskDecoderHQ.forward's selection, with multimask_output=False (see ``decode``).
        masks_sam, iou = masks[:, :1], iou[:, :1]
        masks_hq = masks[:, decoder.num_mask_tokens - 1 : decoder.num_mask_tokens]
        return (masks_hq if self.hq_token_only else masks_sam + masks_hq), iou

    def _prompt_tensors(self, prompts, original_size, device) -> dict:
        """The prompt encoder's ``points``, ``boxes`` and ``masks`` for prompts of one structure,
        transformed as ``SamPredictor.predict`` does."""
        first = prompts[0]
        out: dict = {"points": None, "boxes": None, "masks": None}
        if first.points is not None:
            coords = np.stack([p.points for p in prompts])
            coords = self.transform.apply_coords(coords, original_size)
            labels = np.stack([p.point_labels for p in prompts])
            out["points"] = (
                torch.as_tensor(coords, dtype=torch.float32, device=device),
                torch.as_tensor(labels, dtype=torch.int64, device=device),
            )
        if first.box is not None:
            box = self.transform.apply_boxes(np.stack([p.box for p in prompts]), original_size)
            out["boxes"] = torch.as_tensor(box, dtype=torch.float32, device=device)
        if first.mask_logits is not None:
            masks = torch.stack([torch.as_tensor(p.mask_logits) for p in prompts])[:, None]
            out["masks"] = masks.to(device=device, dtype=torch.float32)
        return out
