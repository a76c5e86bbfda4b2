"""SAM split into a differentiable ``encode`` and a batched ``decode``.

``Sam.forward`` runs under ``torch.no_grad()``, so training calls the three parts directly. The
decode path mirrors ``SamPredictor.predict_torch`` call for call (same prompt encoder padding, same
decoder inputs, same postprocessing), which the parity test pins.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.common import LayerNorm2d
from torch import nn
from torch.utils.checkpoint import checkpoint

from sam_ft.model.attention import use_sdpa_attention
from sam_ft.model.backend import SegmentBackend, encoder_stages
from sam_ft.model.decoder import decode_prompts, fits_token_path, image_side
from sam_ft.model.preprocess_lite import make_transform
from sam_ft.prompts.types import Prompt

__all__ = ["TrainableSam", "encoder_stages"]

CPU_PROMPTS_PER_CALL = 4


class LayerNorm2dFp32(LayerNorm2d):
    """SAM's channel LayerNorm computed in float32: in fp16 its variance overflows (ViT-H)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class TrainableSam(SegmentBackend):
    """The SAM family's backend (SAM, MedSAM, LiteMedSAM): a ``Sam`` with gradients, many
    prompts per decoder call, and input/output transforms.

    Args:
        sam: the model (any of ``sam_ft.model.builders``).
        preprocess: ``"sam"``, ``"medsam"`` or ``"litemedsam"``; how images and prompts enter
            the model (``sam_ft.model.preprocess``, ``sam_ft.model.preprocess_lite``).
        grad_checkpointing: recompute trainable encoder blocks in the backward pass to save
            activation memory.
        encoder_bf16: on CUDA GPUs with bfloat16, run the image encoder under bf16 autocast when
            it gets no gradients (frozen, or no-grad inference); embeddings stay float32.
            False keeps the encoder in float32 everywhere (bit-level comparisons).
        multimask_output: whether the model's 3 mask outputs are meant to be used (SAM) or only
            its single one (MedSAM); mask selection and training read it (``decode`` itself
            still returns what it is asked for).

    The wrapped ``sam`` is changed in place, keeping its parameters and state-dict keys: its
    channel LayerNorms compute in float32 and its encoder attention runs through
    ``F.scaled_dot_product_attention`` (``sam_ft.model.attention``; the same attention, faster
    and without the materialised score matrix's extra copies).
    """

    def __init__(
        self,
        sam: Sam,
        preprocess: str,
        grad_checkpointing: bool,
        encoder_bf16: bool,
        multimask_output: bool,
    ):
        super().__init__()
        self.sam = sam
        self.transform = make_transform(sam.image_encoder.img_size, preprocess)
        self.grad_checkpointing = grad_checkpointing
        self.encoder_bf16 = encoder_bf16
        self.multimask_output = bool(multimask_output)
        for module in sam.modules():
            if type(module) is LayerNorm2d:
                module.__class__ = LayerNorm2dFp32  # same parameters, same state-dict keys
        use_sdpa_attention(sam.image_encoder)

    @property
    def image_size(self) -> int:
        return self.sam.image_encoder.img_size

    @property
    def image_encoder(self) -> nn.Module:
        return self.sam.image_encoder

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.sam.prompt_encoder

    @property
    def mask_decoder(self) -> nn.Module:
        return self.sam.mask_decoder

    @property
    def mask_threshold(self) -> float:
        return float(self.sam.mask_threshold)

    def _encode(self, images: torch.Tensor) -> torch.Tensor:
        enc = self.sam.image_encoder
        if not (self.grad_checkpointing and self.training and torch.is_grad_enabled()):
            return enc(images)
        # Same computation as ImageEncoderViT.forward (or TinyViT.forward_features), with
        # trainable blocks (stages) recomputed in backward.
        x = enc.patch_embed(images)
        if getattr(enc, "pos_embed", None) is not None:
            x = x + enc.pos_embed
        for block in encoder_stages(enc):
            trains = any(p.requires_grad for p in block.parameters())
            x = checkpoint(block, x, use_reentrant=False) if trains else block(x)
        if x.ndim == 3:  # TinyViT: (B, h*w, C) tokens of a square grid
            side = int(round(x.shape[1] ** 0.5))
            x = x.view(x.shape[0], side, side, x.shape[2])
        return enc.neck(x.permute(0, 3, 1, 2))

    def decode(
        self,
        embedding: torch.Tensor,
        prompts: list[Prompt],
        original_size: tuple[int, int],
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode all prompts of ONE image.

        Prompts of the same structure (box or not, number of points, mask or not) share a
        decoder call (on a CPU, calls of ``CPU_PROMPTS_PER_CALL`` prompts), not one call each.

        Args:
            embedding: (C, h, w) image embedding from ``encode``.
            prompts: N prompts, (x, y) coordinates in ORIGINAL-image pixels.
            original_size: (H, W) of the original image.
            multimask_output: 3 masks per prompt if True, else 1.

        Returns:
            low-res mask logits (N, M, S/4, S/4) and IoU predictions (N, M), M = 3 or 1, in the
            order of ``prompts``.
        """
        groups: dict[tuple, list[int]] = defaultdict(list)
        for i, prompt in enumerate(prompts):
            groups[prompt.structure].append(i)
        n_out = 3 if multimask_output else 1
        side = self.transform.low_res_size
        logits = embedding.new_empty((len(prompts), n_out, side, side))
        ious = embedding.new_empty((len(prompts), n_out))
        # On a CPU, 4 prompts a call: the decoder's largest activations, (prompts, 4096, 256)
        # float32, stay at 16 MiB, under the 32 MiB from which glibc maps and unmaps every block
        # (each new tensor page-faults in again), and closer to cache (BENCHMARKS.md).
        step = CPU_PROMPTS_PER_CALL if embedding.device.type == "cpu" else len(prompts)
        shared: list = []  # the decoder's per-image part, made once for all groups
        for group in groups.values():
            for start in range(0, len(group), step):
                idx = group[start : start + step]
                group_logits, group_iou = self._decode_group(
                    embedding, [prompts[i] for i in idx], original_size, multimask_output, shared
                )
                logits[idx] = group_logits.to(logits.dtype)
                ious[idx] = group_iou.to(ious.dtype)
        return logits, ious

    def _decode_group(self, embedding, prompts, original_size, multimask_output, shared):
        device = embedding.device
        first = prompts[0]
        points = boxes = masks = None
        if first.points is not None:
            coords = np.stack([p.points for p in prompts])
            coords = self.transform.apply_coords(coords, original_size)
            labels = np.stack([p.point_labels for p in prompts])
            points = (
                torch.as_tensor(coords, dtype=torch.float32, device=device),
                torch.as_tensor(labels, dtype=torch.int64, device=device),
            )
        if first.box is not None:
            box = self.transform.apply_boxes(np.stack([p.box for p in prompts]), original_size)
            boxes = torch.as_tensor(box, dtype=torch.float32, device=device)
        if first.mask_logits is not None:
            masks = torch.stack([torch.as_tensor(p.mask_logits) for p in prompts])[:, None]
            masks = masks.to(device=device, dtype=torch.float32)
        pe, decoder = self.sam.prompt_encoder, self.sam.mask_decoder
        sparse, dense = pe(points=points, boxes=boxes, masks=masks)
        if masks is None and fits_token_path(decoder, sparse.shape[1]):
            # The dense embedding is shared: image-side work once per image, not per prompt.
            if not shared:
                shared.append(image_side(decoder, embedding[None], pe.get_dense_pe(), dense))
            return decode_prompts(decoder, shared[0], sparse, multimask_output)
        return decoder(
            image_embeddings=embedding[None],
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
        )
