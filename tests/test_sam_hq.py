"""SAM-HQ (the segment-anything-hq package): our model equals its official ``SamPredictor``.

The reference is SAM-HQ's own code: its ``Sam`` (with its ``ImageEncoderViT``, which returns the
intermediate features, and ``MaskDecoderHQ``) built at a CPU size, random weights saved as a plain
state dict (the format of ``sam_hq_vit_b.pth``), and its ``SamPredictor``. Ours is
``sam_hq_tiny`` (segment_anything's ViT + the HQ decoder) loading that file through our loader.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from sam_ft.model.builders import build_sam, build_trainable_sam
from sam_ft.model.sam_hq import TrainableSamHQ, import_hq
from sam_ft.model.specs import SPECS
from sam_ft.prompts.strategies import make_eval_prompt
from sam_ft.prompts.types import Prompt

hq = import_hq()
ROOT = Path(__file__).resolve().parents[1]


def official_hq_sam(size: int) -> torch.nn.Module:
    """SAM-HQ's ``_build_sam`` with ``sam_hq_tiny``'s dimensions (its builder is ViT-B/L/H only)."""
    spec, m = SPECS["sam_hq_tiny"], hq.modeling
    sam = m.Sam(
        image_encoder=m.ImageEncoderViT(
            depth=spec.encoder_depth, embed_dim=spec.encoder_embed_dim, img_size=size,
            mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads, patch_size=16, qkv_bias=True, use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size, out_chans=256,
        ),
        prompt_encoder=m.PromptEncoder(
            embed_dim=256, image_embedding_size=(size // 16, size // 16),
            input_image_size=(size, size), mask_in_chans=16,
        ),
        mask_decoder=m.MaskDecoderHQ(
            num_multimask_outputs=3,
            transformer=m.TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
            transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
            vit_dim=spec.encoder_embed_dim,
        ),
    )  # fmt: skip
    return sam.eval()


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (the HQ token's MLP and fusion layers included, whose default
    initialisation leaves some at zero), so each part of the decoder shows in the masks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 / max(p.shape[-1], 1) ** 0.5)


@pytest.fixture(scope="module")
def official_file(tmp_path_factory):
    """(official model, path of its state dict) at input 256, random weights."""
    sam = official_hq_sam(256)
    _randomize(sam, 0)
    path = tmp_path_factory.mktemp("hq") / "sam_hq_tiny.pth"
    torch.save(sam.state_dict(), path)
    return sam, path


@pytest.fixture(scope="module")
def image():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(150, 229, 3), dtype=np.uint8)
    img[50:100, 75:150] = 220
    return img


CASES = {
    "box": Prompt(box=[75, 50, 150, 100]),
    "point1": Prompt(points=[[110, 75]], point_labels=[1]),
    "point5": Prompt(
        points=[[110, 75], [80, 55], [140, 95], [100, 60], [200, 20]],
        point_labels=[1, 1, 1, 1, 0],
    ),
    "box_point1": Prompt(box=[75, 50, 150, 100], points=[[110, 75]], point_labels=[1]),
}


@pytest.mark.parametrize("hq_token_only", [False, True])
def test_masks_equal_sam_hq_predictor(official_file, image, hq_token_only):
    """Box, 1 point, 5 points, box + point, one call: the logits and IoU of the official
    ``SamPredictor.predict(multimask_output=False, hq_token_only=...)`` (1e-4)."""
    official, path = official_file
    predictor = hq.SamPredictor(official)
    predictor.set_image(image)
    ours = build_trainable_sam("sam_hq_tiny", str(path), hq_token_only=hq_token_only).eval()
    assert isinstance(ours, TrainableSamHQ)
    logits, iou, _ = ours.predict(image, list(CASES.values()))
    assert logits.shape == (len(CASES), 1, *image.shape[:2])
    for i, prompt in enumerate(CASES.values()):
        ref_logits, ref_iou, _ = predictor.predict(
            point_coords=prompt.points, point_labels=prompt.point_labels, box=prompt.box,
            multimask_output=False, return_logits=True, hq_token_only=hq_token_only,
        )  # fmt: skip
        assert np.abs(logits[i].numpy() - ref_logits).max() <= 1e-4
        assert np.abs(iou[i].numpy() - ref_iou).max() <= 1e-5
        assert 0.05 < (ref_logits > 0).mean() < 0.95  # a real mask, not an empty or full one


def test_hq_token_only_changes_the_masks(official_file, image):
    _, path = official_file
    a = build_trainable_sam("sam_hq_tiny", str(path)).predict(image, [CASES["box"]])[0]
    b = build_trainable_sam("sam_hq_tiny", str(path), hq_token_only=True)
    assert not torch.allclose(a, b.predict(image, [CASES["box"]])[0])


def test_official_sam_parity_holds_with_both_packages_imported(image):
    """Both modules live side by side: segment_anything's predictor on our SAM still matches."""
    import segment_anything

    assert hq.__name__ == "segment_anything_hq"
    assert hq.SamPredictor is not segment_anything.SamPredictor
    torch.manual_seed(0)
    sam = build_sam("tiny")
    predictor = segment_anything.SamPredictor(sam)
    predictor.set_image(image)
    ref, _, _ = predictor.predict(box=CASES["box"].box, multimask_output=True, return_logits=True)
    ours = build_trainable_sam("tiny").eval()
    ours.sam.load_state_dict(sam.state_dict())
    logits, _, _ = ours.predict(image, [CASES["box"]])
    assert np.abs(logits[0].numpy() - ref).max() <= 1e-4


