"""Command-line entry points that answer ``--help`` before the heavy imports: ``predict.py
--help`` prints predict's own options (its config, comments included) in well under a second,
instead of Hydra's listing of every training group after torch and the model code load."""

from __future__ import annotations

import sys

from sam_ft.defaults import config_dir

_USAGE = {
    "predict": "usage: python predict.py checkpoint=FILE input=PATH output=DIR "
    "[labels=MAP | prompts=JSON | box=[x0,y0,x1,y1] [slice=K] | prompt=everything] [key=value ...]"
    "\n  model=vit_b|vit_l|vit_h|medsam|tiny: the architecture for checkpoint=auto or a weights "
    "file without a model card (a card or a run config beside the checkpoint says it otherwise)"
}


def usage(name: str) -> str:
    """The usage line and the options of ``conf/<name>.yaml`` with their comments (the Hydra
    ``defaults`` list and the run-naming keys left out: they are not the user's options)."""
    from pathlib import Path

    lines = (Path(config_dir()) / f"{name}.yaml").read_text().splitlines()
    options, in_defaults = [], False
    for line in lines:
        if line.startswith("defaults:"):
            in_defaults = True
            continue
        if in_defaults:
            if line.startswith((" ", "-")) or not line.strip():
                continue
            in_defaults = False
        if not line.startswith(("task_name:", "run_name:")):
            options.append(line)
    return "\n".join([_USAGE[name], "", "options (key=value; # says what each does):", *options])


def predict_main() -> None:
    """``python predict.py`` / ``sam-ft-predict``."""
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(usage("predict"))
        return
    from sam_ft.predict import main

    main()
