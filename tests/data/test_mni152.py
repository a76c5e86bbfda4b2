"""task=brain_mni152: real MRI from nilearn's package data, one slab per split with gaps."""

from __future__ import annotations

import json

import numpy as np
import pytest

nib = pytest.importorskip("nibabel")
datasets = pytest.importorskip("nilearn.datasets")

from partial_api import prepare_task  # noqa: E402

from sam_ft.data.mni152 import GAP_MM, STRIDE, ensure_mni152, is_complete  # noqa: E402


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return prepare_task({"name": "brain_mni152", "source": "mni152"}, tmp_path_factory.mktemp("d"))


def _world_z(path) -> np.ndarray:
    """World z (mm) of every slice of a NIfTI volume, from its affine."""
    img = nib.load(path)
    k = np.arange(img.shape[2])
    return (img.affine @ np.stack([0 * k, 0 * k, k, 1 + 0 * k]))[2]


def test_slabs_are_disjoint_with_a_gap_and_match_the_template(root):
    splits = json.loads((root / "splits.json").read_text())
    assert sorted(splits) == ["test", "train", "val"]
    assert not set(splits["train"]) & set(splits["test"])
    z = {k: _world_z(root / "imagesTr" / f"{v[0]}.nii.gz") for k, v in splits.items()}
    for a, b in (("val", "test"), ("test", "train")):
        assert z[b].min() - z[a].max() >= GAP_MM
    assert np.allclose(np.diff(z["train"]), STRIDE)
    # The slab's slices are the template's slices at those world positions (reference: nibabel).
    t1 = nib.load(datasets.MNI152_FILE_PATH)
    k = np.linalg.solve(t1.affine, [0, 0, z["test"][2], 1])[2]
    slab = np.asarray(nib.load(root / "imagesTr" / f"{splits['test'][0]}.nii.gz").dataobj)
    np.testing.assert_array_equal(slab[:, :, 2], np.asarray(t1.dataobj)[:, :, int(round(k))])


def test_labels_are_white_and_grey_matter(root):
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"0": "background", "1": "white_matter", "2": "grey_matter"}
    label = np.asarray(nib.load(root / "labelsTr" / "mni152_train.nii.gz").dataobj)
    z = _world_z(root / "labelsTr" / "mni152_train.nii.gz")
    wm_img, gm_img = nib.load(datasets.WM_MNI152_FILE_PATH), nib.load(datasets.GM_MNI152_FILE_PATH)
    k = int(round(np.linalg.solve(wm_img.affine, [0, 0, z[5], 1])[2]))
    # Tissue probability > 0.5 (stored as uint8 0-255).
    np.testing.assert_array_equal(label[:, :, 5] == 1, np.asarray(wm_img.dataobj)[:, :, k] > 127)
    np.testing.assert_array_equal(label[:, :, 5] == 2, np.asarray(gm_img.dataobj)[:, :, k] > 127)


def test_prepared_once(root):
    marker = (root / ".complete").stat().st_mtime_ns
    assert is_complete(root)
    ensure_mni152(root)
    assert (root / ".complete").stat().st_mtime_ns == marker
