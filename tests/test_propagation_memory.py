"""``eval.propagate.prompt=memory``: our propagator equals the official ``SAM2VideoPredictor``.

Random Hiera-T weights at 128 x 128 (cheap on a CPU) saved in sam2's checkpoint format; the
reference predictor is built by ``sam2.build_sam.build_sam2_video_predictor`` itself (Hydra's
compose inside ``initialize_config_module``) and fed the volume's slices the only way it takes
them, a folder of JPEG frames through ``init_state``. The volume is a real NIfTI file whose
slices are constant on aligned 8 x 8 blocks, so a quality-100 grey JPEG decodes to the very
pixels our propagator gets from the loader (asserted). Each chain runs as MedSAM2 runs one
object: a prompt on its key slice, ``propagate_in_video`` up, ``reset_state``, the prompt again,
``propagate_in_video(reverse=True)`` down.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch

if importlib.util.find_spec("sam2") is None:  # pragma: no cover
    pytest.skip("sam2 is not installed (pip install 'sam_ft[sam2]')", allow_module_level=True)

from wrapped_sam import wrap_sam

from sam_ft.evaluation.protocol.propagation import Chain, key_slices  # noqa: E402
from sam_ft.evaluation.protocol.propagation_memory import propagate_memory  # noqa: E402
from sam_ft.prompts.strategies import make_eval_prompt  # noqa: E402

nib = pytest.importorskip("nibabel")

SIZE = 128
CONFIG = "configs/sam2.1/sam2.1_hiera_t.yaml"
S, H, W = 6, 64, 64
SEED = 5


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    from sam_ft.model.builders import build_sam_architecture

    torch.manual_seed(0)
    sam = build_sam_architecture("sam2.1_hiera_t", SIZE)
    path = tmp_path_factory.mktemp("sam2") / "sam2.1_hiera_t.pt"
    torch.save({"model": sam.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def ours(weights):
    from sam_ft.defaults import build_from_yaml

    return build_from_yaml(
        "model", "sam2.1_hiera_t", checkpoint=str(weights), image_size=SIZE
    ).eval()


@pytest.fixture(scope="module")
def official(weights):
    """``SAM2VideoPredictor`` from sam2's own builder and Hydra config (no global state left)."""
    from hydra import initialize_config_module

    from sam_ft.model.sam2_model import import_sam2

    import_sam2()
    from sam2.build_sam import build_sam2_video_predictor

    side = SIZE // 16
    overrides = [
        f"++model.image_size={SIZE}",
        f"++model.memory_attention.layer.self_attention.feat_sizes=[{side},{side}]",
        f"++model.memory_attention.layer.cross_attention.feat_sizes=[{side},{side}]",
    ]
    with initialize_config_module("sam2", version_base="1.2"):
        return build_sam2_video_predictor(
            CONFIG, str(weights), device="cpu", hydra_overrides_extra=overrides
        )


