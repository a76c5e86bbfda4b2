"""SAM model builders, checkpoints, preprocessing and the trainable wrapper."""
