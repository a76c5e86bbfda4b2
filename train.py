"""Finetune SAM and compare it with the zero-shot model: ``python train.py [overrides]``."""

from sam_ft.cli import train_main

if __name__ == "__main__":
    train_main()
