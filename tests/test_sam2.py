"""SAM 2.1 from the official ``sam2`` package: our backend equals ``SAM2ImagePredictor``.

Random weights saved in the official checkpoint format (``{"model": state dict}``, no download
here). The reference model is built by ``sam2.build_sam.build_sam2`` itself (Hydra's compose on
sam2's own config module, inside ``initialize_config_module``, which clears it again) and run
through ``SAM2ImagePredictor``; ours is ``build_trainable_sam`` (OmegaConf + instantiate, no
global Hydra state). The default suite runs Hiera-T at 256 x 256 (the official predictor's
feature sizes then set as MedSAM2's fork derives them); the heavy tier at the official 1024.
"""

from __future__ import annotations

import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if importlib.util.find_spec("sam2") is None:  # pragma: no cover
    pytest.skip("sam2 is not installed (pip install 'sam_ft[sam2]')", allow_module_level=True)

from sam_ft.defaults import build_from_yaml  # noqa: E402
from sam_ft.model.builders import build_sam_architecture  # noqa: E402
from sam_ft.prompts.strategies import make_eval_prompt  # noqa: E402
from sam_ft.prompts.types import Prompt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SIZE = 256
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"


def save_random_weights(path: Path, size: int, seed: int = 0) -> Path:
    """Random Hiera-T weights in sam2's checkpoint format."""
    torch.manual_seed(seed)
    sam = build_sam_architecture("sam2.1_hiera_t", size)
    # Random but not degenerate: the no-memory embedding and the object pointer matter.
    torch.save({"model": sam.state_dict()}, path)
    return path


