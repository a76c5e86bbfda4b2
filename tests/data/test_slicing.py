"""Slicing: object size filter, label groups, skipped slices, axis choice, spacing, 3D GT."""

from __future__ import annotations

import numpy as np
from partial_api import find_cases, load_case

from sam_ft.data.slicing import choose_slice_axis, from_slicing_frame, object_masks


def test_object_of_50_pixels_dropped_51_kept():
    label = np.zeros((40, 40), dtype=np.uint8)
    label[0:5, 0:10] = 1  # 50 px
    label[20:37, 20:23] = 2  # 51 px
    masks, values, names = object_masks(label, None, min_object_pixels=50)
    assert values.tolist() == [2]
    assert names == ["label_2"]
    assert masks.shape == (1, 40, 40) and masks.dtype == bool and masks[0].sum() == 51


def test_object_filter_and_empty_slices_on_a_volume(nifti_folder):
    # (x, y, z) = (30, 30, 5): z=1 has a 51 px object; z=2 only a 50 px one; others empty.
    shape = (30, 30, 5)
    label = np.zeros(shape, dtype=np.uint8)
    label[0:17, 0:3, 1] = 1  # 51 px -> kept
    label[0:10, 0:5, 2] = 1  # 50 px -> dropped, slice skipped
    root = nifti_folder({"c0": (np.zeros(shape, np.float32), label)}, spacing=(0.8, 0.9, 3.0))
    task = {"root": str(root), "intensity": {"mode": "percentile"}}
    data = load_case(find_cases(root, task)[0], task, {"min_object_pixels": 50})
    assert [s.slice_index for s in data.slices] == [1]
    s = data.slices[0]
    assert s.masks.shape == (1, 30, 30) and s.masks[0].sum() == 51
    # Largest spacing (z, 3 mm) is the slice axis; rows/cols keep the x, y order.
    assert data.slice_axis == 2 and data.volume_shape == (5, 30, 30)
    assert s.spacing == (0.8, 0.9) and s.slice_spacing == 3.0 and s.num_slices == 5
    assert data.spacing == (3.0, 0.8, 0.9)
    assert s.case == "c0" and s.image_id == "c0"
    assert s.image.shape == (30, 30, 3) and s.image.dtype == np.uint8
    assert s.raw.shape == (30, 30) and s.raw.dtype == np.float32
    # The 3D GT keeps the dropped 50 px object: evaluation sees every voxel.
    assert data.gt_volume("label_1").sum() == 101
    assert data.gt_volume(1)[2].sum() == 50
    np.testing.assert_array_equal(data.to_volume(data.label_volume), label)


def test_label_groups_liver_includes_tumour(nifti_folder, h):
    shape = (40, 40, 3)
    label = h.box_label(shape, {1: (slice(5, 35), slice(5, 35), slice(0, 3))})
    label[15:25, 15:25, 1] = 2  # tumour inside the liver, 100 px
    image = label.astype(np.float32) * 50
    root = nifti_folder({"liver_0": (image, label)}, labels={1: "liver", 2: "cancer"})
    task = {
        "root": str(root),
        "labels": {"liver": [1, 2], "liver_tumour": [2]},
        "slice_axis": 2,
        "intensity": {"mode": "percentile"},
    }
    data = load_case(find_cases(root, task)[0], task)
    middle = next(s for s in data.slices if s.slice_index == 1)
    assert middle.names == ["liver", "liver_tumour"]
    assert middle.labels.tolist() == [1, 2]
    assert middle.masks[0].sum() == 30 * 30  # liver mask covers the tumour too
    assert middle.masks[1].sum() == 100
    assert [s.names for s in data.slices if s.slice_index != 1] == [["liver"], ["liver"]]
    assert data.gt_volume("liver").sum() == 30 * 30 * 3
    assert data.objects == {"liver": [1, 2], "liver_tumour": [2]}


def test_default_objects_named_from_dataset_json(nifti_folder, h):
    shape = (30, 30, 2)
    label = h.box_label(
        shape, {1: (slice(0, 10), slice(0, 10), slice(0, 2)), 3: (slice(15, 25),) * 2 + (0,)}
    )
    root = nifti_folder(
        {"a": (label.astype(np.float32), label)}, labels={1: "spleen", 2: "x", 3: "kidney"}
    )
    task = {"root": str(root), "slice_axis": 2}
    data = load_case(find_cases(root, task)[0], task)
    assert data.slices[0].names == ["spleen", "kidney"]
    assert data.slices[1].names == ["spleen"]
    assert data.objects == {"spleen": [1], "x": [2], "kidney": [3]}


def test_choose_slice_axis():
    # CT is always axial (RAS z), even when the in-plane spacing is the coarsest.
    assert choose_slice_axis((0.9, 0.9, 0.7), (512, 512, 600), "CT") == 2
    # MR: the coarse acquisition axis wins.
    assert choose_slice_axis((4.0, 1.0, 1.0), (20, 256, 256), "MR") == 0
    # Isotropic: the axis with the fewest voxels.
    assert choose_slice_axis((1.0, 1.0, 1.0), (64, 30, 64), "MR") == 1
    assert choose_slice_axis((1.0, 1.0, 1.0), (64, 64, 64), "") == 2
    assert choose_slice_axis((1.0, 1.0, 5.0), (64, 64, 10), "MR", setting=1) == 1


def test_slicing_frame_round_trip():
    vol = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    for axis in range(3):
        stack = np.moveaxis(vol, axis, 0)
        np.testing.assert_array_equal(from_slicing_frame(stack, axis), vol)
