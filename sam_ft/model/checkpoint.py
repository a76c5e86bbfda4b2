"""Reading, checking, loading and exporting SAM weights.

Accepted files: the official SAM ``.pth`` (a flat state dict), MedSAM's full state dict (flat or
under ``"model"``), our Lightning ``.ckpt`` (under ``"state_dict"``, keys prefixed ``model.sam.``,
LoRA adapters unmerged) and our exported ``sam_finetuned.pth`` (official format); SAM-HQ's
``sam_hq_vit_*.pth`` alike. Every file is read with ``torch.load(..., weights_only=True)``: a file
that needs pickled code is refused. A file of another family (SAM, SAM-HQ, SAM 2, LiteMedSAM;
told apart by key names) is refused in one line that names its family.
"""

from __future__ import annotations

import logging
import pickle
import re
from pathlib import Path

import torch
from torch import nn

from sam_ft.atomic import atomic_write
from sam_ft.errors import CheckpointError
from sam_ft.model.specs import SPECS

log = logging.getLogger(__name__)

_PREFIXES = ("module.", "model.", "sam.", "_orig_mod.")
# SAM2Base's top-level names besides image_encoder (sam2.modeling.sam2_base).
SAM2_TOPS = (
    "sam_prompt_encoder.",
    "sam_mask_decoder.",
    "memory_attention.",
    "memory_encoder.",
    "mask_downsample.",
    "obj_ptr_proj.",
    "obj_ptr_tpos_proj.",
    "maskmem_tpos_enc",
    "no_mem_embed",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "no_obj_embed_spatial",
)
_LORA_BASE = re.compile(r"^(?P<stem>.*)\.base\.(?P<param>weight|bias)$")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Official-format SAM state dict from any accepted file (prefixes stripped, LoRA merged)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"refusing {path}: it holds pickled Python objects, which could run code when loaded "
            f"({first}). Re-save it as a plain state dict of tensors."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        detail = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(
            f"{path} is not a readable PyTorch checkpoint (truncated or corrupt?): {detail}"
        ) from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not contain a state dict of tensors")
    return merge_lora(strip_prefixes(obj))


