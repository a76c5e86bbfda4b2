"""SAM 2.1 (and MedSAM2, its weights and settings) for images, from the official ``sam2`` package.

The model is ``sam2``'s own ``SAM2Base`` built from the package's YAML (``sam2/configs/``) with
the defaults ``sam2.build_sam.build_sam2`` adds, so official checkpoints (``{"model": state}``)
load strictly and ``SAM2ImagePredictor`` can run on the very same object. Two things are done
differently from ``build_sam2``, because ``sam2`` keeps its configs in Hydra's global state
(sam2 issues 179 and 531: it clashes with a host Hydra app such as ours):

* ``import sam2`` runs ``initialize_config_module("sam2")`` when no Hydra is set up (a test, a
  spawned DDP worker): :func:`import_sam2` clears that again, so Hydra is as it was;
* the YAML is read with OmegaConf and built with ``hydra.utils.instantiate`` (which reads no
  global state), never with ``hydra.compose``.

The image path mirrors ``SAM2ImagePredictor`` call for call: ``encode`` is ``set_image``
(``forward_image``, the high-resolution projections ``conv_s0``/``conv_s1``, ``no_mem_embed``
added to the lowest-resolution map) and ``decode`` is ``_predict`` (box corners as points with
labels 2 and 3 ahead of the clicks, the prompt encoder's padding point, ``repeat_image`` for
several prompts, the decoder's ``multimask_output`` rules with its dynamic fallback from the
single mask when it is unstable). The embedding is a dict: ``image_embed`` (B, 256, S/16, S/16),
``high_res_0`` (B, 32, S/4, S/4) and ``high_res_1`` (B, 64, S/8, S/8).

The optional CUDA extension of ``sam2`` (``sam2._C``, connected components) is only used to fill
holes in masks (``max_hole_area > 0``, off in the predictor by default) and by the video
predictor: without it nothing here changes (``SAM2_BUILD_CUDA=0`` installs).
"""

from __future__ import annotations

import importlib.resources
import importlib.util

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from sam_ft.errors import ConfigError
from sam_ft.model.backend import SegmentBackend
from sam_ft.model.preprocess_sam2 import Sam2Transform
from sam_ft.prompts.types import Prompt

PIP_HINT = (
    "pip install 'sam_ft[sam2]' (sam2 1.1.0 builds from source: install torch first, then "
    "SAM2_BUILD_CUDA=0 pip install --no-build-isolation sam2==1.1.0)"
)
CPU_PROMPTS_PER_CALL = 4
# What sam2.build_sam.build_sam2 adds to every config (apply_postprocessing=True), which
# SAM2ImagePredictor relies on: the single mask falls back to the best of 3 when unstable.
POSTPROCESSING = {
    "dynamic_multimask_via_stability": True,
    "dynamic_multimask_stability_delta": 0.05,
    "dynamic_multimask_stability_thresh": 0.98,
}


def import_sam2(name: str = "sam2") -> None:
    """Import ``sam2`` without leaving Hydra's global state changed; a missing package is one
    line naming the extra."""
    if importlib.util.find_spec("sam2") is None:
        raise ConfigError(f"model.name={name} needs the package sam2, not installed: {PIP_HINT}")
    from hydra.core.global_hydra import GlobalHydra

    hydra_state = GlobalHydra.instance()
    was_set = hydra_state.is_initialized()
    import sam2  # noqa: F401  (initialises Hydra with its own configs when none is set up)

    if not was_set and hydra_state.is_initialized():
        hydra_state.clear()


def sam2_model_config(config: str, image_size: int | None = None) -> DictConfig:
    """The ``model`` node of a ``sam2`` package config (e.g. ``sam2.1/sam2.1_hiera_t.yaml``),
    with ``build_sam2``'s postprocessing settings and another input size where asked
    (MedSAM2's 512; the tests' 256)."""
    import_sam2()
    path = importlib.resources.files("sam2").joinpath("configs", *config.split("/"))
    cfg = OmegaConf.load(str(path))
    model = cfg.model
    model.sam_mask_decoder_extra_args = dict(POSTPROCESSING)
    if image_size is not None:
        model.image_size = int(image_size)
        # Only the video path's memory attention reads these (RoPE tables, no weights).
        side = int(image_size) // 16
        for part in ("self_attention", "cross_attention"):
            model.memory_attention.layer[part].feat_sizes = [side, side]
    OmegaConf.resolve(cfg)
    return model


def build_sam2_architecture(config: str, image_size: int | None = None) -> nn.Module:
    """A randomly initialised ``sam2.modeling.sam2_base.SAM2Base`` (eval mode), on the default
    device."""
    from hydra.utils import instantiate

    device = torch.get_default_device()
    with torch.device("cpu"):  # Hiera's __init__ calls .item(), which meta tensors refuse
        model = instantiate(sam2_model_config(config, image_size), _recursive_=True)
    return model.to(device).eval()


