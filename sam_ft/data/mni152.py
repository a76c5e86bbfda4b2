"""A real-image task with no download: the MNI152 T1 template and its tissue probability maps
(ICBM 2009a, 1 mm, 197 x 233 x 189, RAS), shipped inside nilearn's package data.

Objects: white matter (1: WM probability > 0.5) and grey matter (2: GM probability > 0.5).
One subject cannot be split by patient, so the volume is cut into three axial slabs with gaps
between them, one slab per split (``splits.json``, read through ``data.split.file``): no test
slice, nor any slice within 9 mm of one, is seen in training. Within a slab every third slice is
kept (3 mm apart, the volume's z spacing says so), so a CPU run stays short.

Written into ``task.root`` on first use (``imagesTr/``, ``labelsTr/``, ``dataset.json``,
``splits.json``); a marker written last makes a killed preparation start again.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

MARKER = ".complete"
VERSION = 1
LABELS = {1: "white_matter", 2: "grey_matter"}
STRIDE = 3
# Axial slabs [z0, z1) of the 1 mm template, in voxels, one per split (4, 8 and 16 slices kept);
# the nearest slices of two slabs are 9 mm apart, 6 mm more than within a slab.
SLABS = {"val": (38, 50), "test": (56, 80), "train": (86, 134)}
GAP_MM = 9


def describe_split() -> str:
    """One line for the run's output: how the single subject was split."""
    kept = {k: range(a, b, STRIDE) for k, (a, b) in SLABS.items()}
    parts = ", ".join(f"{k} z {z[0]}-{z[-1]} ({len(z)} slices)" for k, z in kept.items())
    return (
        f"MNI152 (one subject) cut into separate axial slabs {GAP_MM} mm apart, every "
        f"{STRIDE}rd slice kept: {parts}; no test slice was seen in training"
    )


def _nilearn_volumes() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(T1 uint8, WM mask, GM mask, affine) from nilearn's package data (no download)."""
    import nibabel as nib

    try:
        from nilearn import datasets
    except ImportError:
        from sam_ft.errors import ConfigError

        raise ConfigError(
            "task=brain_mni152 needs nilearn (its MNI152 template ships in the package): "
            "pip install 'sam_ft[lite]'"
        ) from None
    t1 = nib.as_closest_canonical(nib.load(datasets.MNI152_FILE_PATH))
    wm = nib.as_closest_canonical(nib.load(datasets.WM_MNI152_FILE_PATH))
    gm = nib.as_closest_canonical(nib.load(datasets.GM_MNI152_FILE_PATH))
    image = np.asarray(t1.dataobj).astype(np.uint8)
    # Tissue probabilities are stored as uint8 0-255: > 127 is probability > 0.5.
    return image, np.asarray(wm.dataobj) > 127, np.asarray(gm.dataobj) > 127, t1.affine


def _params() -> dict:
    return {"version": VERSION, "slabs": SLABS, "stride": STRIDE}


def is_complete(root: str | Path) -> bool:
    try:
        marker = json.loads((Path(root) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker == json.loads(json.dumps(_params()))


def generate_mni152(root: str | Path) -> Path:
    """(Re)write the task into ``root``; the marker is written last."""
    import nibabel as nib

    root = Path(root)
    (root / MARKER).unlink(missing_ok=True)
    for sub in ("imagesTr", "labelsTr"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    image, wm, gm, affine = _nilearn_volumes()
    label = np.zeros(image.shape, dtype=np.uint8)
    label[gm] = 2
    label[wm] = 1  # the two probabilities cannot both exceed 0.5; WM wins a tie at 0.5
    training, splits = [], {}
    for split, (z0, z1) in SLABS.items():
        zs = np.arange(z0, z1, STRIDE)
        # Slab origin and 3 mm slice spacing: world coordinates stay those of the template.
        slab_affine = affine @ np.diag([1.0, 1.0, float(STRIDE), 1.0])
        slab_affine[:3, 3] = (affine @ np.array([0, 0, z0, 1.0]))[:3]
        name = f"mni152_{split}"
        for folder, data in (("imagesTr", image), ("labelsTr", label)):
            volume = np.ascontiguousarray(data[:, :, zs])
            nib.save(nib.Nifti1Image(volume, slab_affine), root / folder / f"{name}.nii.gz")
        training.append(
            {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
        )
        splits[split] = [name]
    meta = {
        "name": "brain_mni152",
        "description": "MNI152 ICBM 2009a T1 template with WM/GM from its tissue probability maps "
        "(nilearn package data); " + describe_split(),
        "modality": {"0": "MR"},
        "labels": {"0": "background", **{str(k): v for k, v in LABELS.items()}},
        "numTraining": len(training),
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    (root / "splits.json").write_text(json.dumps(splits, indent=2))
    (root / MARKER).write_text(json.dumps(_params()))
    return root


def ensure_mni152(root: str | Path) -> Path:
    """Prepare the task into ``root`` unless a complete preparation is there; log the split."""
    from filelock import FileLock

    root = Path(root)
    if not is_complete(root):
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root.parent / f".{root.name}.lock")):
            if not is_complete(root):
                generate_mni152(root)
    log.info("task brain_mni152: %s", describe_split())
    return root
