"""LiteMedSAM's own pre- and postprocessing (mode ``litemedsam``), equal to the official 2D
inference ``CVPR24_LiteMedSAM_infer.py`` (bowang-lab/MedSAM, LiteMedSAM branch):

* image (H, W, 3) uint8: longest side to 256 with OpenCV ``INTER_AREA``, new size
  ``int(x * 256 / max(H, W) + 0.5)``; min-max to [0, 1] over the resized image; zero-padded at
  the bottom/right to 256 x 256; no mean/std;
* box [x_min, y_min, x_max, y_max]: each coordinate ``int(v * 256 / max(H, W))`` (truncated);
  points (which the official code never passes) are scaled by the same ratio, not truncated;
* logits: the decoder's (256 x 256) low-resolution logits cropped to the resized (h, w), then
  bilinear (``align_corners=False``) to (H, W); the mask is ``sigmoid > 0.5`` (logit > 0).

Where SAM's pipeline differs (PIL bilinear resize with ``ResizeLongestSide``'s rounding, pixel
mean/std, float prompt coordinates, 4x upsampling before the crop), the model spec selects this
one (``SamSpec.preprocess``); ``docs/protocol.md`` lists the differences.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from sam_ft.model.preprocess import SamTransform, _resize_matrix

LITE_SIZE = 256


def lite_input_size(original_size: tuple[int, int], size: int = LITE_SIZE) -> tuple[int, int]:
    """(h, w) after the official ``resize_longest_side``: ``int(x * size / max(H, W) + 0.5)``."""
    h, w = original_size
    scale = size * 1.0 / max(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


def lite_preprocess(image: np.ndarray, size: int = LITE_SIZE) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float32: INTER_AREA resize, min-max, pad bottom/right."""
    import cv2

    new_h, new_w = lite_input_size(image.shape[:2], size)
    resized = cv2.resize(image, (new_w, new_h), interpolation=cv2.INTER_AREA)
    x = resized.astype(np.float64)
    x = (x - x.min()) / np.clip(x.max() - x.min(), a_min=1e-8, a_max=None)
    x = np.pad(x, ((0, size - new_h), (0, size - new_w), (0, 0)))
    return torch.from_numpy(x).float().permute(2, 0, 1).contiguous()


class LiteMedSamTransform(SamTransform):
    """``SamTransform``'s interface with LiteMedSAM's official transforms (module docstring).

    The decoder's logits are (S, S) here (the TinyViT embedding is S/4 x S/4), so the
    low-resolution frame IS the padded input frame.
    """

    def __init__(self, image_size: int) -> None:
        super().__init__(image_size, "sam")
        self.mode = "litemedsam"

    @property
    def low_res_size(self) -> int:
        return self.image_size

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return lite_input_size(tuple(original_size), self.image_size)

    def apply_image(self, image: np.ndarray) -> torch.Tensor:
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        return lite_preprocess(image, self.image_size)

    def _ratio(self, original_size: tuple[int, int]) -> float:
        return self.image_size / max(original_size)

    def apply_coords(self, coords, original_size):
        """(..., 2) (x, y) points -> the 256 frame, scaled by ``256 / max(H, W)``."""
        ratio = self._ratio(original_size)
        if isinstance(coords, torch.Tensor):
            return coords.float() * ratio
        return np.asarray(coords, dtype=np.float64) * ratio

    def apply_boxes(self, boxes, original_size):
        """(N, 4) boxes -> the 256 frame, each coordinate ``int(v * 256 / max(H, W))``."""
        ratio = self._ratio(original_size)
        if isinstance(boxes, torch.Tensor):
            return torch.trunc(boxes.double() * ratio).float().reshape(-1, 4)
        return np.trunc(np.asarray(boxes, dtype=np.float64) * ratio).reshape(-1, 4)

    def masks_to_low_res(self, masks) -> torch.Tensor:
        """(K, H, W) binary masks -> (K, S, S) {0, 1}: resized (nearest) and padded like the
        image, pixel for pixel under the logits."""
        m = torch.as_tensor(np.asarray(masks)).float()[None]
        if m.shape[1] == 0:
            return torch.zeros(0, self.image_size, self.image_size)
        h, w = self.input_size(tuple(m.shape[-2:]))
        m = F.interpolate(m, (h, w), mode="nearest")
        m = F.pad(m, (0, self.image_size - w, 0, self.image_size - h))
        return (m[0] >= 0.5).float()

    def resize_matrices(self, original_size, device=None, dtype=torch.float32):
        """(A_h, A_w) with ``A_h @ x @ A_w.T == postprocess(x, original_size)``; None: identity
        (the logits are already in the input frame)."""
        key = (None if original_size is None else tuple(original_size), str(device), dtype)
        if key not in self._matrices:
            s = self.image_size
            if original_size is None:
                mats = (torch.eye(s), torch.eye(s))
            else:
                (h, w), (big_h, big_w) = self.input_size(original_size), original_size
                crop_h, crop_w = torch.eye(s)[:h], torch.eye(s)[:w]
                mats = (_resize_matrix(h, big_h) @ crop_h, _resize_matrix(w, big_w) @ crop_w)
            self._matrices[key] = tuple(m.to(device=device, dtype=dtype) for m in mats)
        return self._matrices[key]

    def postprocess(self, low_res_logits: torch.Tensor, original_size: tuple[int, int]):
        """(N, C, S, S) logits -> (N, C, H, W): crop to the resized size, bilinear to (H, W)."""
        h, w = self.input_size(original_size)
        x = low_res_logits[..., :h, :w]
        return F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)


def make_transform(image_size: int, mode: str) -> SamTransform:
    """The transform of preprocessing ``mode`` (``sam``, ``medsam`` or ``litemedsam``)."""
    if mode == "litemedsam":
        return LiteMedSamTransform(image_size)
    return SamTransform(image_size, mode)