@pytest.fixture(scope="module")
def case(tmp_path_factory):
    """A (W, H, S) NIfTI volume on 8 x 8 blocks: object 1 on slices 1-4 (widest on 2), object 2
    on slices 2-5, loaded as eval.mode=propagate loads it (every slice's image)."""
    from partial_api import find_cases, load_case

    root = tmp_path_factory.mktemp("volume")
    rng = np.random.default_rng(0)
    image = np.kron(rng.integers(0, 80, (S, H // 8, W // 8)), np.ones((1, 8, 8)))
    label = np.zeros((S, H, W), dtype=np.uint8)
    for s, right in zip(range(1, 5), (24, 40, 32, 24), strict=True):
        label[s, 8:32, 8:right] = 1
    label[2:6, 40:56, 32:56] = 2
    image[label == 1], image[label == 2] = 200, 140
    for sub, data in (("imagesTr", image.astype(np.float32)), ("labelsTr", label)):
        (root / sub).mkdir()
        nib.save(nib.Nifti1Image(data.transpose(2, 1, 0), np.eye(4)), root / sub / "vol.nii.gz")
    task = {"name": "vol", "source": "folder", "root": str(root), "modality": "MR"}
    task |= {"slice_axis": 2, "intensity": {"mode": "none"}}
    (files,) = find_cases(root, task)
    return load_case(files, task, {"min_object_pixels": 5}, keep_images=True)


@pytest.fixture(scope="module")
def official_state(official, case, tmp_path_factory):
    """``init_state`` on the slices written as JPEG frames, which decode to the same pixels."""
    from PIL import Image

    frames = tmp_path_factory.mktemp("frames")
    images = case.extra["images"]
    for s in range(len(images)):
        assert (images[s] == images[s][..., :1]).all()  # grey
        Image.fromarray(images[s][..., 0]).save(frames / f"{s:05d}.jpg", quality=100)
        decoded = np.array(Image.open(frames / f"{s:05d}.jpg").convert("RGB"))
        np.testing.assert_array_equal(decoded, images[s])
    return official.init_state(str(frames), offload_video_to_cpu=True)


def official_masks(predictor, state, chain: Chain) -> dict[int, np.ndarray]:
    """{slice: (H, W) bool} of one chain, by the official calls (module docstring)."""
    p, masks = chain.prompt, {}
    for reverse in (False, True):
        predictor.reset_state(state)
        predictor.add_new_points_or_box(
            state, frame_idx=chain.key, obj_id=1, points=p.points, labels=p.point_labels,
            box=p.box,
        )  # fmt: skip
        steps = chain.key - chain.low if reverse else chain.high - chain.key
        for s, _, logits in predictor.propagate_in_video(
            state, start_frame_idx=chain.key, max_frame_num_to_track=steps, reverse=reverse
        ):
            masks.setdefault(s, (logits[0, 0] > 0).numpy())
    return masks


def _prompt(case, label: int, key: int, strategy: str):
    return make_eval_prompt(
        case.gt_volume(label)[key], strategy, None, seed=SEED, case=case.image_id,
        slice_index=key, label=label,
    )  # fmt: skip


def test_memory_propagator_equals_sam2_video_predictor(ours, official, official_state, case):
    """Three chains at once (two objects, a box and a point, the whole volume and a part of
    it): every slice's mask equals the official predictor's, both directions."""
    areas = [case.gt_volume(lab).reshape(S, -1).sum(axis=1) for lab in (1, 2)]
    key1, key2 = key_slices(areas[0], "largest")[0], key_slices(areas[1], "middle")[0]
    assert key1 != key2
    chains = [
        Chain(0, 0, key1, _prompt(case, 1, key1, "box"), 0, S - 1),
        Chain(1, 0, key2, _prompt(case, 2, key2, "point1"), 0, S - 1),
        Chain(1, 1, key2, _prompt(case, 2, key2, "box"), 2, 4),
    ]
    got = propagate_memory(
        ours, case.extra["images"].__getitem__, None, chains, num_slices=S, stop="vanish",
        margin_px=3, selection="oracle", max_per_call=4,
    )  # fmt: skip
    filled = 0
    for i, chain in enumerate(chains):
        want = official_masks(official, official_state, chain)
        assert sorted(got[i]) == sorted(want) == list(range(chain.low, chain.high + 1))
        for s, mask in want.items():
            np.testing.assert_array_equal(got[i][s].mask, mask, err_msg=f"chain {i} slice {s}")
            filled += bool(mask.any()) and not mask.all()
    assert filled >= 10  # not empty (nor full) on most slices: the comparison means something


def test_evaluate_with_memory_writes_the_official_masks_tables(ours, official, official_state,
                                                               case, tmp_path):  # fmt: skip
    """``eval.mode=propagate eval.propagate.prompt=memory`` through the engine: the
    propagation table's pixel counts and Dice per slice are the official masks' (each object's
    box on its key slice, the whole volume both ways), and the 3D Dice is theirs."""
    from sam_ft.evaluation.protocol.engine import evaluate_models
    from sam_ft.evaluation.protocol.options import eval_options

    cfg = {"prompts": ["box"], "jitter_px": [], "overlays": 0, "workers": 0}
    cfg |= {"mode": "propagate", "propagate": {"prompt": "memory"}}
    res = evaluate_models(
        {"m_propagate": ours},
        [case],
        task_name="vol",
        options=eval_options(cfg),
        out_dir=tmp_path,
        seed=SEED,
        progress=False,
        report=False,
    )
    table = pd.read_csv(tmp_path / "propagation.csv")
    for label in (1, 2):
        gt = case.gt_volume(label).astype(bool)
        rows = table[table["label"] == label].set_index("slice")
        (key,) = set(rows["key_slice"])
        want = official_masks(
            official, official_state, Chain(0, 0, key, _prompt(case, label, key, "box"), 0, S - 1)
        )
        pred = np.stack([want[s] for s in range(S)])
        on = np.flatnonzero(gt.any(axis=(1, 2)) | pred.any(axis=(1, 2))).tolist()
        assert list(rows.index) == on
        np.testing.assert_array_equal(rows["pred_px"], pred[on].sum(axis=(1, 2)))
        inter = (pred & gt)[on].sum(axis=(1, 2))
        np.testing.assert_allclose(rows["dice"], 2 * inter / (gt[on].sum((1, 2)) + rows["pred_px"]))
        row = res.per_case[res.per_case["label"] == label].iloc[0]
        assert row["dice"] == pytest.approx(2 * (pred & gt).sum() / (pred.sum() + gt.sum()))


def test_memory_needs_a_sam2_model(case, tmp_path):
    """A SAM (not SAM 2) model with prompt=memory: one line naming the option; the box
    propagator runs SAM 2 models too (the engine test above uses the same case)."""
    from sam_ft.errors import ConfigError
    from sam_ft.evaluation.protocol.engine import evaluate_models
    from sam_ft.evaluation.protocol.options import eval_options
    from sam_ft.model.builders import build_sam_architecture

    tiny = wrap_sam(build_sam_architecture("tiny", image_size=64)).eval()
    cfg = {"prompts": ["box"], "jitter_px": [], "overlays": 0, "workers": 0}
    cfg |= {"mode": "propagate", "propagate": {"prompt": "memory"}}
    with pytest.raises(ConfigError, match=r"^eval\.propagate\.prompt=memory needs a SAM 2") as e:
        evaluate_models(
            {"tiny_propagate": tiny},
            [case],
            task_name="vol",
            options=eval_options(cfg),
            out_dir=tmp_path,
            seed=SEED,
            progress=False,
            report=False,
        )
    assert "\n" not in str(e.value)


def test_box_propagator_runs_a_sam2_model(ours, case, tmp_path):
    """eval.propagate.prompt=box with SAM 2.1: the box rule on its image path, one key per
    object, the key slice's mask scored."""
    from sam_ft.evaluation.protocol.engine import evaluate_models
    from sam_ft.evaluation.protocol.options import eval_options

    cfg = {"prompts": ["box"], "jitter_px": [], "overlays": 0, "workers": 0}
    cfg |= {"mode": "propagate", "propagate": {"prompt": "box"}}
    evaluate_models(
        {"m_propagate": ours},
        [case],
        task_name="vol",
        options=eval_options(cfg),
        out_dir=tmp_path,
        seed=SEED,
        progress=False,
        report=False,
    )
    table = pd.read_csv(tmp_path / "propagation.csv")
    assert table["is_key"].sum() == 2 and (table.loc[table["is_key"], "pred_px"] > 0).all()


@pytest.mark.heavy
def test_evaluate_cli_propagates_with_memory(weights, official, official_state, case, tmp_path):
    """``python evaluate.py model=sam2.1_hiera_t model.checkpoint=PATH task=folder
    eval.mode=propagate eval.propagate.prompt=memory`` on the NIfTI volume: the propagation
    table's predicted pixels per slice are the official predictor's."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    args = [
        "model=sam2.1_hiera_t", f"model.checkpoint={weights}", f"model.image_size={SIZE}",
        "model.encoder_bf16=false", "task=folder",
        f"task.root={Path(case.image_path).parents[1]}", "task.modality=MR", "task.slice_axis=2",
        "task.intensity.mode=none", "data.min_object_pixels=5", "eval.prompts=[box]",
        "eval.jitter_px=[]", "eval.split=all", "eval.overlays=0", "eval.mode=propagate",
        "eval.propagate.prompt=memory", f"seed={SEED}", f"hydra.run.dir={run}",
    ]  # fmt: skip
    env = dict(os.environ, SAM_FT_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(root / "evaluate.py"), *args],
        cwd=root, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = run.rglob("propagation.csv")
    table = pd.read_csv(path)
    for label in (1, 2):
        rows = table[table["label"] == label].set_index("slice")
        (key,) = set(rows["key_slice"])
        want = official_masks(
            official, official_state, Chain(0, 0, key, _prompt(case, label, key, "box"), 0, S - 1)
        )
        np.testing.assert_array_equal(rows["pred_px"], [want[s].sum() for s in rows.index])
