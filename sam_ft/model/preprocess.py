"""Image, prompt and mask transforms between the original image frame and SAM's input frame.

Two modes, chosen by the model config (``model.preprocess``):

* ``sam``: the official pipeline, identical to ``SamPredictor.set_image``: resize the longest side
  to ``image_size`` with ``ResizeLongestSide`` (PIL bilinear), normalise with SAM's pixel mean/std,
  pad bottom-right to ``image_size x image_size``.
* ``medsam``: MedSAM's own pipeline (``MedSAM_Inference.py``): resize the uint8 image to
  ``image_size x image_size`` with scikit-image (bicubic, anti-aliased, range preserved; no
  aspect preservation, no padding), cast back to uint8, min-max scale to [0, 1], no mean/std.

Prompts are (x, y) = (column, row) pixel coordinates; arrays are indexed (row, col).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.utils.transforms import ResizeLongestSide

PreprocessMode = Literal["sam", "medsam"]

SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


def medsam_preprocess(image: np.ndarray, size: int = 1024) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, size, size) float32 in [0, 1], exactly as MedSAM prepares images.

    MedSAM calls ``skimage.transform.resize(img, (1024, 1024), order=3, preserve_range=True,
    anti_aliasing=True).astype(np.uint8)`` and then ``(x - min) / clip(max - min, 1e-8)``; the
    uint8 cast (which truncates the clipped bicubic values) is part of what the model was trained
    on, so it is kept rather than replaced by a float resize.
    """
    from skimage.transform import resize

    resized = resize(image, (size, size), order=3, preserve_range=True, anti_aliasing=True).astype(
        np.uint8
    )
    x = resized.astype(np.float64)
    x = (x - x.min()) / np.clip(x.max() - x.min(), a_min=1e-8, a_max=None)
    return torch.from_numpy(x).permute(2, 0, 1).float().contiguous()


def _resize_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """(n_out, n_in) matrix of a 1D bilinear resize (``align_corners=False``, no antialias): the
    identity resized along its rows, so column j is where input sample j goes."""
    eye = torch.eye(n_in, dtype=torch.float64)[None, None]
    return F.interpolate(eye, (n_out, n_in), mode="bilinear", align_corners=False)[0, 0].float()


