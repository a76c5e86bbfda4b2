"""Label maps for new images with a (finetuned) SAM: the work behind ``predict.py``.

Three ways to prompt, per input file:

* ``labels``: a reference or rough label map; every object of every slice gets the prompt of a
  study strategy (``box`` by default), made exactly as evaluation makes it
  (:func:`sam_ft.prompts.strategies.make_eval_prompt`, same seed, case id and label), and the
  image is loaded by evaluation's own :func:`sam_ft.data.loading.load_case`: for the same weights,
  image and prompts the masks equal those ``evaluate.py`` scores.
* ``prompts``: a JSON file of objects with ``box`` [x_min, y_min, x_max, y_max] and/or
  ``points`` [[x, y], ...] with ``point_labels`` (1 foreground, 0 background), optional
  ``label`` (the value written; default: the object's position, 1, 2, ...) and, for volumes,
  ``slice``. Coordinates are the input file's own pixel indices: for a 2D image x = column and
  y = row; for a NIfTI volume ``slice`` indexes the file axis that is sliced (the one the loader's
  slicing axis comes from), and (y, x) index the two other file axes in their order. A DICOM
  series has no array of its own: its coordinates index the RAS-oriented array the label map is
  written in, by the same rule.
* ``everything``: SAM's automatic mask generation on every slice (values 1..M per slice).

Images go through the loader of training and evaluation (RAS orientation, the slicing axis, the
intensity mapping, grey to RGB); each prediction is written back in the input's own geometry
(:mod:`sam_ft.inference.geometry`). Masks are (row, col); prompts (x, y).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sam_ft.data.folder import IMAGE_2D_SUFFIXES, VOLUME_SUFFIXES, is_2d_file, split_name
from sam_ft.data.intensity import intensity_bounds, to_rgb, to_uint8
from sam_ft.data.loading import CaseData, dataset_meta, load_case, read_2d, read_volume
from sam_ft.data.slicing import choose_slice_axis, from_slicing_frame
from sam_ft.data.types import CaseFiles
from sam_ft.errors import ConfigError, DataError
from sam_ft.evaluation.everything import EverythingConfig, generate_codes, prompts_per_upsample
from sam_ft.evaluation.everything import decode_mask as decode_code
from sam_ft.evaluation.predictions import label_map, write_png
from sam_ft.evaluation.selection import MASK_SELECTIONS, needs_multimask, select_masks
from sam_ft.inference.geometry import FileGeometry, file_geometry, write_label_volume
from sam_ft.model.trainable import TrainableSam
from sam_ft.prompts.strategies import STRATEGIES, make_eval_prompt
from sam_ft.prompts.types import Prompt

log = logging.getLogger(__name__)


@dataclass
class Settings:
    """How images are read and fed (from the model card or run config, then the overrides).

    Attributes:
        task: a ``task`` mapping for the loader (name, modality, intensity, slice_axis, channel,
            labels, label_binarize, ...).
        data: a ``data`` mapping (``min_object_pixels``, ``affine_atol``, ``on_error=raise``).
        prompt: ``box``, ``point1``, ``point5``, ``point5_neg5``, ``box_point1`` or
            ``everything``.
        mask_selection: ``predicted_iou``, ``single`` or ``oracle`` (needs ``labels``).
        seed: the prompt seed (evaluation's ``seed``).
        max_prompts_per_call: prompts per decoder call.
        everything: Everything mode settings.
        overlay: also write ``<name>_overlay.png``.
    """

    task: dict[str, Any]
    data: dict[str, Any]
    prompt: str = "box"
    mask_selection: str = "predicted_iou"
    seed: int = 42
    max_prompts_per_call: int = 256
    everything: EverythingConfig = field(default_factory=EverythingConfig)
    overlay: bool = True

    def __post_init__(self) -> None:
        if self.prompt not in STRATEGIES:
            raise ConfigError(f"prompt={self.prompt!r} must be one of {list(STRATEGIES)}")
        if self.mask_selection not in MASK_SELECTIONS:
            raise ConfigError(
                f"mask_selection={self.mask_selection!r} must be one of {list(MASK_SELECTIONS)}"
            )
        if int(self.max_prompts_per_call) < 1:
            raise ConfigError("max_prompts_per_call must be >= 1")


# ---------------------------------------------------------------------------------------------
# Inputs


def _is_input_file(path: Path) -> bool:
    return path.is_file() and split_name(path.name)[1] in (*VOLUME_SUFFIXES, *IMAGE_2D_SUFFIXES)


def list_inputs(path: str | Path) -> list[Path]:
    """The images of ``input=``: a file, a DICOM series folder, or a folder of them.

    A folder that holds image files or sub-folders is a collection (sub-folders are DICOM
    series); a folder of other files only is one DICOM series.
    """
    path = Path(path).expanduser()
    if not path.exists():
        raise ConfigError(f"input={path}: no such file or folder")
    if path.is_file():
        if not _is_input_file(path):
            raise ConfigError(
                f"input={path}: not a NIfTI/PNG/JPEG/TIFF/BMP image (suffixes "
                f"{', '.join((*VOLUME_SUFFIXES, *IMAGE_2D_SUFFIXES))}) nor a DICOM folder"
            )
        return [path]
    entries = [p for p in sorted(path.iterdir()) if not p.name.startswith(".")]
    items = [p for p in entries if _is_input_file(p) or p.is_dir()]
    if items:
        return items
    if entries:
        return [path]  # one DICOM series
    raise ConfigError(f"input={path}: the folder is empty")


def stem_of(path: Path) -> str:
    return split_name(path.name)[0]


def companion(base: str | Path | None, image: Path, single: bool, suffixes: Sequence[str]) -> Path:
    """The labels/prompts file of ``image``: ``base`` itself for a single input, else the file
    of the same stem in folder ``base``."""
    base = Path(base).expanduser()  # type: ignore[arg-type]
    if single and not base.is_dir():
        return base
    if not base.is_dir():
        raise ConfigError(f"{base}: with a folder input this must be a folder (same file stems)")
    stem = stem_of(image)
    # nnU-Net names images <case>_0000 and their labels <case>.
    stems = (stem, re.sub(r"_\d{4}$", "", stem))
    for wanted in stems:
        for p in sorted(base.iterdir()):
            if split_name(p.name)[0] == wanted and (
                p.is_dir() or p.name.lower().endswith(suffixes)
            ):
                return p
    raise DataError(str(base / stem), f"no file for input {image.name} in {base}")


# ---------------------------------------------------------------------------------------------
# Loading an image without labels (the loader's steps, as load_case does them)


@dataclass
class LoadedImage:
    """An input in the slicing frame.

    Attributes:
        raw: (S, R, C) or (S, R, C, 3) float32 intensities (S = 1 for a 2D image).
        bounds: (low, high) of the intensity mapping of the whole image.
        slice_axis: RAS axis that was sliced (-1 for 2D).
        ras_affine: (4, 4) voxel -> world of the RAS array (identity for 2D).
    """

    raw: np.ndarray
    bounds: tuple[float, float]
    slice_axis: int
    ras_affine: np.ndarray

    @property
    def num_slices(self) -> int:
        return int(self.raw.shape[0])

    @property
    def size(self) -> tuple[int, int]:
        return int(self.raw.shape[1]), int(self.raw.shape[2])

    def slice_image(self, s: int) -> np.ndarray:
        """(H, W, 3) uint8 image of slice ``s``, exactly as the loader makes it."""
        return to_rgb(to_uint8(np.asarray(self.raw[s], dtype=np.float32), *self.bounds))


def load_image(path: Path, task: Mapping[str, Any]) -> LoadedImage:
    """Read an image as :func:`sam_ft.data.loading.load_case` does, without a label."""
    from sam_ft.data.loading import _spacing_from_affine
    from sam_ft.data.tasks import task_options

    opts = task_options(task)
    if is_2d_file(path):
        img = read_2d(str(path)).astype(np.float32)
        raw, axis, affine = img[None], -1, np.eye(4)
    else:
        vol, affine = read_volume(str(path))
        channel = 0 if vol.shape[0] == 1 else int(opts.get("channel") or 0)
        if not 0 <= channel < vol.shape[0]:
            raise DataError(str(path), f"channel={channel} but the image has {vol.shape[0]}")
        vol = vol[channel]
        axis = choose_slice_axis(
            _spacing_from_affine(affine), vol.shape, str(opts.get("modality") or ""),
            opts["slice_axis"],
        )  # fmt: skip
        raw = np.moveaxis(vol, axis, 0)
    if not np.isfinite(raw).all():
        raise DataError(str(path), "image contains NaN or Inf intensities")
    return LoadedImage(raw, intensity_bounds(raw, opts["intensity"]), axis, affine)


# ---------------------------------------------------------------------------------------------
# Prompts from JSON


def read_prompt_file(
    path: Path, geometry: FileGeometry, image: LoadedImage
) -> dict[int, list[tuple[int, Prompt]]]:
    """Parse and check a prompts JSON -> {slice (slicing frame): [(label value, Prompt)]}.

    Coordinates are moved from the file's own pixel indices into the slicing frame (see the
    module docstring). Every problem raises a :class:`DataError` naming the file and object.
    """
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(str(path), f"unreadable prompts file ({e})") from None
    if not text.strip():
        raise DataError(str(path), "empty prompts file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"malformed JSON ({e})") from None
    objects = data.get("objects") if isinstance(data, dict) else data
    if isinstance(data, dict) and "objects" not in data:
        objects = [data]
    if not isinstance(objects, list) or not objects:
        raise DataError(str(path), "no objects: expected a non-empty list of prompt objects")
    is_3d = image.slice_axis >= 0
    out: dict[int, list[tuple[int, Prompt]]] = {}
    for n, obj in enumerate(objects, start=1):
        where = f"object {n}"
        if not isinstance(obj, dict):
            raise DataError(str(path), f"{where}: expected a JSON object, got {obj!r}")
        unknown = sorted(set(obj) - {"box", "points", "point_labels", "label", "slice"})
        if unknown:
            raise DataError(str(path), f"{where}: unknown key(s) {unknown}")
        label = obj.get("label", n)
        if not isinstance(label, int) or isinstance(label, bool) or not 0 < label < 65536:
            raise DataError(str(path), f"{where}: label must be an integer 1..65535, got {label!r}")
        s_file = obj.get("slice")
        if is_3d:
            n_file = image.num_slices
            if not isinstance(s_file, int) or isinstance(s_file, bool):
                raise DataError(str(path), f"{where}: a volume needs an integer 'slice'")
            if not 0 <= s_file < n_file:
                raise DataError(
                    str(path), f"{where}: slice {s_file} out of range (the volume has {n_file})"
                )
        elif s_file not in (None, 0, -1):
            raise DataError(str(path), f"{where}: slice {s_file} given for a 2D image")
        box, points, plabels = obj.get("box"), obj.get("points"), obj.get("point_labels")
        if box is None and points is None:
            raise DataError(str(path), f"{where}: needs a 'box' and/or 'points'")
        plane = _plane_size(geometry, image)  # (rows, cols) of the file's slice
        pts = _check_points(path, where, points, plane) if points is not None else None
        if pts is not None:
            plabels = [1] * len(pts) if plabels is None else plabels
            if (
                not isinstance(plabels, list)
                or len(plabels) != len(pts)
                or any(v not in (0, 1) or isinstance(v, bool) for v in plabels)
            ):
                raise DataError(
                    str(path), f"{where}: point_labels must be {len(pts)} values 0 or 1"
                )
        elif plabels is not None:
            raise DataError(str(path), f"{where}: point_labels without points")
        bx = _check_box(path, where, box, plane) if box is not None else None
        s, bx, pts = _to_slicing_frame(geometry, image, s_file, bx, pts)
        prompt = Prompt(box=bx, points=pts, point_labels=plabels if pts is not None else None)
        out.setdefault(s, []).append((int(label), prompt))
    return out


def _plane_size(geometry: FileGeometry, image: LoadedImage) -> tuple[int, int]:
    if image.slice_axis < 0 or geometry.kind != "nifti":
        return image.size
    f = geometry.file_axis(image.slice_axis)
    rows, cols = (geometry.spatial3[a] for a in range(3) if a != f)
    return rows, cols


def _number_list(value: Any, n: int | None) -> bool:
    return (
        isinstance(value, list)
        and (n is None or len(value) == n)
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and all(np.isfinite(value))
    )


def _check_box(path: Path, where: str, box: Any, plane: tuple[int, int]) -> np.ndarray:
    if not _number_list(box, 4):
        raise DataError(str(path), f"{where}: box must be [x_min, y_min, x_max, y_max], got {box}")
    x0, y0, x1, y1 = box
    rows, cols = plane
    if x0 > x1 or y0 > y1:
        raise DataError(str(path), f"{where}: box {box} has x_min > x_max or y_min > y_max")
    if min(x0, y0) < 0 or x1 > cols - 1 or y1 > rows - 1:
        raise DataError(
            str(path),
            f"{where}: box {box} outside the image ({cols} x {rows} pixels: "
            f"0 <= x <= {cols - 1}, 0 <= y <= {rows - 1})",
        )
    return np.asarray(box, dtype=np.float64)


def _check_points(path: Path, where: str, points: Any, plane: tuple[int, int]) -> np.ndarray:
    if not isinstance(points, list) or not points or not all(_number_list(p, 2) for p in points):
        raise DataError(str(path), f"{where}: points must be [[x, y], ...], got {points}")
    pts = np.asarray(points, dtype=np.float64)
    rows, cols = plane
    bad = (pts[:, 0] < 0) | (pts[:, 0] > cols - 1) | (pts[:, 1] < 0) | (pts[:, 1] > rows - 1)
    if bad.any():
        raise DataError(
            str(path),
            f"{where}: point {points[int(np.flatnonzero(bad)[0])]} outside the image "
            f"({cols} x {rows} pixels)",
        )
    return pts


def _to_slicing_frame(
    geometry: FileGeometry,
    image: LoadedImage,
    s_file: int | None,
    box: np.ndarray | None,
    points: np.ndarray | None,
) -> tuple[int, np.ndarray | None, np.ndarray | None]:
    """File-frame (slice, box, points) -> slicing-frame (slice, box, points)."""
    if image.slice_axis < 0:
        return -1, box, points
    if geometry.kind != "nifti":
        return int(s_file), box, points  # type: ignore[arg-type]
    f = geometry.file_axis(image.slice_axis)
    plane_axes = [a for a in range(3) if a != f]
    others = [a for a in range(3) if a != image.slice_axis]

    def move(xy: np.ndarray) -> tuple[int, np.ndarray]:
        idx = np.zeros((len(xy), 3))
        idx[:, f] = s_file
        idx[:, plane_axes[0]], idx[:, plane_axes[1]] = xy[:, 1], xy[:, 0]  # (row, col) = (y, x)
        ras = geometry.file_to_ras(idx)
        return int(round(ras[0, image.slice_axis])), np.stack(
            [ras[:, others[1]], ras[:, others[0]]], axis=1
        )

    s = -1
    if points is not None:
        s, points = move(points)
    if box is not None:
        s, corners = move(box.reshape(2, 2))
        box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
    return s, box, points


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_select(
    model: TrainableSam,
    embedding: torch.Tensor,
    prompts: Sequence[Prompt],
    size: tuple[int, int],
    mode: str,
    max_per_call: int,
    gt: np.ndarray | None = None,
) -> np.ndarray:
    """(N, H, W) bool: one mask per prompt, chosen by ``mode``.

    The same calls in the same order as the evaluation engine (prompts sorted by structure,
    ``max_per_call`` per ``model.decode``, upsampled :func:`prompts_per_upsample` at a time),
    so the masks are bit for bit those evaluation scores.

    Args:
        embedding: (C, h, w) image embedding.
        prompts: N prompts, (x, y) original pixels.
        size: (H, W) of the image.
        gt: (N, H, W) bool reference masks, needed for ``oracle`` only.
    """
    n = len(prompts)
    masks = np.zeros((n, *size), dtype=bool)
    if n == 0:
        return masks
    multimask = needs_multimask(mode)
    threshold = float(model.sam.mask_threshold)
    order = sorted(range(n), key=lambda i: prompts[i].structure)
    step = prompts_per_upsample(size, 3 if multimask else 1, model.image_size)
    for start in range(0, n, max_per_call):
        chunk = order[start : start + max_per_call]
        low, ious = model.decode(embedding, [prompts[i] for i in chunk], size, multimask)
        for s in range(0, len(chunk), step):
            idx = chunk[s : s + step]
            sub_low, sub_iou = low[s : s + len(idx)], ious[s : s + len(idx)]
            binary = (model.postprocess(sub_low, size) > threshold).cpu().numpy()
            chosen, _ = select_masks(binary, sub_iou.cpu(), None if gt is None else gt[idx], mode)
            masks[idx] = chosen
    return masks


def _embed(model: TrainableSam, image: np.ndarray) -> torch.Tensor:
    device = next(model.parameters()).device
    return model.encode(model.preprocess(image)[None].to(device))[0]


def _bar(total: int, desc: str, leave: bool = False):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="slice", leave=leave)


def predict_from_labels(
    model: TrainableSam, image_path: Path, label_path: Path, settings: Settings
) -> tuple[CaseData, np.ndarray, dict[int, np.ndarray]]:
    """Prompts from a label map, per object per slice -> (case, (S, R, C) label stack,
    {slice: (H, W, 3) uint8 image} of the prompted slices).

    The case is loaded by evaluation's ``load_case`` and prompted by ``make_eval_prompt`` with
    evaluation's identity (seed, image id, slice, label value).
    """
    stem = stem_of(image_path)
    files = CaseFiles(case=stem, image=str(image_path), label=str(label_path))
    # The dataset.json evaluation would read for this image (its task folder's), if any.
    case = load_case(files, settings.task, settings.data, meta=dataset_meta(files, settings.task))
    stack = np.zeros(case.volume_shape, dtype=np.uint16)
    pairs_by_slice: dict[int, list[tuple[int, np.ndarray]]] = {}
    shown: dict[int, np.ndarray] = {}
    with _bar(len(case.slices), f"predict {stem}") as bar:
        for rec in case.slices:
            gt = np.asarray(rec.masks, dtype=bool)
            labels = [int(v) for v in rec.labels]
            prompts = [
                make_eval_prompt(
                    gt[i],
                    settings.prompt,
                    None,
                    seed=settings.seed,
                    case=case.image_id,
                    slice_index=rec.slice_index,
                    label=lab,
                )
                for i, lab in enumerate(labels)
            ]
            masks = decode_select(
                model,
                _embed(model, rec.image),
                prompts,
                rec.original_size,
                settings.mask_selection,
                settings.max_prompts_per_call,
                gt if settings.mask_selection == "oracle" else None,
            )
            s = max(rec.slice_index, 0)
            pairs_by_slice[s] = list(zip(labels, masks, strict=True))
            shown[s] = rec.image
            bar.update(1)
    for s, pairs in pairs_by_slice.items():
        stack[s] = label_map(pairs, stack.shape[1:])
    return case, _narrow(stack), shown


def predict_from_prompts(
    model: TrainableSam,
    image: LoadedImage,
    by_slice: Mapping[int, list[tuple[int, Prompt]]],
    settings: Settings,
    name: str,
) -> np.ndarray:
    """Given prompts {slice: [(label, Prompt)]} -> (S, R, C) label stack."""
    if settings.mask_selection == "oracle":
        raise ConfigError("mask_selection=oracle needs a reference: use labels=, not prompts=")
    stack = np.zeros((image.num_slices, *image.size), dtype=np.uint16)
    with _bar(len(by_slice), f"predict {name}") as bar:
        for s, items in sorted(by_slice.items()):
            idx = max(s, 0)
            masks = decode_select(
                model,
                _embed(model, image.slice_image(idx)),
                [p for _, p in items],
                image.size,
                settings.mask_selection,
                settings.max_prompts_per_call,
            )
            stack[idx] = label_map(
                [(lab, m) for (lab, _), m in zip(items, masks, strict=True)], image.size
            )
            bar.update(1)
    return _narrow(stack)


def predict_everything(
    model: TrainableSam, image: LoadedImage, settings: Settings, name: str
) -> np.ndarray:
    """Everything mode on every slice -> (S, R, C) label stack, values 1..M per slice."""
    stack = np.zeros((image.num_slices, *image.size), dtype=np.uint16)
    with _bar(image.num_slices, f"everything {name}") as bar:
        for s in range(image.num_slices):
            img = image.slice_image(s)
            codes = generate_codes(model, _embed(model, img), image.size, settings.everything)
            stack[s] = label_map(
                [(m + 1, decode_code(c)) for m, c in enumerate(codes[:65535])], image.size
            )
            bar.update(1)
    return _narrow(stack)


def _narrow(stack: np.ndarray) -> np.ndarray:
    return stack.astype(np.uint8) if stack.max(initial=0) < 256 else stack


# ---------------------------------------------------------------------------------------------
# Writing


def overlay_png(path: Path, image: np.ndarray, labels: np.ndarray) -> Path:
    """The (H, W, 3) uint8 image with each label value tinted in its own colour, as PNG."""
    from matplotlib import colormaps

    out = image.astype(np.float32).copy()
    palette = colormaps["tab20"]
    for v in np.unique(labels):
        if v == 0:
            continue
        colour = np.asarray(palette((int(v) - 1) % 20)[:3], dtype=np.float32) * 255
        m = labels == v
        out[m] = 0.5 * out[m] + 0.5 * colour
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(out.astype(np.uint8)).save(path)
    return path


def write_prediction(
    out_dir: Path,
    image_path: Path,
    stack: np.ndarray,
    slice_axis: int,
    ras_affine: np.ndarray,
    slice_image,
    overlay: bool,
) -> list[Path]:
    """Write the (S, R, C) label stack in the input's geometry (+ an overlay of the fullest
    slice). 2D inputs give ``<stem>.png``, volumes ``<stem>.nii.gz``."""
    stem = stem_of(image_path)
    geometry = file_geometry(image_path)
    written = []
    if slice_axis < 0:
        written.append(write_png(out_dir / f"{stem}.png", stack[0]))
    else:
        ras = from_slicing_frame(stack, slice_axis)
        written.append(write_label_volume(out_dir / f"{stem}.nii.gz", ras, geometry, ras_affine))
    if overlay:
        s = int(np.count_nonzero(stack.reshape(len(stack), -1), axis=1).argmax())
        written.append(overlay_png(out_dir / f"{stem}_overlay.png", slice_image(s), stack[s]))
    return written
