"""Embedding cache: hits; invalidation by image, preprocessing, weights; damage; two writers."""

from __future__ import annotations

import multiprocessing as mp

import numpy as np
import pytest
import torch
from torch import nn

from sam_ft.data.embedding_cache import EmbeddingCache, encoder_fingerprint, image_digest
from sam_ft.data.types import SliceRecord
from sam_ft.model.preprocess import SamTransform

S = 32


def _records(n: int = 5, seed: int = 0) -> list[SliceRecord]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = 20 + i, 24
        masks = np.zeros((1, h, w), dtype=bool)
        masks[0, 5:12, 6:15] = True
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        out.append(SliceRecord(f"c{i}", i, image, masks, np.array([1]), ["a"]))
    return out


def _encoder(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Conv2d(3, 4, kernel_size=4, stride=4)  # (B, 3, 32, 32) -> (B, 4, 8, 8)


class Counting:
    """Wraps an encoder and counts the images it encodes."""

    def __init__(self, encoder: nn.Module) -> None:
        self.encoder = encoder
        self.images = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.encoder(x)


def _cache(root, encoder, transform) -> EmbeddingCache:
    return EmbeddingCache(root, encoder_fingerprint(encoder, transform))


def test_fill_computes_misses_only_and_values_match(tmp_path):
    records, enc, tf = _records(), _encoder(), SamTransform(S)
    records.append(SliceRecord("dup", 0, records[0].image.copy(), records[0].masks, [1], ["a"]))
    count = Counting(enc)
    cache = _cache(tmp_path, enc, tf)
    digests = cache.fill(records, count, tf, batch_size=2, progress=False)
    assert count.images == 5  # the duplicate image is encoded once
    assert digests[-1] == digests[0]
    with torch.no_grad():
        expected = enc(tf.apply_image(records[3].image)[None])[0]
    torch.testing.assert_close(cache.load(digests[3]), expected)
    # Second fill, and a fresh cache object (next run): nothing recomputed.
    cache.fill(records, count, tf, progress=False)
    _cache(tmp_path, enc, tf).fill(records, count, tf, progress=False)
    assert count.images == 5


def test_changed_image_recomputes_only_that_image(tmp_path):
    records, enc, tf = _records(), _encoder(), SamTransform(S)
    count = Counting(enc)
    _cache(tmp_path, enc, tf).fill(records, count, tf, progress=False)
    records[2].image = records[2].image.copy()
    records[2].image[0, 0, 0] ^= 1
    _cache(tmp_path, enc, tf).fill(records, count, tf, progress=False)
    assert count.images == 6


def test_preprocessing_or_weights_change_recomputes(tmp_path):
    records, enc, tf = _records(), _encoder(), SamTransform(S)
    count = Counting(enc)
    _cache(tmp_path, enc, tf).fill(records, count, tf, progress=False)
    medsam = SamTransform(S, "medsam")
    assert encoder_fingerprint(enc, medsam) != encoder_fingerprint(enc, tf)
    _cache(tmp_path, enc, medsam).fill(records, count, medsam, progress=False)
    assert count.images == 10
    with torch.no_grad():
        enc.weight[0, 0, 0, 0] += 1e-3
    _cache(tmp_path, enc, tf).fill(records, count, tf, progress=False)
    assert count.images == 15
    # Same weights in another module instance: same fingerprint.
    assert encoder_fingerprint(_encoder(1), tf) == encoder_fingerprint(_encoder(1), tf)


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_entry_is_detected_and_recomputed(tmp_path, damage):
    records, enc, tf = _records(2), _encoder(), SamTransform(S)
    count = Counting(enc)
    cache = _cache(tmp_path, enc, tf)
    digests = cache.fill(records, count, tf, progress=False)
    good = cache.load(digests[0])
    path = cache.path(digests[0])
    data = path.read_bytes()
    if damage == "truncate":
        data = data[: len(data) - 100]
    elif damage == "flip":
        # Flip a byte inside the stored tensor values.
        i = data.index(good.numpy().tobytes()[:32]) + 40
        data = data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1 :]
    else:
        data = b"not a torch file"
    path.write_bytes(data)
    fresh = _cache(tmp_path, enc, tf)
    assert fresh.get(digests[0]) is None and fresh.corrupt == 1
    fresh.fill(records, count, tf, progress=False)
    assert count.images == 3
    torch.testing.assert_close(fresh.load(digests[0]), good)


