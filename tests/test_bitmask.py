"""The one bitmask codec (``sam_ft.bitmask``): numpy and torch give the same bytes, the bytes are
``np.packbits``' (the format of the slice cache, the scoring jobs and ``CasePredictions``), and
every packed mask unpacks to itself, H * W not a multiple of 8 included."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sam_ft import bitmask
from sam_ft.evaluation.protocol.predictions import CasePredictions

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
SHAPES = [(5, 7), (4, 6), (1, 1), (3, 3), (16, 2)]  # H * W = 35, 24, 1, 9, 32


def _reference(mask: np.ndarray) -> np.ndarray:
    """One mask's bytes written out by hand: pixel i (row-major) is bit 7 - i % 8 of byte i // 8."""
    bits = mask.reshape(-1)
    out = np.zeros(-(-bits.size // 8), dtype=np.uint8)
    for i in np.flatnonzero(bits):
        out[i // 8] |= 1 << (7 - i % 8)
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_numpy_pack_writes_the_documented_bytes_and_unpacks_to_the_masks(shape):
    masks = np.random.default_rng(sum(shape)).random((2, 3, *shape)) < 0.5
    masks[0, 0] = True  # the padding bits of a full mask stay 0
    packed = bitmask.pack(masks)
    assert packed.dtype == np.uint8 and packed.shape == (2, 3, bitmask.packed_bytes(shape))
    for a in range(2):
        for b in range(3):
            assert np.array_equal(packed[a, b], _reference(masks[a, b]))
            assert np.array_equal(packed[a, b], np.packbits(masks[a, b], axis=None))
    back = bitmask.unpack(packed, shape)
    assert back.dtype == bool and np.array_equal(back, masks)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=CUDA)])
@pytest.mark.parametrize("shape", SHAPES)
def test_torch_pack_gives_numpys_bytes_and_unpacks_on_its_device(shape, device):
    masks = np.random.default_rng(len(shape) + shape[0]).random((4, *shape)) < 0.3
    packed = bitmask.pack(torch.from_numpy(masks).to(device))
    assert isinstance(packed, torch.Tensor) and packed.device.type == device
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.cpu().numpy(), bitmask.pack(masks))
    back = bitmask.unpack(packed, shape)
    assert back.dtype == torch.bool and back.device.type == device
    assert np.array_equal(back.cpu().numpy(), masks)
    # Across the two: packed on the device, unpacked on the host (and back).
    assert np.array_equal(bitmask.unpack(packed.cpu().numpy(), shape), masks)
    from_numpy = bitmask.unpack(torch.from_numpy(bitmask.pack(masks)), shape)
    assert np.array_equal(from_numpy.numpy(), masks)


def test_a_whole_stack_packs_as_one_run_of_bits_as_the_slice_cache_stores_it():
    """The slice cache's entries hold a slice's (K, H, W) stack as ``np.packbits`` of the
    flattened stack: existing caches stay readable."""
    masks = np.random.default_rng(3).random((3, 5, 7)) < 0.5
    packed = bitmask.pack(masks, ndim=3)
    assert np.array_equal(packed, np.packbits(masks.reshape(-1)))  # 14 bytes, not 3 x 5
    assert np.array_equal(bitmask.unpack(packed, masks.shape), masks)
    tensor = bitmask.pack(torch.from_numpy(masks), ndim=3)
    assert np.array_equal(tensor.numpy(), packed)


def test_empty_batches_and_wrong_lengths():
    assert bitmask.pack(np.zeros((0, 5, 7), dtype=bool)).shape == (0, 5)
    assert bitmask.pack(torch.zeros((0, 5, 7), dtype=torch.bool)).shape == (0, 5)
    with pytest.raises(ValueError, match=r"do not hold masks of shape \(5, 7\)"):
        bitmask.unpack(np.zeros((2, 4), dtype=np.uint8), (5, 7))


def test_the_store_takes_masks_packed_on_the_device():
    masks = np.random.default_rng(0).random((2, 5, 7)) < 0.5
    store = CasePredictions((5, 7))
    store.add_packed("k", 4, bitmask.pack(torch.from_numpy(masks)).numpy()[1])
    store.add("k", 6, masks[0])
    assert np.array_equal(store.get("k", 4), masks[1])
    assert np.array_equal(store.get("k", 6), masks[0])
    with pytest.raises(ValueError, match="packed mask"):
        store.add_packed("k", 5, bitmask.pack(masks))
