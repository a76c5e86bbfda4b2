"""SamTransform: MedSAM's preprocessing as MedSAM's own code writes it; the training loss's
upsampling as SAM's postprocess_masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from wrapped_sam import wrap_sam

from sam_ft.model.preprocess import SamTransform


def _medsam_reference(img_3c: np.ndarray, size: int) -> np.ndarray:
    """MedSAM_Inference.py, verbatim apart from the size."""
    from skimage import transform

    img_1024 = transform.resize(
        img_3c, (size, size), order=3, preserve_range=True, anti_aliasing=True
    ).astype(np.uint8)
    img_1024 = (img_1024 - img_1024.min()) / np.clip(
        img_1024.max() - img_1024.min(), a_min=1e-8, a_max=None
    )
    return np.transpose(img_1024, (2, 0, 1))


def test_medsam_mode_equals_medsam_code_on_downscale_and_upscale():
    rng = np.random.default_rng(0)
    for shape, size in (((97, 131), 64), ((23, 40), 64)):
        grey = rng.integers(0, 256, size=shape).astype(np.uint8)
        grey[: shape[0] // 3] = 255  # a sharp edge: bicubic overshoots, the cast must clip
        image = np.repeat(grey[..., None], 3, axis=2)
        ours = SamTransform(size, "medsam").apply_image(image)
        ref = torch.from_numpy(_medsam_reference(image, size)).float()
        assert ours.shape == (3, size, size) and ours.dtype == torch.float32
        assert torch.equal(ours, ref)
        # The uint8 cast is part of it: at most 256 distinct values.
        assert len(torch.unique(ours)) <= 256


@pytest.mark.parametrize("mode", ["sam", "medsam"])
@pytest.mark.parametrize("size", [(40, 70), (300, 200), (64, 64)])
def test_resize_matrices_equal_postprocess(mode, size):
    """The training loss's upsampling (two matrices) is SAM's postprocess_masks."""
    t = SamTransform(256, mode)
    x = torch.randn(3, 2, 64, 64, generator=torch.Generator().manual_seed(1))
    a_h, a_w = t.resize_matrices(size)
    torch.testing.assert_close(a_h @ x @ a_w.T, t.postprocess(x, size), atol=2e-5, rtol=1e-5)
    a_h, a_w = t.resize_matrices(None)
    up = torch.nn.functional.interpolate(x, (256, 256), mode="bilinear", align_corners=False)
    torch.testing.assert_close(a_h @ x @ a_w.T, up, atol=2e-5, rtol=1e-5)


def _medsam_masks(low_res_logits: torch.Tensor, h: int, w: int) -> np.ndarray:
    """MedSAM_Inference.py's medsam_inference tail: sigmoid, bilinear to (H, W), > 0.5."""
    low_res_pred = torch.sigmoid(low_res_logits)
    low_res_pred = torch.nn.functional.interpolate(
        low_res_pred, size=(h, w), mode="bilinear", align_corners=False
    )
    return (low_res_pred > 0.5).numpy()


def test_medsam_masks_are_sigmoid_then_upsampled_then_half():
    """The evaluation keeps MedSAM's mask: sigmoid before the upsampling, not logits > 0."""
    from sam_ft.evaluation.protocol.decode_select import decode_scored
    from sam_ft.model.builders import build_sam
    from sam_ft.prompts.types import Prompt

    torch.manual_seed(0)
    model = wrap_sam(build_sam("tiny", None), preprocess="medsam", multimask_output=False).eval()
    h, w = 300, 230
    image = np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8)
    prompts = [Prompt(box=[40, 60, 150, 220]), Prompt(box=[10, 10, 90, 120])]
    with torch.no_grad():
        emb = model.encode(model.preprocess(image)[None])[0]
        low, _ = model.decode(emb, prompts, (h, w), False)
        got = decode_scored(model, emb, prompts, np.zeros((2, h, w), bool), "single", 8)
    want = _medsam_masks(low, h, w)[:, 0]
    np.testing.assert_array_equal(got.masks, want)
    # The order matters: strongly curved logits give another boundary when thresholded at 0
    # after upsampling them (on a 4 x 4 logit grid upsampled to 15 x 15).
    x = torch.tensor([[-9.0, 4, -9, 4], [4, -9, 4, -9], [-9, 4, -9, 4], [4, -9, 4, -9]])[None, None]
    t = SamTransform(16, "medsam")
    np.testing.assert_array_equal(t.binarize(x, (15, 15)).numpy(), _medsam_masks(x, 15, 15))
    assert not np.array_equal(_medsam_masks(x, 15, 15), (t.postprocess(x, (15, 15)) > 0).numpy())