def test_embedding_carries_the_early_vit_features(official_file, image):
    """encode -> (1, 256 + D, h, w): the neck's output, then the first global block's output,
    both equal to SAM-HQ's encoder's (its ``interm_embeddings[0]``)."""
    official, path = official_file
    ours = build_trainable_sam("sam_hq_tiny", str(path)).eval()
    x = ours.preprocess(image)[None]
    with torch.no_grad():
        emb = ours.encode(x)
        ref, interm = official.image_encoder(x)
    assert emb.shape == (1, 256 + SPECS["sam_hq_tiny"].encoder_embed_dim, 16, 16)
    torch.testing.assert_close(emb[:, :256], ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(emb[:, 256:], interm[0].permute(0, 3, 1, 2), atol=1e-5, rtol=1e-5)


def test_wrong_options_are_one_line_errors():
    from sam_ft.errors import ConfigError

    with pytest.raises(ConfigError, match="sam_hq_tiny returns one mask per prompt"):
        build_trainable_sam("sam_hq_tiny", multimask_output=True)
    with pytest.raises(ConfigError, match="tiny is not a SAM-HQ model"):
        build_trainable_sam("tiny", hq_token_only=True)


# --- evaluate.py on a folder: per-object Dice of the official predictor --------------------------


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * (a & b).sum() / max(a.sum() + b.sum(), 1)


@pytest.mark.parametrize(
    "model", ["sam_hq_tiny", pytest.param("sam_hq_vit_b", marks=pytest.mark.heavy)]
)
def test_evaluate_cli_on_png_folder_gives_official_dice(official_file, tmp_path, model):
    """``evaluate.py model=sam_hq_tiny model.checkpoint=PATH task=folder 'eval.prompts=[box,point1]'
    eval.mask_selection=oracle``: per object, Dice within 2% of SAM-HQ's ``SamPredictor`` on the
    same image and prompt (the protocol's prompt, made by ``make_eval_prompt``). ViT-B: SAM-HQ's
    own ``sam_model_registry["vit_b"]`` with random weights, in the heavy tier."""
    from PIL import Image

    official, path = official_file
    if model == "sam_hq_vit_b":
        official = hq.sam_model_registry["vit_b"]().eval()
        _randomize(official, 1)
        path = tmp_path / "sam_hq_vit_b.pth"
        torch.save(official.state_dict(), path)
    predictor = hq.SamPredictor(official)
    root = tmp_path / "task"
    for sub in ("imagesTr", "labelsTr"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(1)
    expected = {}
    yy, xx = np.mgrid[:120, :160]
    for i in range(2):
        gray = rng.integers(0, 120, size=(120, 160), dtype=np.uint8)
        label = np.zeros(gray.shape, np.uint8)
        label[((yy - 40 - 10 * i) / 18) ** 2 + ((xx - 50) / 25) ** 2 < 1] = 1
        label[20 + 5 * i : 100, 100:140] = 2
        gray[label > 0] += 100
        Image.fromarray(gray).save(root / "imagesTr" / f"c{i}.png")
        Image.fromarray(label).save(root / "labelsTr" / f"c{i}.png")
        predictor.set_image(np.repeat(gray[..., None], 3, axis=2))
        for value in (1, 2):
            gt = label == value
            for strategy in ("box", "point1"):
                p = make_eval_prompt(gt, strategy, None, seed=42, case=f"c{i}", slice_index=0,
                                     label=value)  # fmt: skip
                mask, _, _ = predictor.predict(point_coords=p.points, point_labels=p.point_labels,
                                               box=p.box, multimask_output=False)  # fmt: skip
                expected[(f"c{i}", value, strategy)] = _dice(mask[0], gt)
    run = tmp_path / "run"
    args = [
        f"model={model}", f"model.checkpoint={path}", "task=folder", f"task.root={root}",
        "task.intensity.mode=none", "eval.prompts=[box,point1]", "eval.mask_selection=oracle",
        "eval.jitter_px=[]", "eval.split=all", "eval.overlays=0", "model.encoder_bf16=false",
        f"hydra.run.dir={run}",
    ]  # fmt: skip
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (per_object,) = run.rglob("per_object.csv")
    with open(per_object) as f:
        got = {(r["case"], int(r["label"]), r["prompt"]): float(r["dice"])
               for r in csv.DictReader(f)}  # fmt: skip
    assert got.keys() == expected.keys()
    # The encoder was timed on each of the 2 images (sam_ft.evaluation.protocol.timing).
    (info,) = run.rglob("run_info.json")
    timed = json.loads(info.read_text())["models"]["zero_shot"]
    assert timed["encoder_images_timed"] == 2 and timed["encoder_seconds_per_image"] > 0
    assert any(v > 0.1 for v in expected.values())  # not all empty masks
    for key, want in expected.items():
        assert abs(got[key] - want) <= 0.02 * max(want, 1e-6) + 1e-9, (key, got[key], want)


# --- finetune=decoder on the demo task; the export loads into segment_anything_hq ----------------


@pytest.fixture(scope="module")
def hq_run(tmp_path_factory):
    """``train.py model=sam_hq_tiny task=demo finetune=decoder hq_token_only=true`` with the
    embedding cache (frozen encoder), a few steps."""
    tmp = tmp_path_factory.mktemp("hq_train")
    run = tmp / "run"
    args = [
        "model=sam_hq_tiny", "model.hq_token_only=true", "task=demo", "finetune=decoder",
        "data.cache_embeddings=true", "trainer.max_epochs=1", "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1", "eval.prompts=[box]", "eval.jitter_px=[]",
        "train.overlays=0", "eval.overlays=0", f"hydra.run.dir={run}",
    ]  # fmt: skip
    env = dict(os.environ, SAM_FT_CACHE=str(tmp / "cache"), WANDB_MODE="offline",
               OMP_NUM_THREADS="1")  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    return tmp, run


def test_finetune_decoder_on_demo_exports_sam_hq_weights(hq_run):
    """The HQ parts and SAM's mask decoder train, the encoder does not, the cached embeddings
    carry the early ViT features, and the export loads strictly into SAM-HQ's own classes."""
    tmp, run = hq_run
    # The cached embeddings hold the early ViT features too: (256 + 96, 16, 16) each.
    (entry, *_) = (tmp / "cache" / "cache" / "embeddings").rglob("*.pt")
    assert list(torch.load(entry, weights_only=True)["shape"])[-3:] == [256 + 96, 16, 16]
    exported = torch.load(run / "sam_finetuned.pth", weights_only=True)
    official = official_hq_sam(256)
    official.load_state_dict(exported, strict=True)
    # Seeded: the run's initial weights are those of the same seed's random build.
    torch.manual_seed(42)
    initial = build_sam("sam_hq_tiny").state_dict()
    changed = {k for k in initial if not torch.equal(initial[k], exported[k])}
    assert any(k.startswith("mask_decoder.hf_mlp.") for k in changed)
    assert any(k.startswith("mask_decoder.compress_vit_feat.") for k in changed)
    assert any(k.startswith("mask_decoder.output_hypernetworks_mlps.") for k in changed)
    assert not any(k.startswith(("image_encoder.", "prompt_encoder.")) for k in changed)
    assert json.loads((run / "sam_finetuned.json").read_text())["hq_token_only"] is True


def test_predict_cli_on_the_export_gives_the_official_masks(hq_run, image, tmp_path):
    """``predict.py checkpoint=<export>`` (its card says SAM-HQ, HQ token only) on an 8-bit
    PNG and a box: the label map is SAM-HQ's ``SamPredictor`` mask on the exported weights."""
    from hydra import compose, initialize_config_dir
    from PIL import Image

    from sam_ft.defaults import config_dir
    from sam_ft.predict import predict

    _, run = hq_run
    official = official_hq_sam(256)
    official.load_state_dict(torch.load(run / "sam_finetuned.pth", weights_only=True))
    gray = image[..., 0]
    predictor = hq.SamPredictor(official)
    predictor.set_image(np.repeat(gray[..., None], 3, axis=2))
    box = CASES["box"].box
    expected, _, _ = predictor.predict(box=np.asarray(box), multimask_output=False,
                                       hq_token_only=True)  # fmt: skip
    png = tmp_path / "slice.png"
    Image.fromarray(gray).save(png)
    overrides = [f"checkpoint={run / 'sam_finetuned.pth'}", f"input={png}",
                 f"output={tmp_path / 'out'}", f"box=[{','.join(str(v) for v in box)}]",
                 "overlay=false", "intensity={mode: none}"]  # fmt: skip
    with initialize_config_dir(config_dir=config_dir(), version_base="1.3"):
        predict(compose("predict", overrides))
    got = np.asarray(Image.open(tmp_path / "out" / "slice.png")) == 1
    assert 0 < expected[0].sum() < expected[0].size
    np.testing.assert_array_equal(got, expected[0])


@pytest.mark.heavy
def test_export_of_vit_b_size_loads_in_sam_model_registry(tmp_path):
    """Our ``sam_hq_vit_b`` export is a file SAM-HQ's own ``sam_model_registry["vit_b"]`` model
    takes with every key matched (its builder loads with strict=False, so strict is checked)."""
    from sam_ft.model.checkpoint import export_official

    torch.manual_seed(0)
    path = export_official(build_trainable_sam("sam_hq_vit_b", None), tmp_path / "hq_b.pth")
    official = hq.sam_model_registry["vit_b"]()
    official.load_state_dict(torch.load(path, weights_only=True), strict=True)


def test_grad_checkpointing_gives_the_same_embedding_and_gradients(image):
    torch.manual_seed(0)
    plain = build_trainable_sam("sam_hq_tiny").train()
    ckpt = build_trainable_sam("sam_hq_tiny", grad_checkpointing=True).train()
    ckpt.load_state_dict(plain.state_dict())
    x = plain.preprocess(image)[None]
    grads = []
    for model in (plain, ckpt):
        emb = model.encode(x)
        (emb[:, :256].square().mean() + emb[:, 256:].mean()).backward()
        grads.append((emb.detach(), model.sam.image_encoder.blocks[0].attn.qkv.weight.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_missing_package_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    from sam_ft.errors import ConfigError

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "segment_anything_hq" else
        real(name, *a)
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"^SAM-HQ models need .*sam_ft\[samhq\]") as err:
        build_trainable_sam("sam_hq_tiny")
    assert "\n" not in str(err.value)


def test_lora_trains_the_encoder_adapters_and_exports_sam_hq_weights(image, tmp_path):
    """finetune=lora on SAM-HQ: adapters in the ViT's qkv get gradients through the early
    features and the neck; the export (adapters merged) loads into SAM-HQ's classes."""
    from sam_ft.defaults import build_from_yaml
    from sam_ft.model.checkpoint import export_official

    torch.manual_seed(0)
    model = build_trainable_sam("sam_hq_tiny").train()
    build_from_yaml("finetune", "lora", rank=2).apply(model)
    x = model.preprocess(image)[None]
    low, iou = model.decode(model.encode(x)[0], [CASES["box"]], image.shape[:2])
    (low.mean() + iou.mean()).backward()
    qkv = model.sam.image_encoder.blocks[0].attn.qkv
    assert qkv.lora_b.grad is not None and qkv.lora_b.grad.abs().sum() > 0
    with torch.no_grad():
        qkv.lora_b.add_(0.1)  # a trained adapter, so merging changes the weight
    path = export_official(model, tmp_path / "lora.pth")
    official = official_hq_sam(256)
    official.load_state_dict(torch.load(path, weights_only=True), strict=True)
    merged = official.image_encoder.blocks[0].attn.qkv.weight
    assert not torch.equal(merged, qkv.base.weight)


def test_compile_encoder_compiles_what_encode_calls():
    model = build_trainable_sam("sam_hq_tiny", compile_encoder=True)
    assert all(block._compiled_call_impl is not None for block in model.sam.image_encoder.blocks)


@pytest.mark.heavy
def test_ddp_training_on_two_cpu_ranks_and_resume(tmp_path):
    """SAM-HQ under DDP (2 CPU processes, gloo), then resumed from ``last.ckpt`` for a second
    epoch; the export loads strictly into SAM-HQ's own classes."""
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), WANDB_MODE="offline")
    env.pop("OMP_NUM_THREADS", None)  # Lightning gives each rank its share of the cores
    run = tmp_path / "run"
    common = [
        "model=sam_hq_tiny", "task=demo", "finetune=decoder", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "train.overlays=0", "train.evaluate=false",
        f"hydra.run.dir={run}",
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
    official_hq_sam(256).load_state_dict(
        torch.load(run / "sam_finetuned.pth", weights_only=True), strict=True
    )
