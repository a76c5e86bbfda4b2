"""Label maps for new images with a (finetuned) SAM: ``python predict.py checkpoint=... input=...
output=... [labels=...|prompts=...|prompt=everything]``."""

from sam_ft.predict import main

if __name__ == "__main__":
    main()
