"""Which parts of SAM train: the ``finetune`` config group.

Modes:
    decoder         the paper's: image and prompt encoder frozen, mask decoder trains.
    decoder_prompt  mask decoder + prompt encoder.
    encoder_last_n  the last ``last_n`` ViT blocks (TinyViT: stages, of 4) + the neck + the mask
                    decoder.
    lora            rank-``rank`` adapters on every encoder attention's qkv + the decoder;
                    merged into plain weights on export.
    full            everything.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import nn

from sam_ft.errors import ConfigError
from sam_ft.model.backend import SegmentBackend as TrainableSam
from sam_ft.model.backend import encoder_stages

log = logging.getLogger(__name__)

MODES = ("decoder", "decoder_prompt", "encoder_last_n", "lora", "full")


class LoRALinear(nn.Module):
    """``base(x) + scale * x A^T B^T`` with A (r, in), B (out, r); B starts at zero.

    Keys: ``base.weight``, ``base.bias``, ``lora_a``, ``lora_b``, ``lora_scale``: the checkpoint
    reader (``sam_ft.model.checkpoint.merge_lora``) folds them back into one ``nn.Linear``.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float) -> None:
        super().__init__()
        self.base = base
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.register_buffer("lora_scale", torch.tensor(alpha / rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.lora_a.t() @ self.lora_b.t()) * self.lora_scale


@dataclass
class Finetune:
    """Freezes and adapts a ``TrainableSam`` for one finetuning mode.

    Args:
        name: one of ``MODES``.
        last_n: encoder blocks trained by ``encoder_last_n``.
        rank, alpha: LoRA rank and scaling (scale = alpha / rank).
        encoder_lr_scale: learning-rate multiplier for pretrained encoder weights when they train
            (not for LoRA adapters, which are new and use the base rate).

    The values live in conf/finetune/ (``sam_ft.defaults.build_from_yaml("finetune", mode)``).
    """

    name: str
    last_n: int
    rank: int
    alpha: float
    encoder_lr_scale: float

    def __post_init__(self) -> None:
        if self.name not in MODES:
            raise ConfigError(f"finetune.name={self.name!r} is not one of {list(MODES)}")

    def apply(self, model: TrainableSam) -> dict[str, int]:
        """Set ``requires_grad`` per mode (adding LoRA adapters if asked); log and return counts."""
        encoder = model.image_encoder
        model.sam.requires_grad_(self.name == "full")
        model.mask_decoder.requires_grad_(True)
        # What the embedding is made of outside the encoder (SAM 2's high-resolution feature
        # projections) trains with the encoder, so a frozen encoder's embeddings stay cacheable.
        for part in model.encoding_parts():
            part.requires_grad_(self.name in ("full", "encoder_last_n"))
        if self.name == "decoder_prompt":
            model.prompt_encoder.requires_grad_(True)
        elif self.name == "encoder_last_n":
            blocks = encoder_stages(encoder)
            if not 1 <= self.last_n <= len(blocks):
                unit = "stages (TinyViT)" if hasattr(encoder, "layers") else "blocks"
                raise ConfigError(
                    f"finetune.last_n={self.last_n}: the encoder has {len(blocks)} {unit}"
                )
            for block in blocks[len(blocks) - self.last_n :]:
                block.requires_grad_(True)
            encoder.neck.requires_grad_(True)
        elif self.name == "lora":
            # Every attention's qkv: the ViT's blocks, TinyViT's attention stages (1-3), Hiera's.
            for attn in [m for m in encoder.modules() if hasattr(m, "qkv")]:
                if not isinstance(attn.qkv, LoRALinear):
                    attn.qkv = LoRALinear(attn.qkv, self.rank, self.alpha)
                attn.qkv.lora_a.requires_grad_(True)
                attn.qkv.lora_b.requires_grad_(True)
        counts = count_parameters(model)
        log.info(
            "finetune=%s: %s trainable / %s frozen parameters",
            self.name,
            f"{counts['trainable']:,}",
            f"{counts['frozen']:,}",
        )
        return counts

    def param_groups(self, model: TrainableSam, lr: float) -> list[dict]:
        """Optimizer groups: pretrained encoder weights at ``lr * encoder_lr_scale``, the rest at
        ``lr``.

        The scale protects pretrained features. Parameters a mode adds (LoRA's ``lora_a`` /
        ``lora_b``, under the image encoder) start from scratch and train at the base ``lr``, the
        rate the LoRA papers' learning rates refer to.
        """
        added = {id(p) for m in model.modules() if isinstance(m, LoRALinear)
                 for p in (m.lora_a, m.lora_b)}  # fmt: skip
        encoder, adapters, rest = [], [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in added:
                adapters.append(param)
            elif name.startswith("sam.image_encoder."):
                encoder.append(param)
            else:
                rest.append(param)
        groups = [{"params": rest, "lr": lr, "name": "decoder"}]
        if adapters:
            groups.append({"params": adapters, "lr": lr, "name": "adapters"})
        if encoder:
            groups.append({"params": encoder, "lr": lr * self.encoder_lr_scale, "name": "encoder"})
        return groups


def count_parameters(model: nn.Module) -> dict[str, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return {"trainable": trainable, "frozen": total - trainable}
