"""Model builders: the official SAM architectures, a CPU-sized ``tiny`` one, and MedSAM.

Every builder returns a ``segment_anything.modeling.Sam`` made of the official classes, so the
official checkpoints, ``SamPredictor`` and our trainable wrapper all see the same modules.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from sam_ft.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamSpec:
    """Architecture of one SAM variant and where its published weights live."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    preprocess: str = "sam"
    multimask_output: bool = True
    url: str | None = None
    sha256: str | None = None

    @property
    def filename(self) -> str | None:
        return self.url.rsplit("/", 1)[-1] if self.url else None


_SAM_URL = "https://dl.fbaipublicfiles.com/segment_anything/"

SPECS: dict[str, SamSpec] = {
    "vit_h": SamSpec(
        1280,
        32,
        16,
        (7, 15, 23, 31),
        url=_SAM_URL + "sam_vit_h_4b8939.pth",
        sha256="a7bf3b02f3ebf1267aba913ff637d9a2d5c33d3173bb679e46d9f338c26f262e",
    ),
    "vit_l": SamSpec(
        1024,
        24,
        16,
        (5, 11, 17, 23),
        url=_SAM_URL + "sam_vit_l_0b3195.pth",
        sha256="3adcc4315b642a4d2101128f611684e8734c41232a17c648ed1693702a49a622",
    ),
    "vit_b": SamSpec(
        768,
        12,
        12,
        (2, 5, 8, 11),
        url=_SAM_URL + "sam_vit_b_01ec64.pth",
        sha256="ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912",
    ),
    # MedSAM (Ma et al., Nature Communications 2024): ViT-B trained on 1.5M medical image-mask
    # pairs with its own preprocessing (see sam_ft.model.preprocess, mode "medsam"). Its weights
    # are published on Google Drive only, with no direct URL: `auto` finds the file in the cache.
    # Trained and run with one mask output (multimask_output=False).
    "medsam": SamSpec(768, 12, 12, (2, 5, 8, 11), preprocess="medsam", multimask_output=False),
    # Same classes, CPU-sized: a 2-block ViT at input 256 (16x16 embedding grid).
    "tiny": SamSpec(96, 2, 2, (1,), image_size=256, window_size=8),
}


def _spec(name: str) -> SamSpec:
    if name not in SPECS:
        raise ValueError(f"model.name={name!r} is not one of {sorted(SPECS)}")
    return SPECS[name]


def build_sam_architecture(name: str, image_size: int | None = None) -> Sam:
    """A randomly initialised SAM of the named architecture (eval mode).

    Args:
        name: one of ``SPECS`` (``vit_b``, ``vit_l``, ``vit_h``, ``medsam``, ``tiny``).
        image_size: override the square input size (tests build ``tiny`` at 1024 for parity).
    """
    spec = _spec(name)
    size = image_size or spec.image_size
    patch = 16
    embed = spec.prompt_embed_dim
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=patch,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size,
            out_chans=embed,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=embed,
            image_embedding_size=(size // patch, size // patch),
            input_image_size=(size, size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2, embedding_dim=embed, mlp_dim=spec.decoder_mlp_dim, num_heads=8
            ),
            transformer_dim=embed,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam.eval()


def resolve_checkpoint(name: str, checkpoint: str | None) -> Path | None:
    """Turn ``model.checkpoint`` (a path, ``"auto"`` or None) into a local file or None."""
    from sam_ft.model.download import cache_dir, fetch

    if checkpoint in (None, "", "null", "none"):
        return None
    if str(checkpoint) != "auto":
        return Path(checkpoint).expanduser()
    spec = _spec(name)
    if spec.url is not None:
        return fetch(spec.url, spec.filename, spec.sha256)
    local = cache_dir() / f"{name}_vit_b.pth" if name == "medsam" else None
    if local is not None and local.is_file():
        return local
    raise ConfigError(
        f"model.checkpoint=auto: {name} has no published direct download. "
        + (
            f"Download medsam_vit_b.pth from https://github.com/bowang-lab/MedSAM and put it at "
            f"{local}, or pass model.checkpoint=/path/to/medsam_vit_b.pth."
            if local is not None
            else "Pass model.checkpoint=/path/to/weights.pth or model.checkpoint=null."
        )
    )


def build_sam(name: str, checkpoint: str | None = None, image_size: int | None = None) -> Sam:
    """Build the named SAM and load its weights (eval mode).

    Args:
        name: ``vit_b``, ``vit_l``, ``vit_h``, ``medsam`` or ``tiny``.
        checkpoint: a path to any accepted checkpoint (see ``sam_ft.model.checkpoint``),
            ``"auto"`` (download the published weights into ``$SAM_FT_CACHE``), or None for
            random weights, which is logged as a warning because results are then meaningless.
        image_size: must equal the architecture's input size unless building for tests.
    """
    from sam_ft.model.checkpoint import load_weights, read_state_dict

    sam = build_sam_architecture(name, image_size)
    path = resolve_checkpoint(name, checkpoint)
    if path is None:
        log.warning(
            "model %s: NO CHECKPOINT, weights are RANDOM (model.checkpoint=null). "
            "Zero-shot results mean nothing; pass model.checkpoint=auto or a path.",
            name,
        )
        return sam
    load_weights(sam, read_state_dict(path), str(path), name)
    log.info("model %s: loaded weights from %s", name, path)
    return sam
