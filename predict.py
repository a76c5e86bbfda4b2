"""Label maps for new images with a (finetuned) SAM: ``python predict.py checkpoint=... input=...
output=... [labels=...|prompts=...|box=...|prompt=everything]`` (``--help``: the options)."""

from sam_ft.cli import predict_main

if __name__ == "__main__":
    predict_main()
