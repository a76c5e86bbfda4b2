"""The one bitmask codec: bool masks 8 pixels to a byte, for numpy arrays and torch tensors.

The layout is ``np.packbits(mask, axis=None)``'s (bit order "big"): a mask's pixels row-major,
the first pixel in the highest bit of byte 0, the last byte padded with zeros; an (H, W) mask
takes ``ceil(H * W / 8)`` bytes. The torch packer gives the same bytes on any device, so masks
packed on the GPU (the evaluation's kept masks) unpack with numpy on the host, and the slice
cache's entries, the scoring jobs and ``CasePredictions`` all hold this one format. torch is
not imported here, so numpy-only modules (the slice cache) load without it: a tensor exists only
once torch is imported.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from math import prod
from typing import TYPE_CHECKING, Any, overload

import numpy as np

if TYPE_CHECKING:
    import torch

_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # bit i of a byte, first pixel in the highest bit


def _is_tensor(x: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def packed_bytes(shape: Sequence[int]) -> int:
    """Bytes of one packed mask of ``shape`` (e.g. (H, W)): ``ceil(prod(shape) / 8)``."""
    return -(-prod(int(s) for s in shape) // 8)


@overload
def pack(masks: np.ndarray, ndim: int = 2) -> np.ndarray: ...
@overload
def pack(masks: torch.Tensor, ndim: int = 2) -> torch.Tensor: ...
def pack(masks: np.ndarray | torch.Tensor, ndim: int = 2) -> np.ndarray | torch.Tensor:
    """Pack each mask on its own: (..., H, W) bool -> (..., ceil(H * W / 8)) uint8.

    ``ndim`` is how many trailing axes make one mask (2: (H, W) masks; ``masks.ndim``: the whole
    array as one run of bits, as the slice cache stores a slice's (K, H, W) stack). A tensor is
    packed on its own device and gives a tensor; anything else gives a numpy array.
    """
    if _is_tensor(masks):
        return _pack_tensor(masks, ndim)
    masks = np.asarray(masks, dtype=bool)
    lead, mask = masks.shape[: masks.ndim - ndim], masks.shape[masks.ndim - ndim :]
    return np.packbits(masks.reshape(*lead, prod(mask)), axis=-1)


@overload
def unpack(packed: np.ndarray, shape: Sequence[int]) -> np.ndarray: ...
@overload
def unpack(packed: torch.Tensor, shape: Sequence[int]) -> torch.Tensor: ...
def unpack(packed: np.ndarray | torch.Tensor, shape: Sequence[int]) -> np.ndarray | torch.Tensor:
    """Inverse of :func:`pack`: (..., nbytes) uint8 -> (..., *shape) bool, ``shape`` one mask's
    (e.g. (H, W)).

    Raises:
        ValueError: ``nbytes`` is not :func:`packed_bytes` of ``shape``.
    """
    shape = tuple(int(s) for s in shape)
    if packed.shape[-1:] != (packed_bytes(shape),):
        raise ValueError(f"packed masks {tuple(packed.shape)} do not hold masks of shape {shape}")
    lead = tuple(packed.shape[:-1])
    if _is_tensor(packed):
        import torch

        shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
        bits = (packed.to(torch.uint8)[..., None] >> shifts) & 1  # (..., nbytes, 8)
        flat = bits.reshape(*lead, 8 * packed.shape[-1])[..., : prod(shape)]
        return flat.bool().reshape(*lead, *shape)
    flat = np.unpackbits(np.asarray(packed, dtype=np.uint8), axis=-1, count=prod(shape))
    return flat.astype(bool).reshape(*lead, *shape)


def _pack_tensor(masks: torch.Tensor, ndim: int) -> torch.Tensor:
    """:func:`pack` on the tensor's device: the weighted sum of each 8 pixels (zero-padded)."""
    import torch

    lead, mask = masks.shape[: masks.dim() - ndim], masks.shape[masks.dim() - ndim :]
    flat = masks.reshape(*lead, prod(mask)).to(torch.uint8)
    pad = -flat.shape[-1] % 8
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    weights = torch.tensor(_WEIGHTS, dtype=torch.uint8, device=masks.device)
    return (flat.reshape(*lead, flat.shape[-1] // 8, 8) * weights).sum(dim=-1, dtype=torch.uint8)
