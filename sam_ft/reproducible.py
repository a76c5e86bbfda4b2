"""The same CPU numbers with any number of threads: the evaluation's tables do not depend on the
cores a process gets (1 process, N DDP ranks, shards on machines with other core counts).

Two parts of a CPU forward sum in an order that follows the thread count:

- MKL's ``sgemm`` (every ``Linear`` and attention matmul) splits its inner sums among threads.
  MKL's *strict conditional numerical reproducibility* mode (``MKL_CBWR=AUTO,STRICT``, MKL
  >= 2019.3) keeps one order for any thread count on the same instruction set. It must be chosen
  before MKL's first call, so ``sam_ft/__init__.py`` sets the variable (a value already in the
  environment wins) and every process we start (DDP ranks, workers) inherits it.
- oneDNN's convolutions (``patch_embed``, the neck, the decoder's upscaling) choose their blocking
  by thread count. :func:`thread_independent` turns oneDNN off around the evaluation forward:
  PyTorch then runs its own im2col + ``sgemm`` convolutions (the strict MKL path again).

Measured (BENCHMARKS.md, "Streamed tables and thread-independent numbers"): the same bytes with 1, 2
and 4 threads; ViT-B at 1024 px on CPU: no measurable cost (0.99x at 1 thread, 0.91x at 2). Not
covered: machines with different instruction sets (AVX2 vs AVX-512 pick different MKL kernels;
forcing one branch, e.g. ``MKL_CBWR=AVX2,STRICT`` in the environment, may make them agree: not
measured) and CUDA, whose kernels do not depend on the CPU threads at all.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
from collections.abc import Iterator

log = logging.getLogger(__name__)

MKL_MODE = "AUTO,STRICT"
_STRICT = 0x10000  # MKL_CBWR_STRICT, a flag of mkl_cbwr_get(MKL_CBWR_ALL)


def request_strict_mkl() -> None:
    """Ask MKL for its strict mode in this process and its children (before torch's first MKL
    call; a value already in the environment is kept)."""
    os.environ.setdefault("MKL_CBWR", MKL_MODE)


def mkl_is_strict() -> bool | None:
    """Whether MKL runs in strict mode (``mkl_cbwr_get``, read from torch's own MKL); None when
    this torch build exposes no MKL to ask (e.g. not an x86 MKL build)."""
    import torch

    lib_dir = os.path.join(os.path.dirname(torch.__file__), "lib")
    try:
        get = ctypes.CDLL(os.path.join(lib_dir, "libtorch_cpu.so")).mkl_serv_cbwr_get
    except (OSError, AttributeError):
        return None
    get.restype, get.argtypes = ctypes.c_int, [ctypes.c_int]
    return bool(get(-1) & _STRICT)


_warned = False


@contextlib.contextmanager
def thread_independent() -> Iterator[None]:
    """Within: CPU convolutions through PyTorch's own kernels (oneDNN off), so that, with strict
    MKL, a forward gives the same bits for any ``torch.get_num_threads()``. Warns once when MKL is
    not strict (``MKL_CBWR`` set to another value, or MKL used before ``sam_ft`` was imported)."""
    global _warned
    import torch

    if mkl_is_strict() is False and not _warned:
        _warned = True
        log.warning(
            "MKL is not in strict reproducible mode (MKL_CBWR=%s): CPU results may depend on the "
            "number of threads; set MKL_CBWR=%s or import sam_ft before running torch",
            os.environ.get("MKL_CBWR", "<unset>"),
            MKL_MODE,
        )
    with torch.backends.mkldnn.flags(enabled=False):
        yield