def official_predictor(checkpoint: Path, size: int):
    """``SAM2ImagePredictor`` on ``build_sam2``'s model (its own Hydra compose)."""
    from hydra import initialize_config_module

    from sam_ft.model.sam2_model import import_sam2

    import_sam2()
    from sam2.build_sam import build_sam2
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    side = size // 16
    overrides = [
        f"++model.image_size={size}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{side},{side}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{side},{side}]",
    ]
    with initialize_config_module("sam2", version_base="1.2"):
        model = build_sam2(CONFIG, str(checkpoint), device="cpu", hydra_overrides_extra=overrides)
    predictor = SAM2ImagePredictor(model)
    # The official predictor hard-codes 1024's feature sizes; MedSAM2's fork derives them so.
    predictor._bb_feat_sizes = [(size // 4 // 2**k,) * 2 for k in range(3)]
    return predictor


def _image() -> np.ndarray:
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(300, 457, 3), dtype=np.uint8)
    img[100:200, 150:300] = 220
    return img


CASES = {
    "box": Prompt(box=[150, 100, 300, 200]),
    "point1": Prompt(points=[[200, 150]], point_labels=[1]),
    "point5": Prompt(
        points=[[200, 150], [400, 50], [160, 120], [250, 180], [30, 30]],
        point_labels=[1, 0, 1, 1, 0],
    ),
    "box_point1": Prompt(box=[150, 100, 300, 200], points=[[220, 140]], point_labels=[1]),
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> Path:
    return save_random_weights(tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_t.pt", SIZE)


@pytest.fixture(scope="module")
def ours(weights):
    return build_from_yaml(
        "model", "sam2.1_hiera_t", checkpoint=str(weights), image_size=SIZE
    ).eval()


@pytest.fixture(scope="module")
def reference(weights):
    predictor = official_predictor(weights, SIZE)
    predictor.set_image(_image())
    return predictor


def test_builds_without_touching_hydra_and_loads_strictly(ours, reference):
    from hydra.core.global_hydra import GlobalHydra

    assert not GlobalHydra.instance().is_initialized()
    theirs = reference.model.state_dict()
    mine = ours.sam.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


def test_preprocess_equals_predictor_input(ours, reference):
    image = _image()
    assert torch.equal(ours.preprocess(image), reference._transforms(image))


@pytest.mark.parametrize("multimask", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_masks_equal_sam2_image_predictor(ours, reference, name, multimask):
    prompt = CASES[name]
    ref_logits, ref_iou, _ = reference.predict(
        point_coords=prompt.points,
        point_labels=prompt.point_labels,
        box=prompt.box,
        multimask_output=multimask,
        return_logits=True,
    )
    logits, iou, low = ours.predict(_image(), [prompt], multimask_output=multimask)
    assert logits.shape == (1, 3 if multimask else 1, 300, 457)
    assert np.abs(logits[0].numpy() - ref_logits).max() <= 1e-4
    assert np.abs(iou[0].numpy() - ref_iou).max() <= 1e-5
    # The masks the engine scores (binarize) are the predictor's, pixel for pixel.
    np.testing.assert_array_equal(ours.binarize(low, (300, 457))[0].numpy(), ref_logits > 0)


def test_many_prompts_in_one_call_match_one_by_one(ours):
    prompts = list(CASES.values()) + [Prompt(box=[10, 20, 100, 250])]
    together, iou_together, _ = ours.predict(_image(), prompts, True)
    for i, prompt in enumerate(prompts):
        alone, iou_alone, _ = ours.predict(_image(), [prompt], True)
        assert torch.allclose(together[i], alone[0], atol=1e-4)
        assert torch.allclose(iou_together[i], iou_alone[0], atol=1e-5)


def test_predict_cli_on_an_export_gives_sam2_image_predictor_masks(ours, weights, tmp_path):
    """``predict.py`` on exported SAM 2.1 weights with their card, an 8-bit PNG and a typed
    box: the label map is SAM2ImagePredictor's single mask, pixel for pixel."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from PIL import Image

    from sam_ft.defaults import config_dir
    from sam_ft.inference.card import write_model_card
    from sam_ft.model.checkpoint import export_official
    from sam_ft.predict import predict

    exported = export_official(ours, tmp_path / "run" / "sam_finetuned.pth")
    task = {"name": "shapes", "modality": "MR", "intensity": {"mode": "none"},
            "slice_axis": "auto", "channel": 0, "label_binarize": False,
            "labels": None}  # fmt: skip
    model = {"name": "sam2.1_hiera_t", "image_size": SIZE, "preprocess": "sam2"}
    cfg = OmegaConf.create(
        {
            "model": model,
            "finetune": {"_target_": "x", "name": "decoder"},
            "task": task,
            "data": {"min_object_pixels": 20},
        }
    )
    write_model_card(exported, OmegaConf.to_container(cfg), multimask_output=False)
    gray = _image()[..., 0]
    png = tmp_path / "slice.png"
    Image.fromarray(gray).save(png)
    overrides = [f"checkpoint={exported}", f"input={png}", f"output={tmp_path / 'out'}",
                 "box=[150,100,300,200]", "overlay=false"]  # fmt: skip
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        predict(compose("predict", overrides))
    got = np.asarray(Image.open(tmp_path / "out" / "slice.png")) == 1
    predictor = official_predictor(exported, SIZE)
    predictor.set_image(np.repeat(gray[..., None], 3, axis=2))
    expected, _, _ = predictor.predict(box=np.array([150, 100, 300, 200]), multimask_output=False)
    np.testing.assert_array_equal(got, expected[0].astype(bool))


def test_medsam2_settings_are_its_released_configuration():
    """MedSAM2's sam2.1_hiera_t512.yaml differs from the official sam2.1_hiera_t.yaml in three
    values only: image_size 512 and the memory attention's RoPE sizes [32, 32] (twice)."""
    from omegaconf import OmegaConf

    from sam_ft.model.sam2_model import sam2_model_config
    from sam_ft.model.specs import SPECS

    spec = SPECS["medsam2"]
    ours = OmegaConf.to_container(sam2_model_config(spec.config, spec.image_size))
    official = OmegaConf.to_container(sam2_model_config(spec.config))
    layer = ours["memory_attention"]["layer"]
    assert ours["image_size"] == 512 and official["image_size"] == 1024
    assert layer["self_attention"]["feat_sizes"] == [32, 32]
    assert layer["cross_attention"]["feat_sizes"] == [32, 32]
    for part in ("self_attention", "cross_attention"):
        official["memory_attention"]["layer"][part]["feat_sizes"] = [32, 32]
    assert ours == {**official, "image_size": 512}


@pytest.mark.heavy
def test_medsam2_is_sam2_tiny_at_512_with_the_released_checkpoint_format(tmp_path):
    """``model=medsam2``: MedSAM2's released configuration (sam2.1_hiera_t512.yaml = the
    official Hiera-T config at image_size 512); a file in its checkpoint format (``{"model":
    state dict}``) loads strictly, and a box gives the masks of SAM2ImagePredictor run as
    MedSAM2's fork runs it at 512."""
    weights = save_random_weights(tmp_path / "MedSAM2_latest.pt", 512, seed=5)
    ours = build_from_yaml("model", "medsam2", checkpoint=str(weights)).eval()
    assert ours.image_size == 512 and ours.transform.mode == "sam2"
    predictor = official_predictor(weights, 512)
    image, prompt = _image(), CASES["box"]
    predictor.set_image(image)
    ref, _, _ = predictor.predict(box=np.asarray(prompt.box), return_logits=True)
    logits, _, _ = ours.predict(image, [prompt], True)
    assert np.abs(logits[0].numpy() - ref).max() <= 1e-4


def test_missing_package_is_one_line_naming_the_extra(monkeypatch):
    from sam_ft.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "sam2" else real(name, *a)
    )
    with pytest.raises(ConfigError) as err:
        build_from_yaml("model", "sam2.1_hiera_t", checkpoint=None, image_size=SIZE)
    message = str(err.value)
    assert "\n" not in message and "pip install 'sam_ft[sam2]'" in message
    assert message.startswith("model.name=sam2.1_hiera_t needs the package sam2")


def test_lora_trains_hiera_and_its_export_loads_in_sam2(weights, tmp_path):
    """``finetune=lora`` adapts every Hiera attention's qkv (gradients reach the adapters, the
    embedding is then not cacheable); the export merges them into the official layout."""
    from sam_ft.model.checkpoint import export_official
    from sam_ft.model.finetune import LoRALinear

    model = build_from_yaml("model", "sam2.1_hiera_t", checkpoint=str(weights), image_size=SIZE)
    build_from_yaml("finetune", "lora", rank=2, alpha=2.0).apply(model)
    adapters = [m for m in model.image_encoder.modules() if isinstance(m, LoRALinear)]
    assert len(adapters) == 12 and not model.encoder_frozen
    conv_s0 = model.mask_decoder.conv_s0.weight
    assert not conv_s0.requires_grad  # part of the embedding: frozen with the encoder
    model.train()
    embedding = model.encode(model.preprocess(_image())[None])
    low, iou = model.decode(
        {k: v[0] for k, v in embedding.items()}, [CASES["box"]], (300, 457), True
    )
    (low.mean() + iou.mean()).backward()
    grad = adapters[0].lora_b.grad  # B starts at zero, so A gets none yet
    assert grad is not None and grad.abs().sum() > 0
    with torch.no_grad():  # non-zero adapters, so that merging them changes the weights
        for m in adapters:
            m.lora_b.normal_(std=0.01)
    model.eval()
    expected, _, _ = model.predict(_image(), [CASES["box"]], True)
    exported = export_official(model, tmp_path / "lora.pth")
    predictor = official_predictor(exported, SIZE)
    predictor.set_image(_image())
    box = CASES["box"].box
    ref, _, _ = predictor.predict(box=np.asarray(box), multimask_output=True, return_logits=True)
    assert np.abs(expected[0].numpy() - ref).max() <= 1e-3


def _spawned_build(checkpoint: str, queue) -> None:
    from hydra.core.global_hydra import GlobalHydra

    model = build_from_yaml(
        "model", "sam2.1_hiera_t", checkpoint=checkpoint, image_size=SIZE
    ).eval()
    logits, _, _ = model.predict(_image(), [CASES["box"]], True)
    queue.put((GlobalHydra.instance().is_initialized(), logits.numpy()))


@pytest.mark.heavy
def test_builds_in_a_spawned_worker(ours, weights):
    """A spawned process (as DDP's workers are) builds the same model, Hydra left unset."""
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_spawned_build, args=(str(weights), queue))
    proc.start()
    hydra_set, logits = queue.get(timeout=300)
    proc.join(timeout=60)
    assert proc.exitcode == 0 and not hydra_set
    expected, _, _ = ours.predict(_image(), [CASES["box"]], True)
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-5)


def _shapes_task(root: Path) -> dict[str, tuple[np.ndarray, list[np.ndarray]]]:
    """Two 8-bit PNG slices of bright shapes on noise, two labelled objects each."""
    from PIL import Image

    rng = np.random.default_rng(1)
    cases = {}
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    for i, (h, w) in enumerate([(180, 240), (200, 160)]):
        image = rng.integers(0, 80, size=(h, w), dtype=np.uint8)
        label = np.zeros((h, w), dtype=np.uint8)
        rows, cols = np.ogrid[:h, :w]
        label[(rows - h // 3) ** 2 + (cols - w // 3) ** 2 < (h // 6) ** 2] = 1
        label[h // 2 + 10 : h - 20, w // 2 : w - 15] = 2
        image[label == 1] = 200
        image[label == 2] = 140
        Image.fromarray(image).save(root / "imagesTr" / f"shape_{i}.png")
        Image.fromarray(label).save(root / "labelsTr" / f"shape_{i}.png")
        rgb = np.repeat(image[..., None], 3, axis=2)
        cases[f"shape_{i}"] = (rgb, [label == v for v in (1, 2)])
    return cases


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


def _official_oracle_dice(predictor, image, masks, case) -> dict[tuple, float]:
    """Per (case, label, prompt): the best Dice of SAM2ImagePredictor's masks for the prompt
    the engine makes (``make_eval_prompt``, no jitter); 3 masks for a lone point, else 1."""
    predictor.set_image(image)
    out = {}
    for value, mask in enumerate(masks, start=1):
        for strategy in ("box", "point1"):
            prompt = make_eval_prompt(
                mask, strategy, None, seed=42, case=case, slice_index=0, label=value
            )
            pred, _, _ = predictor.predict(
                point_coords=prompt.points,
                point_labels=prompt.point_labels,
                box=prompt.box,
                multimask_output=strategy == "point1",
            )
            out[(case, value, strategy)] = max(_dice(p.astype(bool), mask) for p in pred)
    return out


@pytest.mark.parametrize("size", [SIZE, pytest.param(1024, marks=pytest.mark.heavy)])
def test_evaluate_cli_gives_sam2_image_predictor_dice(size, tmp_path):
    """The issue's done-when: ``evaluate.py model=sam2.1_hiera_t model.checkpoint=PATH
    task=folder task.root=DIR 'eval.prompts=[box,point1]' eval.mask_selection=oracle`` on an
    official-format checkpoint: per object and prompt the Dice of SAM2ImagePredictor (relative
    difference <= 2%)."""
    weights = save_random_weights(tmp_path / "sam2.1_hiera_t.pt", size, seed=3)
    cases = _shapes_task(tmp_path / "task")
    predictor = official_predictor(weights, size)
    expected = {}
    for case, (image, masks) in cases.items():
        expected.update(_official_oracle_dice(predictor, image, masks, case))
    run = tmp_path / "run"
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    args = [
        "model=sam2.1_hiera_t", f"model.checkpoint={weights}", f"model.image_size={size}",
        "model.encoder_bf16=false", "task=folder", f"task.root={tmp_path / 'task'}",
        "task.intensity.mode=none", "eval.prompts=[box,point1]", "eval.mask_selection=oracle",
        "eval.jitter_px=[]", "eval.split=all", "eval.overlays=0", "seed=42",
        f"hydra.run.dir={run}",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (per_object,) = run.rglob("per_object.csv")
    with open(per_object) as f:
        got = {
            (r["case"], int(r["label"]), r["prompt"]): float(r["dice"]) for r in csv.DictReader(f)
        }
    assert got.keys() == expected.keys()
    for key, want in expected.items():
        assert abs(got[key] - want) <= 0.02 * max(want, 1e-6) + 1e-9, (key, got[key], want)


def test_decoder_finetuning_on_the_demo_exports_what_sam2_loads(tmp_path):
    """``train.py model=sam2.1_hiera_t finetune=decoder task=demo`` (Hiera-T at 256, random
    weights): it trains from cached embeddings (SAM 2's: a dict of 3 maps), and its
    ``sam_finetuned.pth`` loads strictly through ``sam2.build_sam.build_sam2``, whose
    ``SAM2ImagePredictor`` then gives the masks of our model on the same file."""
    cache, run = tmp_path / "cache", tmp_path / "run"
    env = dict(os.environ, SAM_FT_CACHE=str(cache), WANDB_MODE="offline", OMP_NUM_THREADS="1")
    env.pop("WANDB_API_KEY", None)
    args = [
        "model=sam2.1_hiera_t", f"model.image_size={SIZE}", "task=demo", "finetune=decoder",
        "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "train.overlays=0", "train.evaluate=false", f"hydra.run.dir={run}",
    ]  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    entries = list(cache.rglob("embeddings/*/*/*.pt"))
    assert entries, "no embedding was cached"
    entry = torch.load(entries[0], weights_only=True)
    side = SIZE // 16
    assert {k: tuple(v.shape) for k, v in entry["embedding"].items()} == {
        "image_embed": (256, side, side),
        "high_res_0": (32, 4 * side, 4 * side),
        "high_res_1": (64, 2 * side, 2 * side),
    }
    exported = run / "sam_finetuned.pth"
    predictor = official_predictor(exported, SIZE)  # strict: raises on any key mismatch
    image, prompt = _image(), CASES["box_point1"]
    predictor.set_image(image)
    ref, _, _ = predictor.predict(
        point_coords=prompt.points, point_labels=prompt.point_labels, box=prompt.box,
        multimask_output=False, return_logits=True,
    )  # fmt: skip
    ours = build_from_yaml(
        "model", "sam2.1_hiera_t", checkpoint=str(exported), image_size=SIZE
    ).eval()
    logits, _, _ = ours.predict(image, [prompt], multimask_output=False)
    assert np.abs(logits[0].numpy() - ref).max() <= 1e-4


@pytest.mark.heavy
def test_ddp_training_on_two_cpu_ranks_and_resume(tmp_path):
    """SAM 2.1 under DDP (2 CPU processes, gloo; Lightning starts the second rank as a new
    Hydra task, which builds sam2 again without compose), then resumed from ``last.ckpt`` for
    a second epoch; the export loads in sam2."""
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline")
    env.pop("OMP_NUM_THREADS", None)  # Lightning gives each rank its share of the cores
    run = tmp_path / "run"
    common = [
        "model=sam2.1_hiera_t", f"model.image_size={SIZE}", "task=demo", "finetune=decoder",
        "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", "train.overlays=0",
        "train.evaluate=false", f"hydra.run.dir={run}",
    ]  # fmt: skip
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.max_epochs=1"]
    for args in (ddp, ["trainer.max_epochs=2", "ckpt_path=last"]):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "train.py"), *common, *args],
            env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
    last = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    # 2 steps in the DDP epoch, 2 more in the resumed one: it went on from the first's state.
    assert last["global_step"] == 4
    official_predictor(run / "sam_finetuned.pth", SIZE)  # loads strictly
