"""SAM model: architectures (``specs``), builders, checkpoints, preprocessing, the trainable
wrapper and finetuning modes. Import from the submodules (e.g.
``from sam_ft.model.builders import build_trainable_sam``); this file holds no code."""
