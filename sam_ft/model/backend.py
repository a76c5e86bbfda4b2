"""The one interface every model family implements, and the image embedding it passes around.

A family (SAM / MedSAM / LiteMedSAM in ``sam_ft.model.trainable``, SAM 2.1 / MedSAM2 in
``sam_ft.model.sam2_model``) is a ``SegmentBackend``: the engine, training, the embedding cache,
``predict.py`` and the export call only what is declared here.

An **embedding** is what ``encode`` returns for a batch and ``decode`` takes for one image: one
tensor (SAM: (B, 256, 64, 64)) or a dict of named tensors with the batch first (SAM 2:
``image_embed`` plus its two high-resolution feature maps). The helpers below index, stack, move
and convert either form, so no caller needs to know which one it holds.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sam_ft.prompts.types import Prompt

if TYPE_CHECKING:
    from sam_ft.model.preprocess import SamTransform

Embedding = torch.Tensor | dict[str, torch.Tensor]


def map_embedding(fn: Callable[[torch.Tensor], torch.Tensor], emb: Embedding) -> Embedding:
    """``fn`` applied to the tensor, or to every tensor of a dict (same keys)."""
    if isinstance(emb, torch.Tensor):
        return fn(emb)
    return {k: fn(v) for k, v in emb.items()}


def embedding_at(emb: Embedding, i: int) -> Embedding:
    """Image ``i`` of a batched embedding (the batch dimension dropped)."""
    return map_embedding(lambda t: t[i], emb)


def unbatch(emb: Embedding) -> list[Embedding]:
    """A batched embedding as one embedding per image."""
    return [embedding_at(emb, i) for i in range(batch_size(emb))]


def batch_size(emb: Embedding) -> int:
    return first_tensor(emb).shape[0]


def stack_embeddings(items: list[Embedding]) -> Embedding:
    """Per-image embeddings -> one batched embedding (``torch.stack`` per tensor)."""
    if isinstance(items[0], torch.Tensor):
        return torch.stack(items)
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def first_tensor(emb: Embedding) -> torch.Tensor:
    """A tensor of the embedding: its device and dtype are the embedding's."""
    return emb if isinstance(emb, torch.Tensor) else next(iter(emb.values()))


def embedding_tensors(emb: Embedding) -> list[tuple[str, torch.Tensor]]:
    """(name, tensor) pairs in a fixed order (the cache hashes and sizes them)."""
    if isinstance(emb, torch.Tensor):
        return [("embedding", emb)]
    return sorted(emb.items())


def encoder_stages(encoder: nn.Module) -> list[nn.Module]:
    """The image encoder's trainable units, input to output: a ViT's blocks, TinyViT's 4
    stages (LiteMedSAM's encoder has ``layers``, each a stage of blocks), or the blocks of
    SAM 2's Hiera trunk."""
    if hasattr(encoder, "trunk"):
        return list(encoder.trunk.blocks)
    if hasattr(encoder, "blocks"):
        return list(encoder.blocks)
    return list(encoder.layers)


