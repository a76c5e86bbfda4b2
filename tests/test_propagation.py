"""eval.mode=propagate: key slices, the box rule, and the whole path against the official
MedSAM-Lite 3D loop (``MedSAM_infer_npz_3D`` of the CVPR 2024 challenge's
``CVPR24_LiteMedSAM_infer.py``), re-implemented here line for line and run on the package's own
model, on real MRI (nilearn's MNI152 T1, its white matter as the object)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from sam_ft.evaluation.protocol.propagation import chain_ranges, key_slices, next_box
from sam_ft.model.preprocess_lite import LiteMedSamTransform

cv2 = pytest.importorskip("cv2")

# --- the official pipeline, verbatim in substance ---------------------------------------------


def resize_longest_side(image, target_length=256):
    oldh, oldw = image.shape[0], image.shape[1]
    scale = target_length * 1.0 / max(oldh, oldw)
    newh, neww = oldh * scale, oldw * scale
    neww, newh = int(neww + 0.5), int(newh + 0.5)
    return cv2.resize(image, (neww, newh), interpolation=cv2.INTER_AREA)


def pad_image(image, target_size=256):
    h, w = image.shape[:2]
    padh, padw = target_size - h, target_size - w
    if len(image.shape) == 3:
        return np.pad(image, ((0, padh), (0, padw), (0, 0)))
    return np.pad(image, ((0, padh), (0, padw)))


def resize_box_to_256(box, original_size):
    new_box = np.zeros_like(box)
    ratio = 256 / max(original_size)
    for i in range(len(box)):
        new_box[i] = int(box[i] * ratio)
    return new_box


def get_bbox256(mask_256, bbox_shift=3):
    y_indices, x_indices = np.where(mask_256 > 0)
    x_min, x_max = np.min(x_indices), np.max(x_indices)
    y_min, y_max = np.min(y_indices), np.max(y_indices)
    H, W = mask_256.shape
    x_min = max(0, x_min - bbox_shift)
    x_max = min(W, x_max + bbox_shift)
    y_min = max(0, y_min - bbox_shift)
    y_max = min(H, y_max + bbox_shift)
    return np.array([x_min, y_min, x_max, y_max])


@torch.no_grad()
def medsam_inference(net, img_embed, box_256, new_size, original_size):
    box_torch = torch.as_tensor(box_256[None, None, ...], dtype=torch.float)
    sparse, dense = net.prompt_encoder(points=None, boxes=box_torch, masks=None)
    low_res_logits, iou = net.mask_decoder(
        image_embeddings=img_embed,
        image_pe=net.prompt_encoder.get_dense_pe(),
        sparse_prompt_embeddings=sparse,
        dense_prompt_embeddings=dense,
        multimask_output=False,
    )
    low_res_pred = net.postprocess_masks(low_res_logits, new_size, original_size)
    low_res_pred = torch.sigmoid(low_res_pred).squeeze().cpu().numpy()
    return (low_res_pred > 0.5).astype(np.uint8), iou


@torch.no_grad()
def official_3d(net, img_3D, boxes_3D):
    """``MedSAM_infer_npz_3D``: per 3D box, the middle slice from the box's 2D extent, then
    outward slice by slice with the previous mask's box + 3 px, to the box's z ends."""
    segs = np.zeros_like(img_3D, dtype=np.uint8)
    for idx, box3D in enumerate(boxes_3D, start=1):
        segs_3d_temp = np.zeros_like(img_3D, dtype=np.uint8)
        x_min, y_min, z_min, x_max, y_max, z_max = box3D
        mid_slice_bbox_2d = np.array([x_min, y_min, x_max, y_max])
        z_middle = int((z_max - z_min) / 2 + z_min)
        z_max = min(z_max + 1, img_3D.shape[0])
        z_min = max(-1, z_min - 1)
        for zs, step in ((range(z_middle, z_max), -1), (range(z_middle - 1, z_min, -1), 1)):
            for z in zs:
                img_3c = np.repeat(img_3D[z, :, :][:, :, None], 3, axis=-1)
                H, W, _ = img_3c.shape
                img_256 = resize_longest_side(img_3c, 256)
                new_H, new_W = img_256.shape[:2]
                img_256 = (img_256 - img_256.min()) / np.clip(
                    img_256.max() - img_256.min(), a_min=1e-8, a_max=None
                )
                img_256 = pad_image(img_256)
                tensor = torch.tensor(img_256).float().permute(2, 0, 1).unsqueeze(0)
                image_embedding = net.image_encoder(tensor)
                if z == z_middle:
                    box_256 = resize_box_to_256(mid_slice_bbox_2d, original_size=(H, W))
                else:
                    pre_seg = segs_3d_temp[z + step, :, :]
                    pre_seg256 = resize_longest_side(pre_seg)
                    if np.max(pre_seg256) > 0:
                        box_256 = get_bbox256(pad_image(pre_seg256))
                    else:
                        box_256 = resize_box_to_256(mid_slice_bbox_2d, original_size=(H, W))
                seg, _ = medsam_inference(net, image_embedding, box_256, [new_H, new_W], [H, W])
                segs_3d_temp[z, seg > 0] = idx
        segs[segs_3d_temp > 0] = idx
    return segs


# --- cheap checks ---------------------------------------------------------------------------------


def test_key_slices_rules():
    areas = np.array([0, 0, 5, 9, 30, 0, 12, 8, 0, 0])
    assert key_slices(areas, "largest") == [4]
    # The official middle, int((7 - 2) / 2 + 2) = 4; a key on a gap moves to the nearest slice.
    assert key_slices(areas, "middle") == [4]
    assert key_slices(np.array([3, 0, 0, 0, 4]), "middle") == [0]
    assert key_slices(areas, "even", 3) == [2, 4, 7]
    with pytest.raises(ValueError, match="no slice"):
        key_slices(np.zeros(4), "largest")


def test_chain_ranges_split_the_volume_between_keys():
    # Each slice goes to its nearest key; vanish runs to the volume's ends, box_ends to the
    # object's z extent.
    assert chain_ranges([3, 9], 14, (1, 12), "vanish") == [(0, 6), (7, 13)]
    assert chain_ranges([3, 9], 14, (1, 12), "box_ends") == [(1, 6), (7, 12)]
    assert chain_ranges([5], 8, (2, 6), "box_ends") == [(2, 6)]


@pytest.mark.parametrize("shape", [(197, 233), (256, 256), (300, 512), (90, 61)])
def test_next_box_is_the_official_box_in_the_256_frame(shape):
    """The box rule is the official ``get_bbox256`` of the resized previous mask, and
    LiteMedSAM's box transform gives back exactly that frame box."""
    rng = np.random.default_rng(shape[0])
    lite = LiteMedSamTransform(256)  # LiteMedSAM's input side
    for _ in range(20):
        mask = np.zeros(shape, dtype=bool)
        r0, c0 = rng.integers(0, shape[0] - 2), rng.integers(0, shape[1] - 2)
        mask[r0 : r0 + rng.integers(2, 60), c0 : c0 + rng.integers(2, 60)] = True
        small = pad_image(resize_longest_side(mask.astype(np.uint8)))
        box = next_box(mask, 3)
        if small.max() == 0:  # a sliver INTER_AREA rounds away: the official "empty" too
            assert box is None
            continue
        np.testing.assert_array_equal(lite.apply_boxes(box[None], shape)[0], get_bbox256(small))
    assert next_box(np.zeros(shape, dtype=bool), 3) is None


