"""sam_ft: finetune and evaluate the Segment Anything Model on medical images."""

__version__ = "0.1.0"