class TwoMaps(nn.Module):
    """An encoder whose embedding is several tensors, as SAM 2's: a dict of maps."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.low = nn.Conv2d(3, 4, kernel_size=4, stride=4)  # -> (B, 4, 8, 8)
        self.high = nn.Conv2d(3, 2, kernel_size=2, stride=2)  # -> (B, 2, 16, 16)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image_embed": self.low(x), "high_res": self.high(x)}


def test_dict_embeddings_round_trip_and_damage_is_detected(tmp_path):
    from sam_ft.data.dataset import collate_slices

    records, enc, tf = _records(3), TwoMaps(), SamTransform(S)
    cache = EmbeddingCache(tmp_path, encoder_fingerprint(enc, tf), store_dtype=torch.float16)
    digests = cache.fill(records, enc, tf, batch_size=2, progress=False)
    with torch.no_grad():
        expected = enc(tf.apply_image(records[1].image)[None])
    got = cache.load(digests[1])
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value[0].half().float())
    # The batch stacks each map (what the training module reads).
    batch = collate_slices([{"embedding": cache.load(d)} for d in digests])
    assert batch["embedding"]["high_res"].shape == (3, 2, 16, 16)
    # One flipped byte in the second map's values: a miss, recomputed.
    path = cache.path(digests[1])
    data = path.read_bytes()
    i = data.index(got["high_res"].half().numpy().tobytes()[:16]) + 20
    path.write_bytes(data[:i] + bytes([data[i] ^ 0x55]) + data[i + 1 :])
    fresh = EmbeddingCache(tmp_path, cache.fingerprint, store_dtype=torch.float16)
    assert fresh.get(digests[1]) is None and fresh.corrupt == 1


def test_store_dtype_float16(tmp_path):
    records, enc, tf = _records(1), _encoder(), SamTransform(S)
    cache = EmbeddingCache(tmp_path, encoder_fingerprint(enc, tf), store_dtype=torch.float16)
    (digest,) = cache.fill(records, enc, tf, progress=False)
    emb = cache.load(digest)
    assert emb.dtype == torch.float32 and emb.shape == (4, 8, 8)


def test_image_digest_depends_on_content_and_shape():
    a = np.zeros((4, 6, 3), np.uint8)
    assert image_digest(a) == image_digest(a.copy())
    assert image_digest(a) != image_digest(np.zeros((6, 4, 3), np.uint8))
    b = a.copy()
    b[1, 2, 0] = 1
    assert image_digest(a) != image_digest(b)


def _fill_in_child(root: str, rounds: int) -> None:
    torch.set_num_threads(1)
    records, enc, tf = _records(6), _encoder(), SamTransform(S)
    cache = EmbeddingCache(root, encoder_fingerprint(enc, tf))
    for _ in range(rounds):
        # Write every entry each round (put, not fill) to maximise overlapping writes.
        with torch.no_grad():
            for r in records:
                cache.put(image_digest(r.image), enc(tf.apply_image(r.image)[None])[0])


def test_two_processes_writing_same_entries_leave_valid_entries(tmp_path):
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_fill_in_child, args=(str(tmp_path), 15)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    records, enc, tf = _records(6), _encoder(), SamTransform(S)
    cache = _cache(tmp_path, enc, tf)
    count = Counting(enc)
    cache.fill(records, count, tf, progress=False)
    assert count.images == 0 and cache.corrupt == 0
    files = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent.name != "stamps"]
    assert len(files) == 6 and all(p.suffix == ".pt" for p in files)  # no temp files left
    # Beside the entries: the stat stamps of the fills (one file per list of digests).
    assert {p.suffix for p in tmp_path.rglob("stamps/*")} == {".npy"}


def test_float16_embeddings_decode_like_float32(tmp_path):
    """The default 16-bit cache halves each entry and the decoder's output barely moves."""
    from sam_ft.defaults import build_from_yaml
    from sam_ft.prompts.types import Prompt

    torch.manual_seed(0)
    model = build_from_yaml("model", "tiny").eval()
    rng = np.random.default_rng(0)
    image = np.zeros((160, 200, 3), np.uint8)
    image[40:120, 50:150] = 180
    image = np.clip(image + rng.normal(0, 20, image.shape), 0, 255).astype(np.uint8)
    prompts = [Prompt(box=np.array([50, 40, 149, 119])), Prompt(box=np.array([10, 10, 60, 70]))]
    fp = encoder_fingerprint(model.sam.image_encoder, model.transform)
    with torch.no_grad():
        reference = model.encode(model.transform.apply_image(image)[None])[0]
        full, half = (
            EmbeddingCache(tmp_path, fp, store_dtype=dtype) for dtype in (None, torch.float16)
        )
        for cache in (full, half):
            cache.put("d" * 64, reference)
        a, _ = model.decode(full.load("d" * 64), prompts, image.shape[:2], True)
        b, _ = model.decode(half.load("d" * 64), prompts, image.shape[:2], True)
    assert half.path("d" * 64).stat().st_size < 0.6 * full.path("d" * 64).stat().st_size
    assert (a - b).abs().max() <= 1e-2 * a.abs().max()
    assert ((a > 0) == (b > 0)).float().mean() > 0.999