# --- the whole path on real MRI with LiteMedSAM's real weights ---------------------------------

Z0, Z1 = 144, 156  # the top of the brain: white matter ends at z 151 of the 189


@pytest.fixture(scope="module")
def mni_slab(tmp_path_factory):
    """A NIfTI pair in tmp: 12 axial slices of the MNI152 T1 and its white matter (label 1),
    which ends 4 slices before the slab does."""
    nib = pytest.importorskip("nibabel")
    datasets = pytest.importorskip("nilearn.datasets")
    t1 = nib.as_closest_canonical(nib.load(datasets.MNI152_FILE_PATH))
    wm = nib.as_closest_canonical(nib.load(datasets.WM_MNI152_FILE_PATH))
    image = np.asarray(t1.dataobj)[:, :, Z0:Z1].astype(np.uint8)
    label = (np.asarray(wm.dataobj)[:, :, Z0:Z1] > 127).astype(np.uint8)
    root = tmp_path_factory.mktemp("mni_slab")
    for sub, data in (("imagesTr", image), ("labelsTr", label)):
        (root / sub).mkdir()
        nib.save(nib.Nifti1Image(data, t1.affine), root / sub / "slab.nii.gz")
    return root


def _load(root):
    from partial_api import find_cases, load_case

    task = {"name": "slab", "source": "folder", "root": str(root), "modality": "MR"}
    task |= {"slice_axis": 2}
    (files,) = find_cases(root, task)
    return load_case(files, task, keep_images=True)


