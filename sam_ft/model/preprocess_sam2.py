"""SAM 2's own pre- and postprocessing (mode ``sam2``), equal to ``SAM2ImagePredictor``'s
(``sam2.utils.transforms.SAM2Transforms``):

* image (H, W, 3) uint8: ``ToTensor`` (to [0, 1]), resized to S x S (torchvision bilinear with
  antialiasing; the aspect ratio is NOT kept, no padding), normalised with ImageNet's mean/std;
* prompts (x, y): ``x / W * S``, ``y / H * S`` in float32, in that order (boxes as two corners);
* logits: the decoder's (S/4 x S/4) low-resolution logits bilinear (``align_corners=False``)
  straight to (H, W); the mask is ``logit > 0``.

SAM's pipeline (``sam_ft.model.preprocess``) keeps the aspect ratio and pads instead.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.transforms import functional as TF

from sam_ft.model.preprocess import SamTransform, _resize_matrix

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Sam2Transform(SamTransform):
    """``SamTransform``'s interface with SAM 2's transforms (module docstring)."""

    def __init__(self, image_size: int) -> None:
        super().__init__(image_size, "sam")
        self.mode = "sam2"

    def input_size(self, original_size: tuple[int, int]) -> tuple[int, int]:
        return self.image_size, self.image_size

    def apply_image(self, image: np.ndarray) -> torch.Tensor:
        """(H, W, 3) uint8 -> (3, S, S) float32, as ``SAM2Transforms.__call__``."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"expected an (H, W, 3) uint8 image, got {image.shape} {image.dtype}")
        x = TF.to_tensor(image)
        x = TF.resize(x, [self.image_size, self.image_size], antialias=True)
        return TF.normalize(x, list(IMAGENET_MEAN), list(IMAGENET_STD))

    def apply_coords(self, coords, original_size):
        """(..., 2) (x, y) original pixels -> the S x S frame: float32 ``x / W * S``, ``y / H * S``
        (``SAM2Transforms.transform_coords``, the same operations in the same order)."""
        h, w = original_size
        t = torch.as_tensor(np.asarray(coords) if not torch.is_tensor(coords) else coords)
        t = t.to(torch.float32).clone()
        t[..., 0] = t[..., 0] / w
        t[..., 1] = t[..., 1] / h
        t = t * self.image_size
        return t if torch.is_tensor(coords) else t.numpy()

    def resize_matrices(self, original_size, device=None, dtype=torch.float32):
        """(A_h, A_w) with ``A_h @ x @ A_w.T == postprocess(x, original_size)``; None: the 4x
        upsampling to the (S, S) input frame."""
        key = (None if original_size is None else tuple(original_size), str(device), dtype)
        if key not in self._matrices:
            low, s = self.low_res_size, self.image_size
            h, w = (s, s) if original_size is None else original_size
            mats = (_resize_matrix(low, h), _resize_matrix(low, w))
            self._matrices[key] = tuple(m.to(device=device, dtype=dtype) for m in mats)
        return self._matrices[key]

    def postprocess(self, low_res_logits: torch.Tensor, original_size: tuple[int, int]):
        """(N, C, S/4, S/4) logits -> (N, C, H, W), as ``SAM2Transforms.postprocess_masks``
        (with no hole filling: the predictor's default ``max_hole_area=0``)."""
        size = tuple(original_size)
        return F.interpolate(low_res_logits.float(), size, mode="bilinear", align_corners=False)

    def binarize(self, low_res_logits, original_size, threshold: float = 0.0) -> torch.Tensor:
        return self.postprocess(low_res_logits, original_size) > threshold
