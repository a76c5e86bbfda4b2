"""Finetune SAM and compare it with the zero-shot model: ``python train.py [overrides]``."""

from sam_ft.train import main

if __name__ == "__main__":
    main()