def _run(litemedsam, case, tmp_path, **propagate):
    from sam_ft.evaluation.protocol.engine import evaluate_models
    from sam_ft.evaluation.protocol.options import eval_options

    ours, _ = litemedsam
    cfg = {
        "mode": "propagate", "prompts": ["box"], "jitter_px": [], "workers": 0,
        "save_predictions": True, "overlays": 0, "propagate": propagate,
    }  # fmt: skip
    res = evaluate_models(
        {"lite": ours},
        [case],
        task_name="slab",
        options=eval_options(cfg),
        out_dir=tmp_path,
        seed=0,
        progress=False,
        report=False,
    )
    nib = pytest.importorskip("nibabel")
    from sam_ft.data.slicing import to_slicing_frame

    pred = np.asarray(nib.load(tmp_path / "predictions/lite/box/slab.nii.gz").dataobj)
    return res, to_slicing_frame(pred, case.slice_axis) > 0


@pytest.mark.heavy  # ~35 LiteMedSAM encoder calls: minutes on a busy 2-core CPU
def test_box_propagation_equals_the_official_litemedsam_3d_loop(litemedsam, mni_slab, tmp_path):
    """key=middle, stop=box_ends: the masks of the evaluation (NIfTI written by the engine) are
    the official loop's, given the 3D box whose (x, y) is the middle slice's tight box."""
    _, package = litemedsam
    case = _load(mni_slab)
    gt = case.gt_volume(1)
    images = case.extra["images"]
    volume = np.stack([images[s][..., 0] for s in range(len(images))])
    z = np.flatnonzero(gt.reshape(len(gt), -1).any(axis=1))
    middle = int((z[-1] - z[0]) / 2 + z[0])
    rows, cols = np.nonzero(gt[middle])
    box3d = [cols.min(), rows.min(), z[0], cols.max(), rows.max(), z[-1]]
    official = official_3d(package, volume, [np.array(box3d)]) > 0
    res, ours = _run(litemedsam, case, tmp_path / "ends", key="middle", stop="box_ends")
    assert official[z[0] : z[-1] + 1].any(axis=(1, 2)).all()  # a real propagation
    np.testing.assert_array_equal(ours, official)
    # The 3D scores are against the whole label volume, with the official masks.
    (row,) = res.per_case.to_dict("records")
    dice = 2 * (official & gt).sum() / (official.sum() + gt.sum())
    assert row["dice"] == pytest.approx(dice, abs=1e-12)
    assert row["hd95"] >= 0 and 0 < row["nsd"] <= 1
    # vanish (the default) runs on past the object's end, while the masks last.
    table = pd.read_csv(tmp_path / "ends" / "propagation.csv")
    assert not (table["pred_px"].gt(0) & ~table["in_extent"]).any()
    _, vanish = _run(litemedsam, case, tmp_path / "vanish", key="middle")
    np.testing.assert_array_equal(vanish[z[0] : z[-1] + 1], official[z[0] : z[-1] + 1])
    past = vanish[z[-1] + 1 :].any(axis=(1, 2))
    # Contiguous from the extent's end: once a mask vanished, nothing after it.
    assert not (past[1:] & ~past[:-1]).any()
    table = pd.read_csv(tmp_path / "vanish" / "propagation.csv")
    over = table["pred_px"].gt(0) & ~table["in_extent"]
    assert over.sum() == past.sum()


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"mode": "sideways"}, r"^eval\.mode='sideways': expected one of 'slices'"),
        ({"propagate": {"key": "first"}}, r"^eval\.propagate\.key='first': expected one of"),
        ({"propagate": {"keys": 3}}, r"keys > 1 needs eval\.propagate\.key=even"),
        ({"propagate": {"margin_px": -1}}, r"^eval\.propagate\.margin_px must be >= 0"),
        ({"mode": "propagate", "prompts": ["everything"]}, r"remove everything"),
    ],
)
def test_bad_propagate_options_are_one_line_errors(cfg, message):
    from sam_ft.errors import ConfigError
    from sam_ft.evaluation.protocol.options import eval_options

    with pytest.raises(ConfigError, match=message) as info:
        eval_options(cfg)
    assert "\n" not in str(info.value)


def test_slices_mode_keeps_its_config_hash():
    """eval.propagate decides nothing in the slices mode: the provenance hash ignores it (the
    slices mode's files stay byte-identical to those before the modes), and not in propagate."""
    from sam_ft.evaluation.protocol.options import eval_options
    from sam_ft.evaluation.reports.provenance import config_hash

    plain, other = eval_options({}), eval_options({"propagate": {"key": "middle"}})
    assert config_hash(plain, 0) == config_hash(other, 0)
    prop = eval_options({"mode": "propagate", "prompts": ["box"]})
    prop_middle = eval_options(
        {"mode": "propagate", "prompts": ["box"], "propagate": {"key": "middle"}}
    )
    assert config_hash(prop, 0) != config_hash(prop_middle, 0)
