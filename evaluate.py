"""Evaluate SAM with the study's protocol: ``python evaluate.py [overrides]``."""

from sam_ft.evaluate import main

if __name__ == "__main__":
    main()
