"""Evaluate SAM with the study's protocol: ``python evaluate.py [overrides]``."""

from sam_ft.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