class SamTransform:
    """Maps images, prompts and masks into the model's input frame and logits back out.

    Args:
        image_size: side of the square model input (1024 for official SAM, 256 for ``tiny``).
        mode: ``"sam"`` or ``"medsam"`` (see module docstring).
    """

    def __init__(self, image_size: int, mode: PreprocessMode = "sam") -> None:
        if mode not in ("sam", "medsam"):
            raise ValueError(f"model.preprocess must be 'sam' or 'medsam', got {mode!r}")
        self.image_size = int(image_size)
        self.mode = mode
        self._resize = ResizeLongestSide(self.image_size)
        self._mean = torch.tensor(SAM_PIXEL_MEAN).view(3, 1, 1)
        self._std = torch.tensor(SAM_PIXEL_STD).view(3, 1, 1)
        self._matrices: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def low_res_size(self) -> int:
        """Side of the decoder's low-resolution logits (image_size / 4)."""
        return self.image_size // 4

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        """(h, w) of the image inside the model input before padding."""
        if self.mode == "medsam":
            return self.image_size, self.image_size
        return ResizeLongestSide.get_preprocess_shape(*original_size, self.image_size)

    def apply_image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 image -> (3, S, S) float32 model input."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        if self.mode == "medsam":
            return medsam_preprocess(image, self.image_size)
        resized = torch.as_tensor(self._resize.apply_image(image)).permute(2, 0, 1).float()
        x = (resized - self._mean) / self._std
        h, w = x.shape[-2:]
        return F.pad(x, (0, self.image_size - w, 0, self.image_size - h))

    def apply_coords(self, coords: np.ndarray | torch.Tensor, original_size: tuple[int, int]):
        """(..., 2) (x, y) coordinates in original pixels -> model input frame (float)."""
        h, w = original_size
        new_h, new_w = self.input_size(original_size)
        scale = np.array([new_w / w, new_h / h], dtype=np.float64)
        if isinstance(coords, torch.Tensor):
            factor = torch.as_tensor(scale, dtype=torch.float32, device=coords.device)
            return coords.float() * factor
        return np.asarray(coords, dtype=np.float64) * scale

    def apply_boxes(self, boxes: np.ndarray | torch.Tensor, original_size: tuple[int, int]):
        """(N, 4) boxes [x_min, y_min, x_max, y_max] in original pixels -> model input frame."""
        return self.apply_coords(boxes.reshape(-1, 2, 2), original_size).reshape(-1, 4)

    def masks_to_low_res(self, masks: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(K, H, W) binary masks -> (K, S/4, S/4) float {0, 1} targets aligned with the logits.

        The mask is resized (nearest) into the input frame, padded like the image, then
        4x4-averaged and thresholded at 0.5, so target pixel (i, j) covers the same input pixels
        as logit pixel (i, j).
        """
        m = torch.as_tensor(np.asarray(masks)).float()[None]
        if m.shape[1] == 0:
            return torch.zeros(0, self.low_res_size, self.low_res_size)
        h, w = self.input_size(tuple(m.shape[-2:]))
        m = F.interpolate(m, (h, w), mode="nearest")
        m = F.pad(m, (0, self.image_size - w, 0, self.image_size - h))
        m = F.avg_pool2d(m, 4)
        return (m[0] >= 0.5).float()

    def resize_matrices(
        self, original_size: tuple[int, int] | None, device=None, dtype=torch.float32
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A_h, A_w) with ``A_h @ x @ A_w.T == postprocess(x, original_size)`` for (..., S/4,
        S/4) logits x, up to float rounding; ``original_size=None``: the 4x upsampling to the
        (S, S) input frame.

        Bilinear resizing is linear and separable, so SAM's upsample -> crop -> resize is one
        (H, S/4) and one (W, S/4) matrix, made by resizing the identity. The training loss uses
        them for images smaller than the input: their backward is two small matrix products,
        where ``F.interpolate``'s goes through the (S, S) frame (several times slower on a CPU;
        the products grow with H x W x S/4, so large images keep ``postprocess``).
        """
        key = (None if original_size is None else tuple(original_size), str(device), dtype)
        cache = self._matrices
        if key not in cache:
            low, s = self.low_res_size, self.image_size
            if original_size is None:
                mats = (_resize_matrix(low, s), _resize_matrix(low, s))
            elif self.mode == "medsam":
                h, w = original_size
                mats = (_resize_matrix(low, h), _resize_matrix(low, w))
            else:
                (h, w), (big_h, big_w) = self.input_size(original_size), original_size
                up = _resize_matrix(low, s)
                mats = (_resize_matrix(h, big_h) @ up[:h], _resize_matrix(w, big_w) @ up[:w])
            cache[key] = tuple(m.to(device=device, dtype=dtype) for m in mats)
        return cache[key]

    def postprocess(self, low_res_logits: torch.Tensor, original_size: tuple[int, int]):
        """(N, C, S/4, S/4) logits -> (N, C, H, W) logits at the original size.

        ``sam`` mode equals ``Sam.postprocess_masks``: upsample to S, crop the padding, resize to
        the original size. ``medsam`` mode resizes straight to the original size, as MedSAM does.
        """
        if self.mode == "medsam":
            size = tuple(original_size)
            return F.interpolate(low_res_logits, size, mode="bilinear", align_corners=False)
        x = F.interpolate(
            low_res_logits, (self.image_size, self.image_size), mode="bilinear", align_corners=False
        )
        h, w = self.input_size(original_size)
        x = x[..., :h, :w]
        return F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)

    def binarize(
        self, low_res_logits: torch.Tensor, original_size: tuple[int, int], threshold: float = 0.0
    ) -> torch.Tensor:
        """(N, C, S/4, S/4) logits -> (N, C, H, W) bool masks at the original size.

        ``sam``: ``postprocess(...) > threshold`` (``SamPredictor``). ``medsam``: MedSAM's
        ``MedSAM_Inference.py`` order, sigmoid, then bilinear to the original size, then > 0.5;
        bilinear interpolation does not commute with the sigmoid, so upsampling the logits and
        thresholding at 0 moves the boundary.
        """
        if self.mode == "medsam":
            prob = torch.sigmoid(low_res_logits.float())
            size = tuple(original_size)
            return F.interpolate(prob, size, mode="bilinear", align_corners=False) > 0.5
        return self.postprocess(low_res_logits, original_size) > threshold
