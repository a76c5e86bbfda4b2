"""Our preprocess + encode + decode + postprocess equals segment_anything.SamPredictor."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from segment_anything import SamPredictor

from sam_ft.model.builders import build_sam_architecture
from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.types import Prompt


@pytest.fixture(scope="module")
def sam_1024():
    torch.manual_seed(0)
    return build_sam_architecture("tiny", image_size=1024)


@pytest.fixture(scope="module")
def image():
    # Non-square 8-bit image with structure, so resize and padding both matter.
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(300, 457, 3), dtype=np.uint8)
    img[100:200, 150:300] = 220
    return img


@pytest.fixture(scope="module")
def reference(sam_1024, image):
    predictor = SamPredictor(sam_1024)
    predictor.set_image(image)
    return predictor


CASES = {
    "box": Prompt(box=[150, 100, 300, 200]),
    "points_pos_neg": Prompt(points=[[200, 150], [400, 50], [160, 120]], point_labels=[1, 0, 1]),
    "box_and_point": Prompt(box=[150, 100, 300, 200], points=[[220, 140]], point_labels=[1]),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("multimask", [True, False])
def test_mask_logits_equal_sam_predictor(sam_1024, image, reference, name, multimask):
    prompt = CASES[name]
    ref_logits, ref_iou, ref_low = reference.predict(
        point_coords=prompt.points,
        point_labels=prompt.point_labels,
        box=prompt.box,
        multimask_output=multimask,
        return_logits=True,
    )
    model = TrainableSam(sam_1024).eval()
    logits, iou, low = model.predict(image, [prompt], multimask_output=multimask)
    assert logits.shape == (1, 3 if multimask else 1, 300, 457)
    assert np.abs(logits[0].numpy() - ref_logits).max() <= 1e-4
    assert np.abs(iou[0].numpy() - ref_iou).max() <= 1e-4


def test_many_prompts_in_one_call_match_one_by_one(sam_1024, image):
    model = TrainableSam(sam_1024).eval()
    prompts = [CASES["box"], Prompt(box=[10, 20, 100, 250]), CASES["points_pos_neg"]]
    together, iou_together, _ = model.predict(image, prompts)
    for i, prompt in enumerate(prompts):
        alone, iou_alone, _ = model.predict(image, [prompt])
        assert torch.allclose(together[i], alone[0], atol=1e-4)
        assert torch.allclose(iou_together[i], iou_alone[0], atol=1e-5)


def test_preprocess_equals_predictor_input(sam_1024, image, reference):
    model = TrainableSam(sam_1024)
    ours = model.preprocess(image)
    resized = reference.transform.apply_image(image)
    theirs = sam_1024.preprocess(torch.as_tensor(resized).permute(2, 0, 1)[None].float())[0]
    assert torch.equal(ours, theirs)


def test_decode_gradients_equal_finite_differences():
    """Back-propagation through decode and encode gives each weight the loss's true slope: along
    the gradient g, a central difference of the loss (step 1e-3) equals |g| (the decoder's last
    upscaling layer and the encoder's first layer, so the whole path is covered)."""
    torch.manual_seed(0)
    model = TrainableSam(build_sam_architecture("tiny"))
    image = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)

    def loss() -> torch.Tensor:
        emb = model.encode(model.preprocess(image)[None])[0]
        logits, iou = model.decode(emb, [Prompt(box=[5, 5, 40, 30])], (64, 80))
        return logits.mean() + iou.mean()

    loss().backward()
    eps = 1e-3
    for weight in (
        model.sam.mask_decoder.output_upscaling[0].weight,
        model.sam.image_encoder.patch_embed.proj.weight,
    ):
        grad = weight.grad.clone()
        step = eps * grad / grad.norm()
        with torch.no_grad():
            weight += step
            up = loss()
            weight -= 2 * step
            down = loss()
            weight += step
        slope = float(up - down) / (2 * eps)
        assert grad.norm() > 0 and slope == pytest.approx(float(grad.norm()), rel=1e-2)