class TrainableSam2(SegmentBackend):
    """SAM 2's image path as a ``SegmentBackend`` (module docstring).

    Args:
        sam: a ``SAM2Base`` (:func:`build_sam2_architecture`, weights loaded or not).
        encoder_bf16: see ``SegmentBackend``.
        multimask_output: whether the 3 mask outputs are meant to be used (SAM 2.1: yes).
    """

    family = "sam2"

    def __init__(self, sam: nn.Module, encoder_bf16: bool, multimask_output: bool):
        super().__init__()
        self.sam = sam
        self.transform = Sam2Transform(sam.image_size)
        self.encoder_bf16 = encoder_bf16
        self.multimask_output = bool(multimask_output)

    @property
    def image_encoder(self) -> nn.Module:
        return self.sam.image_encoder

    @property
    def prompt_encoder(self) -> nn.Module:
        return self.sam.sam_prompt_encoder

    @property
    def mask_decoder(self) -> nn.Module:
        return self.sam.sam_mask_decoder

    def encoding_parts(self) -> list[nn.Module | nn.Parameter]:
        """The decoder's projections of the high-resolution maps (``forward_image`` applies
        them once per image) and ``no_mem_embed``: the embedding is made with them."""
        dec = self.sam.sam_mask_decoder
        return [dec.conv_s0, dec.conv_s1, self.sam.no_mem_embed]

    def encoder_state(self) -> dict[str, torch.Tensor]:
        state = {f"image_encoder.{k}": v for k, v in self.sam.image_encoder.state_dict().items()}
        for name in ("conv_s0", "conv_s1"):
            part = getattr(self.sam.sam_mask_decoder, name).state_dict()
            state.update({f"sam_mask_decoder.{name}.{k}": v for k, v in part.items()})
        state["no_mem_embed"] = self.sam.no_mem_embed.detach()
        return state

    def _encode(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """(B, 3, S, S) -> ``image_embed``, ``high_res_0``, ``high_res_1`` (module docstring)."""
        fpn = self.sam.image_encoder(images)["backbone_fpn"]
        dec = self.sam.sam_mask_decoder
        embed = fpn[-1]
        if self.sam.directly_add_no_mem_embed:
            embed = embed + self.sam.no_mem_embed.view(1, -1, 1, 1)
        return {
            "image_embed": embed,
            "high_res_0": dec.conv_s0(fpn[0]),
            "high_res_1": dec.conv_s1(fpn[1]),
        }

    def decode(
        self,
        embedding: dict[str, torch.Tensor],
        prompts: list[Prompt],
        original_size: tuple[int, int],
        multimask_output: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decode all prompts of ONE image, as ``SAM2ImagePredictor._predict``.

        Args:
            embedding: one image's ``image_embed`` (C, h, w), ``high_res_0``, ``high_res_1``.
            prompts: N prompts, (x, y) coordinates in ORIGINAL-image pixels.
            original_size: (H, W) of the original image.
            multimask_output: 3 masks per prompt if True, else 1.

        Returns:
            low-res mask logits (N, M, S/4, S/4) and IoU predictions (N, M), in prompt order.
        """
        groups: dict[tuple, list[int]] = {}
        for i, prompt in enumerate(prompts):
            groups.setdefault(prompt.structure, []).append(i)
        n_out = 3 if multimask_output else 1
        side = self.transform.low_res_size
        image_embed = embedding["image_embed"]
        logits = image_embed.new_empty((len(prompts), n_out, side, side))
        ious = image_embed.new_empty((len(prompts), n_out))
        step = CPU_PROMPTS_PER_CALL if image_embed.device.type == "cpu" else len(prompts)
        for group in groups.values():
            for start in range(0, len(group), step):
                idx = group[start : start + step]
                low, iou = self._decode_group(
                    embedding, [prompts[i] for i in idx], original_size, multimask_output
                )
                logits[idx] = low.to(logits.dtype)
                ious[idx] = iou.to(ious.dtype)
        return logits, ious

    def _decode_group(self, embedding, prompts, original_size, multimask_output):
        device = embedding["image_embed"].device
        n, first = len(prompts), prompts[0]
        coords, labels = [], []
        if first.box is not None:  # the box's corners first, labels 2 and 3
            box = self.transform.apply_boxes(np.stack([p.box for p in prompts]), original_size)
            coords.append(torch.as_tensor(box, device=device).reshape(-1, 2, 2))
            labels.append(torch.tensor([[2, 3]], dtype=torch.int, device=device).repeat(n, 1))
        if first.points is not None:
            pts = self.transform.apply_coords(np.stack([p.points for p in prompts]), original_size)
            coords.append(torch.as_tensor(pts, device=device))
            lab = np.stack([p.point_labels for p in prompts])
            labels.append(torch.as_tensor(lab, dtype=torch.int, device=device))
        points = (torch.cat(coords, dim=1), torch.cat(labels, dim=1)) if coords else None
        masks = None
        if first.mask_logits is not None:
            masks = torch.stack([torch.as_tensor(p.mask_logits) for p in prompts])[:, None]
            masks = masks.to(device=device, dtype=torch.float32)
        pe, dec = self.sam.sam_prompt_encoder, self.sam.sam_mask_decoder
        sparse, dense = pe(points=points, boxes=None, masks=masks)
        low, iou, _, _ = dec(
            image_embeddings=embedding["image_embed"][None],
            image_pe=pe.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=multimask_output,
            repeat_image=n > 1,
            high_res_features=[embedding["high_res_0"][None], embedding["high_res_1"][None]],
        )
        return low, iou

    def official_checkpoint(self, state: dict[str, torch.Tensor]) -> dict:
        """``sam2``'s layout: ``build_sam2(config, ckpt_path=...)`` reads ``["model"]``."""
        return {"model": state}
