"""Label maps for new images with a (finetuned) SAM: ``python predict.py checkpoint=... input=...
output=... [labels=...|prompts=...|prompt=everything]``."""

from sam_ft.cli import predict

if __name__ == "__main__":
    predict()