def test_not_enough_disk_space_stops_before_writing(tmp_path, monkeypatch):
    import sam_ft.data.embedding_cache as ec
    from sam_ft.errors import DataError

    records, enc, tf = _records(3), _encoder(), SamTransform(S)
    cache = _cache(tmp_path, enc, tf)
    one = cache.entry_bytes(torch.zeros(4, 8, 8))
    assert one == 4 * 8 * 8 * 4 + ec.ENTRY_OVERHEAD_BYTES
    # The free space of the real disk, as seen by the cache, set just below the need.
    monkeypatch.setattr(ec, "free_bytes", lambda path: 3 * one - 1)
    with pytest.raises(DataError, match=r"needs ~.* for 3 slices but only .* free"):
        cache.fill(records, enc, tf, progress=False)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))
    monkeypatch.setattr(ec, "free_bytes", lambda path: 3 * one)
    assert len(cache.fill(records, enc, tf, progress=False)) == 3


def test_unchanged_fill_loads_no_entry_damage_found_on_read(tmp_path):
    """An unchanged cache is checked by stat stamps (no entry loaded); damage that keeps the
    stamp is found when the entry is read, and the next fill loads and recomputes it."""
    import os

    from sam_ft.errors import DataError

    records, enc, tf = _records(3), _encoder(), SamTransform(S)
    count = Counting(enc)
    digests = _cache(tmp_path, enc, tf).fill(records, count, tf, progress=False)
    fresh = _cache(tmp_path, enc, tf)
    fresh.fill(records, count, tf, progress=False)
    assert count.images == 3 and (fresh.hits, fresh.misses) == (0, 0)  # nothing loaded
    good = fresh.load(digests[1])
    path = fresh.path(digests[1])
    st = os.stat(path)
    data = bytearray(path.read_bytes())
    i = data.index(good.numpy().tobytes()[:32]) + 40
    data[i] ^= 0x55
    with open(path, "r+b") as f:  # in place: same size, inode and (restored) mtime
        f.write(data)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = _cache(tmp_path, enc, tf)
    again.fill(records, count, tf, progress=False)
    assert count.images == 3  # the stamp is unchanged: not loaded at start
    with pytest.raises(DataError, match="embedding cache entry missing or corrupt"):
        again.load(digests[1])
    third = _cache(tmp_path, enc, tf)
    third.fill(records, count, tf, progress=False)
    assert count.images == 4 and third.corrupt == 1  # the marked entry alone was loaded
    torch.testing.assert_close(third.load(digests[1]), good)
