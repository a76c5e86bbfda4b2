"""sam_ft: finetune and evaluate the Segment Anything Model on medical images."""

import os

# Set before torch loads OpenMP (importing any sam_ft module imports this first). Spinning idle
# OpenMP threads burn the cores that other jobs on a shared node (and our own loader and scoring
# workers) need: on a 2-core machine with a competing load they made the demo take 9x its idle
# CPU time. Waiting threads sleep instead; `OMP_WAIT_POLICY=ACTIVE` in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"

from sam_ft.defaults import register_resolvers  # noqa: E402 (after the OpenMP setting)
from sam_ft.reproducible import request_strict_mkl  # noqa: E402

register_resolvers()
# Before torch's first MKL call: the same sums for any thread count (sam_ft/reproducible.py).
request_strict_mkl()
