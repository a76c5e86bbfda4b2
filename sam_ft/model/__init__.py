"""SAM model builders, checkpoints, preprocessing and the trainable wrapper."""

from __future__ import annotations

import logging

from sam_ft.errors import ConfigError
from sam_ft.model.builders import SPECS, build_sam
from sam_ft.model.trainable import TrainableSam

log = logging.getLogger(__name__)


def build_trainable_sam(
    name: str,
    checkpoint: str | None = None,
    image_size: int | None = None,
    preprocess: str | None = None,
    grad_checkpointing: bool = False,
    compile_encoder: bool = False,
    encoder_bf16: bool = True,
    multimask_output: bool | None = None,
) -> TrainableSam:
    """The ``model`` config's target: a SAM with weights, wrapped for training and prediction.

    ``image_size`` and ``preprocess`` must match the architecture (they are in the config so that
    the data pipeline and reports can read them); a mismatch is a config error, not a silent fix.
    ``encoder_bf16``: run the image encoder under bf16 autocast on CUDA GPUs when it gets no
    gradients (faster); False keeps everything float32, as the study assumes.
    ``multimask_output``: whether the model's 3 mask outputs are used (SAM) or only its single
    one (MedSAM, trained with ``multimask_output=False``); None = the architecture's own.
    """
    if name not in SPECS:
        raise ConfigError(f"model.name={name!r} is not one of {sorted(SPECS)}")
    spec = SPECS[name]
    if image_size is not None and int(image_size) != spec.image_size:
        raise ConfigError(
            f"model.image_size={image_size}, but {name} takes {spec.image_size}x{spec.image_size}"
        )
    if preprocess is not None and preprocess != spec.preprocess:
        raise ConfigError(
            f"model.preprocess={preprocess!r}, but {name} was trained with {spec.preprocess!r}"
        )
    model = TrainableSam(
        build_sam(name, checkpoint),
        spec.preprocess,
        grad_checkpointing,
        encoder_bf16=bool(encoder_bf16),
        multimask_output=spec.multimask_output if multimask_output is None else multimask_output,
    )
    if compile_encoder:
        # In place, so state-dict keys keep their official names.
        model.sam.image_encoder.compile()
    return model