class SegmentBackend(nn.Module):
    """What a model family provides (subclasses fill in the abstract parts).

    Attributes:
        sam: the official model object (``segment_anything``'s ``Sam``, ``sam2``'s
            ``SAM2Base``); its state dict keys are the official checkpoint's.
        transform: images, prompts and masks into the model's frame and logits out of it
            (``sam_ft.model.preprocess.SamTransform`` or a subclass).
        multimask_output: whether the model's 3 mask outputs are meant to be used.
        encoder_bf16: run the image encoder under bf16 autocast on CUDA GPUs with bfloat16 when
            it gets no gradients (``encode``); embeddings stay float32.
        family: ``"sam"`` or ``"sam2"`` (reports, the export's layout).

    Finetune parts (``sam_ft.model.finetune``): ``image_encoder``, ``prompt_encoder``,
    ``mask_decoder``; ``encoding_parts`` are the modules and parameters outside the image
    encoder that the embedding still depends on (frozen whenever the encoder is, so that cached
    embeddings stay valid).
    """

    sam: nn.Module
    transform: SamTransform
    multimask_output: bool
    encoder_bf16: bool
    family: str = "sam"

    # --- the parts -------------------------------------------------------------------------

    @property
    def image_encoder(self) -> nn.Module:
        raise NotImplementedError

    @property
    def prompt_encoder(self) -> nn.Module:
        raise NotImplementedError

    @property
    def mask_decoder(self) -> nn.Module:
        raise NotImplementedError

    def encoding_parts(self) -> list[nn.Module | nn.Parameter]:
        """Trainable pieces outside ``image_encoder`` that ``encode`` uses (SAM: none)."""
        return []

    def encoder_parameters(self) -> list[nn.Parameter]:
        params = list(self.image_encoder.parameters())
        for part in self.encoding_parts():
            params += [part] if isinstance(part, nn.Parameter) else list(part.parameters())
        return params

    def encoder_state(self) -> dict[str, torch.Tensor]:
        """What the embedding depends on besides the image (hashed by the embedding cache)."""
        return self.image_encoder.state_dict()

    @property
    def encoder_frozen(self) -> bool:
        """True when nothing ``encode`` uses trains: embeddings may then be cached."""
        return not any(p.requires_grad for p in self.encoder_parameters())

    @property
    def image_size(self) -> int:
        return self.transform.image_size

    @property
    def mask_threshold(self) -> float:
        return 0.0

    def train(self, mode: bool = True) -> SegmentBackend:
        """Set train mode, but keep every fully frozen part in eval mode."""
        super().train(mode)
        if mode:
            parts = [self.prompt_encoder, self.mask_decoder, self.image_encoder]
            parts += encoder_stages(self.image_encoder)
            for module in parts:
                params = list(module.parameters())
                if params and not any(p.requires_grad for p in params):
                    module.eval()
        return self

    # --- images in, masks out --------------------------------------------------------------

    def preprocess(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, S, S) float model input (as the family's official predictor)."""
        return self.transform.apply_image(image)

    def encode(self, images: torch.Tensor) -> Embedding:
        """(B, 3, S, S) preprocessed images -> the batch's embedding (SAM: (B, C, S/16, S/16)).

        The embeddings are float32 when the encoder ran under bf16 autocast (see
        ``encoder_bf16``), so callers see the same dtype either way.
        """
        if self.encodes_in_bf16(images.device) and (
            self.encoder_frozen or not torch.is_grad_enabled()
        ):  # bf16 only without encoder gradients: training keeps the trainer's precision
            with torch.autocast("cuda", dtype=torch.bfloat16):
                return map_embedding(lambda t: t.float(), self._encode(images))
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

    def _encode(self, images: torch.Tensor) -> Embedding:
        raise NotImplementedError

    def decode(
        self,
        embedding: Embedding,
        prompts: list[Prompt],
        original_size: tuple[int, int],
        multimask_output: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """N prompts of ONE image ((x, y) original pixels) -> low-res logits (N, M, s, s) and
        IoU predictions (N, M), M = 3 or 1, in the order of ``prompts``."""
        raise NotImplementedError

    def postprocess(self, low_res_logits: torch.Tensor, original_size: tuple[int, int]):
        """(N, M, s, s) logits -> (N, M, H, W) logits at the original image size."""
        return self.transform.postprocess(low_res_logits, original_size)

    def binarize(self, low_res_logits: torch.Tensor, original_size: tuple[int, int]):
        """(N, M, s, s) logits -> (N, M, H, W) bool masks as the family's own code makes them."""
        return self.transform.binarize(low_res_logits, original_size, self.mask_threshold)

    @torch.no_grad()
    def predict(
        self, image: np.ndarray, prompts: list[Prompt], multimask_output: bool = True
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One image, many prompts, no gradients: the zero-shot path.

        Returns:
            logits (N, M, H, W) at the original size, IoU predictions (N, M), low-res logits.
        """
        device = next(self.parameters()).device
        embedding = embedding_at(self.encode(self.preprocess(image)[None].to(device)), 0)
        low, iou = self.decode(embedding, prompts, image.shape[:2], multimask_output)
        return self.postprocess(low, image.shape[:2]), iou, low

    # --- the export ------------------------------------------------------------------------

    def official_checkpoint(self, state: dict[str, torch.Tensor]) -> dict:
        """The object ``torch.save`` writes so that the family's own loader reads it
        (SAM: the flat state dict)."""
        return state
