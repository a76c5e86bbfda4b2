"""SAM 2's ``memory`` propagator (``eval.propagate.prompt=memory``): the official
``SAM2VideoPredictor`` over a volume's slices as frames.

Each :class:`~sam_ft.evaluation.protocol.propagation.Chain` (one object, one prompt variant, one key
slice, slices ``low..high``) runs as MedSAM2's 3D inference runs one object: ``reset_state``,
``add_new_points_or_box`` on the key slice, ``propagate_in_video`` up to ``high``; then
``reset_state``, the same prompt again and ``propagate_in_video(reverse=True)`` down to ``low``
(``max_frame_num_to_track`` bounds both). So the reverse pass does not see the forward pass's
memories, and a chain does not depend on the volume's other objects or variants. The mask of a
slice is the predictor's output logits at the slice's size ``> 0``; the predictor picks the
mask itself (its own multimask rules), so ``eval.mask_selection`` does not apply, and its
``pred_iou`` is NaN (the video predictor returns no IoU). ``stop=vanish`` runs to the volume's
ends (SAM 2's object score empties a mask past the object), ``stop=box_ends`` to the object's
z extent; ``margin_px`` is the box rule's and unused here.

What differs from ``init_state`` on a JPEG folder: the frames come from memory
(:class:`Frames`, the same PIL resize, scaling and ImageNet normalisation as
``sam2.utils.misc.load_video_frames_from_jpg_images``, one frame at a time, on the CPU:
``offload_video_to_cpu``), and :func:`inference_state` builds the dict ``init_state`` builds
without its warm-up encoding of frame 0. The predictor is a view of the model's own ``SAM2Base``
(:func:`video_predictor`: same modules, no copy of the weights) with the settings that
``sam2.build_sam.build_sam2_video_predictor`` adds. The chains run in lockstep (every active
chain on a slice before the next slice) and hand each other the predictor's one-frame feature
cache, so a slice is encoded about once per direction however many chains cross it.
On CUDA with ``model.encoder_bf16`` the predictor runs under bf16 autocast, as MedSAM2 runs it.
"""

from __future__ import annotations

import contextlib
import copy
import io
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from sam_ft.errors import ConfigError
from sam_ft.evaluation.protocol.propagation import Chain, Propagated, SliceMask
from sam_ft.model.backend import SegmentBackend
from sam_ft.model.preprocess_sam2 import IMAGENET_MEAN, IMAGENET_STD

# What build_sam2_video_predictor sets besides build_sam2's postprocessing (which our models
# already have): clicked masks binarised before the memory encoder, small holes filled (needs
# sam2's CUDA extension; without it sam2 warns and skips, as the official predictor does).
VIDEO_SETTINGS = {"binarize_mask_from_pts_for_mem_enc": True, "fill_hole_area": 8}


def check_memory_model(model: torch.nn.Module) -> None:
    """A one-line error unless ``model`` is of the SAM 2 family."""
    if getattr(model, "family", None) != "sam2":
        raise ConfigError(
            "eval.propagate.prompt=memory needs a SAM 2 family model (sam2.1_hiera_*, "
            f"medsam2), got a {type(model).__name__}; use eval.propagate.prompt=box"
        )


def video_predictor(sam: torch.nn.Module):
    """A ``SAM2VideoPredictor`` sharing every module, parameter and buffer of ``sam`` (a
    ``SAM2Base``): a shallow copy whose class is the predictor's, with the video settings."""
    from sam_ft.model.sam2_model import import_sam2

    import_sam2()  # (Hydra's global state left as it was)
    from sam2.sam2_video_predictor import SAM2VideoPredictor

    video = copy.copy(sam)  # the same _modules / _parameters / _buffers dicts
    video.__class__ = SAM2VideoPredictor
    video.non_overlap_masks = False  # SAM2VideoPredictor.__init__'s defaults
    video.clear_non_cond_mem_around_input = False
    video.add_all_frames_to_correct_as_cond = False
    for name, value in VIDEO_SETTINGS.items():
        setattr(video, name, value)
    return video


class Frames:
    """A volume's slices as the video predictor's frames, made on access: slice ``s``'s
    (H, W, 3) uint8 image -> (3, S, S) float32, as ``load_video_frames_from_jpg_images`` makes a
    decoded JPEG (PIL's default resize to S x S, / 255, ImageNet mean and std)."""

    def __init__(self, image_of: Callable[[int], np.ndarray], num_slices: int, size: int):
        self.image_of, self.num_slices, self.size = image_of, num_slices, size
        self.mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(IMAGENET_STD, dtype=torch.float32)[:, None, None]

    def __len__(self) -> int:
        return self.num_slices

    def __getitem__(self, s: int) -> torch.Tensor:
        from PIL import Image

        pil = Image.fromarray(np.asarray(self.image_of(s), dtype=np.uint8)).convert("RGB")
        pixels = np.array(pil.resize((self.size, self.size))) / 255.0
        frame = torch.from_numpy(pixels).permute(2, 0, 1).to(torch.float32)
        frame -= self.mean
        frame /= self.std
        return frame


