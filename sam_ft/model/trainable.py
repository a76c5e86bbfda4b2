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
from sam_ft.model.decoder import decode_prompts, fits_token_path, image_side
from sam_ft.model.preprocess_lite import make_transform
from sam_ft.prompts.types import Prompt

CPU_PROMPTS_PER_CALL = 4


def encoder_stages(encoder: nn.Module) -> list[nn.Module]:
    """The image encoder's trainable units, input to output: a ViT's blocks, or TinyViT's 4
    stages (LiteMedSAM's encoder has ``layers``, each a stage of blocks)."""
    if hasattr(encoder, "blocks"):
        return list(encoder.blocks)
    return list(encoder.layers)


class LayerNorm2dFp32(LayerNorm2d):
    """SAM's channel LayerNorm computed in float32: in fp16 its variance overflows (ViT-H)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).to(x.dtype)


class TrainableSam(nn.Module):
    """A ``Sam`` with gradients, many prompts per decoder call, and input/output transforms.

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
        preprocess: str = "sam",
        grad_checkpointing: bool = False,
        encoder_bf16: bool = True,
        multimask_output: bool = True,
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
    def encoder_frozen(self) -> bool:
        """True when no image-encoder parameter trains: embeddings may then be cached."""
        return not any(p.requires_grad for p in self.sam.image_encoder.parameters())

    def train(self, mode: bool = True) -> TrainableSam:
        """Set train mode, but keep every fully frozen submodule in eval mode."""
        super().train(mode)
        if mode:
            parts = [self.sam.prompt_encoder, self.sam.mask_decoder, self.sam.image_encoder]
            parts += encoder_stages(self.sam.image_encoder)
            for module in parts:
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, S, S) float model input (same as ``SamPredictor.set_image``)."""
        return self.transform.apply_image(image)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, S, S) preprocessed images -> (B, C, S/16, S/16) image embeddings.

        The embeddings are float32 when the encoder ran under bf16 autocast (see
        ``encoder_bf16``), so callers see the same dtype either way.
        """
        if self.encodes_in_bf16(images.device) and (
            self.encoder_frozen or not torch.is_grad_enabled()
        ):  # bf16 only without encoder gradients: training keeps the trainer's precision
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return self._encode(images).float()
        return self._encode(images)

    def encodes_in_bf16(self, device: torch.device | str) -> bool:
        """Whether a frozen (or no-grad) encoder runs under bf16 autocast on ``device``."""
        return (
            self.encoder_bf16
            and torch.device(device).type == "cuda"
            and torch.cuda.is_bf16_supported()
        )

    def precision(self, device: torch.device | str | None = None) -> dict[str, str]:
        """The arithmetic each part runs in on ``device`` (default: the model's), for reports:
        ``{"encoder": "bf16-autocast" | "float32", "decoder": "float32"}``."""
        device = device if device is not None else next(self.parameters()).device
        encoder = "bf16-autocast" if self.encodes_in_bf16(device) else "float32"
        return {"encoder": encoder, "decoder": "float32"}

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
        multimask_output: bool = True,
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

    def postprocess(self, low_res_logits: torch.Tensor, original_size: tuple[int, int]):
        """(N, M, S/4, S/4) logits -> (N, M, H, W) logits at the original image size."""
        return self.transform.postprocess(low_res_logits, original_size)

    def binarize(self, low_res_logits: torch.Tensor, original_size: tuple[int, int]):
        """(N, M, S/4, S/4) logits -> (N, M, H, W) bool masks as the model's own code makes them
        (SAM: logits upsampled, > ``mask_threshold``; MedSAM: sigmoid, upsampled, > 0.5)."""
        return self.transform.binarize(low_res_logits, original_size, self.sam.mask_threshold)

    @torch.no_grad()
    def predict(
        self, image: np.ndarray, prompts: list[Prompt], multimask_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image, many prompts, no gradients: the zero-shot path.

        Returns:
            logits (N, M, H, W) at the original size, IoU predictions (N, M), low-res logits.
        """
        device = next(self.parameters()).device
        embedding = self.encode(self.preprocess(image)[None].to(device))[0]
        low, iou = self.decode(embedding, prompts, image.shape[:2], multimask_output)
        return self.postprocess(low, image.shape[:2]), iou, low