def strip_prefixes(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes (``module.``, ``model.``, ``sam.``) until the official names show.

    Keys outside the SAM model (e.g. a Lightning module's loss buffers) are dropped only when they
    never reach an official top-level name (``image_encoder``, ``prompt_encoder``, ...).
    """
    out = {}
    for key, value in state.items():
        while key.startswith(_PREFIXES):
            key = key.split(".", 1)[1]
        out[key] = value
    tops = ("image_encoder.", "prompt_encoder.", "mask_decoder.", "pixel_mean", "pixel_std")
    tops += SAM2_TOPS
    if any(k.startswith(tops) for k in out):
        out = {k: v for k, v in out.items() if k.startswith(tops)}
    return out


def merge_lora(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Fold LoRA adapters into their base weights: ``W = W0 + scale * B @ A``.

    Our adapters are stored as ``<stem>.base.weight``, ``<stem>.lora_a`` (r, in),
    ``<stem>.lora_b`` (out, r) and ``<stem>.lora_scale`` (a 0-d tensor).
    """
    if not any(k.endswith(".lora_a") for k in state):
        return state
    out = {}
    for key, value in state.items():
        if key.endswith((".lora_a", ".lora_b", ".lora_scale")):
            continue
        match = _LORA_BASE.match(key)
        if match is None:
            out[key] = value
            continue
        stem, param = match["stem"], match["param"]
        if param == "weight" and f"{stem}.lora_a" in state:
            a, b = state[f"{stem}.lora_a"].float(), state[f"{stem}.lora_b"].float()
            scale = state[f"{stem}.lora_scale"].float()
            value = (value.float() + scale * (b @ a)).to(value.dtype)
        out[f"{stem}.{param}"] = value
    return out


# SAM 2 / 2.1 (and MedSAM2, its finetune) image encoders: a Hiera trunk, named by its width and
# depth (sam2's configs: tiny 96 x 12 blocks, small 96 x 16, base+ 112 x 24, large 144 x 48).
_HIERA = {
    (96, 12): ("Hiera-T", "sam2.1_hiera_t"),
    (96, 16): ("Hiera-S", "sam2.1_hiera_s"),
    (112, 24): ("Hiera-B+", "sam2.1_hiera_b+"),
    (144, 48): ("Hiera-L", "sam2.1_hiera_l"),
}
# A family's models, to say which ``model=`` takes a file of it.
_FAMILY_MODELS = {
    "SAM": "vit_b, vit_l, vit_h or medsam",
    "SAM-HQ": "sam_hq_vit_b, sam_hq_vit_l or sam_hq_vit_h",
    "SAM 2": "sam2.1_hiera_t, _s, _b+ or _l",
    "LiteMedSAM": "litemedsam",
}


def checkpoint_family(state: dict[str, torch.Tensor]) -> str | None:
    """The model family of a state dict, by its key names: ``"SAM 2"`` (a Hiera ``trunk``),
    ``"SAM-HQ"`` (the HQ output token), ``"LiteMedSAM"`` (TinyViT stages), ``"SAM"`` (a ViT with
    SAM's decoder; MedSAM's too), or None."""
    if any(k.startswith("image_encoder.trunk.") for k in state):
        return "SAM 2"
    if "mask_decoder.hf_token.weight" in state:
        return "SAM-HQ"
    if any(k.startswith("image_encoder.layers.") for k in state):
        return "LiteMedSAM"
    if "image_encoder.patch_embed.proj.weight" in state:
        return "SAM"
    return None


def _count(state: dict[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in state if (m := re.match(pattern, k))})


def _hiera(state: dict[str, torch.Tensor]) -> tuple[int, int]:
    """(width, blocks) of a SAM 2 image encoder's Hiera trunk."""
    width = state["image_encoder.trunk.patch_embed.proj.weight"].shape[0]
    return width, _count(state, r"image_encoder\.trunk\.blocks\.(\d+)\.")


def matching_models(state: dict[str, torch.Tensor]) -> list[str]:
    """The model names whose family, encoder width and depth match ``state`` (SAM 2's: by its
    Hiera size; none for LiteMedSAM, whose one model needs no naming)."""
    family = checkpoint_family(state)
    if family == "SAM 2":
        return [_HIERA[_hiera(state)][1]] if _hiera(state) in _HIERA else []
    if family not in ("SAM", "SAM-HQ"):
        return []
    patch = state["image_encoder.patch_embed.proj.weight"]
    arch = (patch.shape[0], _count(state, r"image_encoder\.blocks\.(\d+)\."))
    decoder = "hq" if family == "SAM-HQ" else "sam"
    return [
        n
        for n, s in SPECS.items()
        if s.family == "sam"
        and (s.encoder_embed_dim, s.encoder_depth) == arch
        and s.decoder == decoder
    ]


def describe_architecture(state: dict[str, torch.Tensor]) -> str | None:
    """Name the known architecture whose family, encoder width and depth match ``state``."""
    family = checkpoint_family(state)
    if family in (None, "LiteMedSAM"):
        return "LiteMedSAM (TinyViT)" if family else None
    if family == "SAM 2":
        width, depth = _hiera(state)
        size = _HIERA.get((width, depth), (f"Hiera, width {width}, {depth} blocks",))[0]
        return f"SAM 2 ({size})"
    label = {"vit_b": "ViT-B", "vit_l": "ViT-L", "vit_h": "ViT-H", "tiny": "tiny"}
    label |= {f"sam_hq_{k}": f"SAM-HQ {v}" for k, v in label.items()}
    names = matching_models(state)
    pretty = " or ".join(dict.fromkeys(label.get(n, n) for n in names if n != "medsam"))
    patch = state["image_encoder.patch_embed.proj.weight"]
    blocks = _count(state, r"image_encoder\.blocks\.(\d+)\.")
    return pretty or f"an unknown {family} encoder (width {patch.shape[0]}, {blocks} blocks)"


def load_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str, name: str) -> None:
    """Load ``state`` into a ``Sam`` strictly; on any mismatch raise one readable error.

    The error lists missing, unexpected and misshaped keys (a few of each) and the likely cause.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(expected) & set(state)
        if state[k].shape != expected[k].shape
    )
    if not (missing or unexpected or misshaped):
        model.load_state_dict(state, strict=True)
        return
    found_family, wanted_family = checkpoint_family(state), checkpoint_family(expected)
    if found_family and wanted_family and found_family != wanted_family:
        raise CheckpointError(
            f"{source} is a {describe_architecture(state)} checkpoint, of the {found_family} "
            f"family, not {wanted_family} like model {name!r}: load it with model="
            f"{' or '.join(matching_models(state)) or _FAMILY_MODELS[found_family]}"
        )
    lines = [f"{source} does not fit model {name!r}:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("misshaped", misshaped)):
        if keys:
            shown = ", ".join(keys[:5]) + (f", ... ({len(keys)} in all)" if len(keys) > 5 else "")
            lines.append(f"  {title}: {shown}")
    found = describe_architecture(state)
    wanted = describe_architecture(expected)
    if found and found != wanted:
        lines.append(f"  likely cause: this looks like a {found} checkpoint; you asked for {name}")
    elif any(k.startswith("image_encoder.pos_embed") for k in misshaped):
        lines.append("  likely cause: the checkpoint was trained at another model.image_size")
    raise CheckpointError("\n".join(lines))


def export_official(model: nn.Module, path: str | Path) -> Path:
    """Write ``model``'s weights as an official SAM state dict (LoRA merged).

    ``segment_anything.sam_model_registry[<arch>](checkpoint=path)`` loads the file unchanged.
    """
    state = merge_lora(strip_prefixes({k: v.detach().cpu() for k, v in model.state_dict().items()}))
    for key, value in state.items():
        if value.is_floating_point() and not torch.isfinite(value).all():
            raise CheckpointError(f"refusing to export {path}: parameter {key} is not finite")
    # The family's own layout (SAM: the flat state dict; SAM 2: {"model": state dict}).
    obj = model.official_checkpoint(state) if hasattr(model, "official_checkpoint") else state
    return atomic_write(path, lambda f: torch.save(obj, f))