def inference_state(video, frames: Frames, height: int, width: int) -> dict:
    """The dict ``SAM2VideoPredictor.init_state`` returns, with ``frames`` as its images (no
    JPEG folder, no warm-up encoding); the state stays on the model's device."""
    device = video.device
    return {
        "images": frames, "num_frames": len(frames), "offload_video_to_cpu": True,
        "offload_state_to_cpu": False, "video_height": height, "video_width": width,
        "device": device, "storage_device": device, "point_inputs_per_obj": {},
        "mask_inputs_per_obj": {}, "cached_features": {}, "constants": {},
        "obj_id_to_idx": OrderedDict(), "obj_idx_to_id": OrderedDict(), "obj_ids": [],
        "output_dict_per_obj": {}, "temp_output_dict_per_obj": {}, "frames_tracked_per_obj": {},
    }  # fmt: skip


class _Runs:
    """The chains' states, passing the predictor's one-frame feature cache along."""

    def __init__(self, video, states: list[dict]):
        self.video, self.states, self.cache = video, states, {}

    def call(self, i: int, fn: Callable, *args, **kwargs):
        self.states[i]["cached_features"] = self.cache
        try:
            return fn(self.states[i], *args, **kwargs)
        finally:
            self.cache = self.states[i]["cached_features"]

    def start(self, i: int, chain: Chain, reverse: bool) -> Iterator:
        """Chain ``i`` prompted anew on its key slice; its pass's generator of
        (slice, obj_ids, (1, 1, H, W) logits)."""
        p = chain.prompt
        self.call(i, self.video.reset_state)
        self.call(
            i, self.video.add_new_points_or_box, frame_idx=chain.key, obj_id=1,
            points=None if p.points is None else p.points.astype(np.float32),
            labels=None if p.point_labels is None else p.point_labels.astype(np.int32),
            box=None if p.box is None else p.box.astype(np.float32),
        )  # fmt: skip
        steps = chain.key - chain.low if reverse else chain.high - chain.key
        return self.video.propagate_in_video(
            self.states[i], start_frame_idx=chain.key, max_frame_num_to_track=steps,
            reverse=reverse,
        )  # fmt: skip


def propagate_memory(
    model: SegmentBackend,
    image_of: Callable[[int], np.ndarray],
    gt_of: Callable[[int], np.ndarray],
    chains: Sequence[Chain],
    *,
    num_slices: int,
    stop: str,
    margin_px: int,
    selection: str,
    max_per_call: int,
    progress: Callable[[int, int], None] | None = None,
) -> Propagated:
    """Every chain through SAM 2's video predictor (module docstring), called as
    :func:`~sam_ft.evaluation.protocol.propagation.propagate_boxes` is; ``gt_of``, ``stop`` (already
    in the chains' ranges), ``margin_px``, ``selection`` and ``max_per_call`` are not used."""
    check_memory_model(model)
    out: Propagated = {i: {} for i in range(len(chains))}
    if not chains:
        return out
    video = video_predictor(model.sam)
    height, width = np.asarray(image_of(chains[0].key)).shape[:2]
    frames = Frames(image_of, num_slices, model.sam.image_size)
    runs = _Runs(video, [inference_state(video, frames, height, width) for _ in chains])
    up = range(min(c.key for c in chains), max(c.high for c in chains) + 1)
    down = range(max(c.key for c in chains), min(c.low for c in chains) - 1, -1)
    bf16 = model.encodes_in_bf16(video.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    passed = 0
    with torch.inference_mode(), autocast:
        for reverse, order in ((False, up), (True, down)):
            passes: dict[int, Iterator] = {}
            for s in order:
                passed += 1
                if progress is not None:
                    progress(passed, len(up) + len(down))
                for i, c in enumerate(chains):
                    first = s == c.key and not (reverse and c.low == c.key)
                    if first:  # (a reverse pass from the key down to itself adds nothing)
                        passes[i] = runs.start(i, c, reverse)
                    if i not in passes or not (c.low <= s <= c.high):
                        continue
                    # The predictor's tqdm bar (made on the first step) writes to a buffer.
                    quiet = contextlib.redirect_stderr(io.StringIO())
                    with quiet if first else contextlib.nullcontext():
                        frame, _, logits = runs.call(i, lambda _, g=passes[i]: next(g))
                    assert frame == s, (frame, s)  # the predictor's order is ours
                    if s != c.key or not reverse:
                        mask = (logits[0, 0] > 0).cpu().numpy()
                        out[i][s] = SliceMask(mask, float("nan"))
    return out
