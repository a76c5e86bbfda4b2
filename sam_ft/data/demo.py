"""The bundled demo dataset: small synthetic CT-like volumes generated on first use (no download).

``task=demo`` writes ``imagesTr/demo_XXX.nii.gz``, ``labelsTr/demo_XXX.nii.gz`` and
``dataset.json`` into ``${paths.data_dir}/demo`` and then reads them like any folder task.
Each case is a (96, 96, 16) int16 HU-like volume, spacing (1.5, 1.5, 5.0) mm, RAS axes (x, y, z):
air around a body outline (fat rim, soft tissue), and three labelled objects of different size,
contrast and boundary shape:

* 1 ``liver``: large, smooth, mildly brighter than tissue (+60 HU);
* 2 ``kidney``: small, bright (+160 HU), ellipsoidal;
* 3 ``lesion``: medium, darker than tissue (-60 HU), lobulated boundary.

Gaussian noise and a light blur (partial volume) make it look scanned while keeping each boundary
visible, so a few hundred finetuning steps improve Dice. ``task=demo_2d`` writes MR-like 8-bit
PNG slices (``imagesTr/*.png`` + ``labelsTr/*.png``) instead.

A marker file written last (``.complete``) records the generator parameters: a killed generation
(no marker) or one with other parameters is redone; otherwise the folder is reused.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

MARKER = ".complete"
GENERATOR_VERSION = 1
VARIANTS = ("3d", "2d")  # task.demo_variant: NIfTI volumes or PNG images
DEMO_LABELS = {1: "liver", 2: "kidney", 3: "lesion"}
DEMO_2D_LABELS = {1: "ventricle", 2: "tumour"}


def _blob(
    grid: tuple[np.ndarray, ...],
    centre: np.ndarray,
    radii: np.ndarray,
    lobes: int,
    amplitude: float,
    phase: float,
) -> np.ndarray:
    """Boolean ellipsoid (2D or 3D) whose in-plane radius is modulated by ``lobes`` harmonics."""
    d = np.sqrt(sum(((g - c) / r) ** 2 for g, c, r in zip(grid, centre, radii, strict=True)))
    theta = np.arctan2(grid[1] - centre[1], grid[0] - centre[0])
    return d < 1.0 + amplitude * np.cos(lobes * theta + phase)


def make_demo_case(
    index: int,
    seed: int = 0,
    shape: tuple[int, int, int] = (96, 96, 16),
) -> tuple[np.ndarray, np.ndarray]:
    """One synthetic CT-like case.

    Returns:
        image (x, y, z) int16 HU-like values, label (x, y, z) uint8 with values 0-3.
    """
    rng = np.random.default_rng([seed, index])
    nx, ny, nz = shape
    grid = np.meshgrid(
        np.arange(nx, dtype=np.float32),
        np.arange(ny, dtype=np.float32),
        np.arange(nz, dtype=np.float32),
        indexing="ij",
    )
    cx, cy = nx / 2 + rng.uniform(-3, 3), ny / 2 + rng.uniform(-3, 3)
    body_r = np.array([nx * rng.uniform(0.40, 0.46), ny * rng.uniform(0.33, 0.40)])
    body_d = np.sqrt(((grid[0] - cx) / body_r[0]) ** 2 + ((grid[1] - cy) / body_r[1]) ** 2)
    image = np.full(shape, -1000.0, dtype=np.float32)
    image[body_d < 1.0] = -100.0  # subcutaneous fat
    image[body_d < 0.88] = 40.0  # soft tissue
    label = np.zeros(shape, dtype=np.uint8)
    zc = nz / 2 + rng.uniform(-1.5, 1.5)

    def place(dx: float, dy: float, radii: tuple[float, float, float], jitter: float) -> np.ndarray:
        centre = np.array(
            [
                cx + dx * body_r[0] + rng.uniform(-jitter, jitter),
                cy + dy * body_r[1] + rng.uniform(-jitter, jitter),
                zc + rng.uniform(-1, 1),
            ]
        )
        return centre * 1.0, np.array([rng.uniform(0.85, 1.15) * r for r in radii])

    # (label, offset in body radii, radii in voxels (x, y, z), lobes, amplitude, HU offset)
    objects = [
        (1, (-0.35, -0.15), (20, 15, 6), 2, 0.08, 60.0),
        (2, (0.45, 0.35), (8, 6, 3.5), 0, 0.0, 160.0),
        (3, (0.35, -0.40), (11, 9, 4), int(rng.integers(3, 6)), 0.25, -60.0),
    ]
    for value, (dx, dy), radii, lobes, amp, hu in objects:
        centre, r = place(dx, dy, radii, jitter=3.0)
        mask = _blob(grid, centre, r, lobes, amp, rng.uniform(0, 2 * np.pi)) & (body_d < 0.85)
        label[mask] = value
        # Contrast varies per case so the objects are not all equally easy.
        image[mask] = 40.0 + hu * rng.uniform(0.8, 1.2)
    image = gaussian_filter(image, sigma=(0.7, 0.7, 0.3))
    image += rng.normal(0.0, 12.0, size=shape).astype(np.float32)
    return np.clip(np.rint(image), -1024, 3071).astype(np.int16), label


def make_demo_2d_case(
    index: int, seed: int = 0, size: tuple[int, int] = (128, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """One MR-like 2D case: image (H, W) uint8, label (H, W) uint8 with values 0-2."""
    rng = np.random.default_rng([seed, 1000 + index])
    h, w = size
    grid = np.meshgrid(
        np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij"
    )
    head = _blob(grid, np.array([h / 2, w / 2]), np.array([h * 0.42, w * 0.36]), 0, 0.0, 0.0)
    image = np.where(head, 110.0, 10.0).astype(np.float32)
    label = np.zeros(size, dtype=np.uint8)
    specs = [
        (1, (0.45, 0.5), (14, 9), 2, 0.15, -70.0),
        (2, (0.65, 0.35), (11, 11), int(rng.integers(3, 6)), 0.2, 90.0),
    ]
    for value, (fy, fx), radii, lobes, amp, delta in specs:
        centre = np.array([h * fy + rng.uniform(-6, 6), w * fx + rng.uniform(-6, 6)])
        r = np.array(radii) * rng.uniform(0.8, 1.2, size=2)
        mask = _blob(grid, centre, r, lobes, amp, rng.uniform(0, 2 * np.pi)) & head
        label[mask] = value
        image[mask] = 110.0 + delta * rng.uniform(0.8, 1.2)
    image = gaussian_filter(image, 0.8) + rng.normal(0.0, 8.0, size=size)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8), label


def _params(variant: str, num_cases: int, seed: int) -> dict:
    return {"version": GENERATOR_VERSION, "variant": variant, "num_cases": num_cases, "seed": seed}


def is_complete(root: str | Path, variant: str = "3d", num_cases: int = 8, seed: int = 0) -> bool:
    """True when ``root`` holds a finished generation with these parameters."""
    marker = Path(root) / MARKER
    try:
        return json.loads(marker.read_text()) == _params(variant, num_cases, seed)
    except (OSError, ValueError):
        return False


def generate_demo(root: str | Path, variant: str = "3d", num_cases: int = 8, seed: int = 0) -> Path:
    """(Re)write the demo dataset into ``root``; the marker file is written last."""
    import nibabel as nib
    from PIL import Image

    root = Path(root)
    (root / MARKER).unlink(missing_ok=True)
    for sub in ("imagesTr", "labelsTr"):
        shutil.rmtree(root / sub, ignore_errors=True)
        (root / sub).mkdir(parents=True)
    training = []
    if variant == "3d":
        affine = np.diag([1.5, 1.5, 5.0, 1.0])
        for i in range(num_cases):
            image, label = make_demo_case(i, seed)
            name = f"demo_{i:03d}.nii.gz"
            nib.save(nib.Nifti1Image(image, affine), root / "imagesTr" / name)
            nib.save(nib.Nifti1Image(label, affine), root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        labels, modality = DEMO_LABELS, "CT"
    elif variant == "2d":
        for i in range(num_cases):
            image, label = make_demo_2d_case(i, seed)
            name = f"demo2d_{i:03d}.png"
            Image.fromarray(image).save(root / "imagesTr" / name)
            Image.fromarray(label).save(root / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        labels, modality = DEMO_2D_LABELS, "MR"
    else:
        raise ValueError(f"demo variant must be one of {VARIANTS}, got {variant!r}")
    meta = {
        "name": "demo" if variant == "3d" else "demo_2d",
        "description": "synthetic sam_ft demo data (sam_ft.data.demo)",
        "modality": {"0": modality},
        "labels": {"0": "background", **{str(k): v for k, v in labels.items()}},
        "numTraining": num_cases,
        "training": training,
    }
    (root / "dataset.json").write_text(json.dumps(meta, indent=2))
    (root / MARKER).write_text(json.dumps(_params(variant, num_cases, seed)))
    return root


def ensure_demo(root: str | Path, variant: str = "3d", num_cases: int = 8, seed: int = 0) -> Path:
    """Generate the demo into ``root`` unless a complete generation is already there."""
    from filelock import FileLock

    root = Path(root)
    if is_complete(root, variant, num_cases, seed):
        return root
    root.mkdir(parents=True, exist_ok=True)
    # DDP ranks or parallel tests may arrive together: one generates, the others reuse.
    with FileLock(str(root.parent / f".{root.name}.lock")):
        if not is_complete(root, variant, num_cases, seed):
            generate_demo(root, variant, num_cases, seed)
    return root
