"""On-disk cache of SAM image embeddings, for training with a frozen image encoder.

Entries live under ``root/embeddings/<fingerprint>/<digest[:2]>/<digest>.pt`` where the
fingerprint hashes the encoder weights and the preprocessing (mode, image size) and the digest
hashes the image content: changing any of them reads different files, so nothing stale is used.

Each entry is a ``torch.save`` dict holding the embedding and a SHA-256 of its bytes; it is read
with ``torch.load(weights_only=True)`` (no code runs) and the checksum, digest, fingerprint and
shape are verified on every read, so a truncated or damaged file is reported as a miss and
recomputed. At start, ``fill`` checks an entry's stat stamp (``<dir>/stamps/``) instead of
loading it; an entry that failed a read is marked (``<dir>/distrusted/``) and loaded at the next
start. Writes are
atomic, so parallel sweep jobs may fill one cache at the same time.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from sam_ft.atomic import atomic_write
from sam_ft.data.cache import SliceRef, image_digest
from sam_ft.data.slice_index import file_stamp
from sam_ft.data.types import SliceRecord
from sam_ft.errors import DataError
from sam_ft.model.backend import (
    Embedding,
    embedding_at,
    embedding_tensors,
    map_embedding,
    unbatch,
)
from sam_ft.model.backend import batch_size as embedding_count
from sam_ft.model.preprocess import SamTransform

log = logging.getLogger(__name__)

EMBEDDING_CACHE_FORMAT = 1
CACHE_EMBEDDINGS = ("auto", True, False)  # data.cache_embeddings
EMBEDDING_DTYPES = ("float32", "float16", "bfloat16")  # data.embedding_dtype (null: the encoder's)
# Per entry besides the tensor: torch.save's zip container and the checksum fields.
ENTRY_OVERHEAD_BYTES = 2048
STAMP = np.dtype([("digest", "S64"), ("size", "<i8"), ("mtime_ns", "<i8"), ("ino", "<i8")])
RECENT = 4
"""Stamps files read besides the ones asked for (the most recent): a changed split loads only
its new entries."""


def free_bytes(path: str | Path) -> int:
    """Free disk space (bytes) where ``path`` is or would be created (its nearest existing
    ancestor)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def format_bytes(n: float) -> str:
    """``1536`` -> ``'1.5 KiB'``."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"  # pragma: no cover


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a tensor as a uint8 array (works for bfloat16, which numpy lacks)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _checksum(emb: Embedding) -> str:
    """SHA-256 of the embedding's bytes (its tensors in name order)."""
    h = hashlib.sha256()
    for _, t in embedding_tensors(emb):
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _shape(emb: Embedding) -> list[int] | dict[str, list[int]]:
    if isinstance(emb, torch.Tensor):
        return list(emb.shape)
    return {k: list(t.shape) for k, t in emb.items()}


def encoder_fingerprint(
    encoder: nn.Module | Mapping[str, torch.Tensor], transform: SamTransform
) -> str:
    """Hex SHA-256 of the encoder's state-dict tensors (names, dtypes, shapes, values) plus the
    preprocessing mode and image size: what an embedding depends on besides the image.

    ``encoder``: the image encoder, or the backend's ``encoder_state()`` (SAM 2: the encoder
    plus the decoder's high-resolution projections that the embedding goes through).
    """
    state = encoder.state_dict() if isinstance(encoder, nn.Module) else encoder
    h = hashlib.sha256()
    h.update(
        f"format={EMBEDDING_CACHE_FORMAT};mode={transform.mode};size={transform.image_size}\n".encode()
    )
    for name, t in sorted(state.items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\n".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


class EmbeddingCache:
    """Image embeddings of one (encoder, preprocessing) pair, stored per image digest.

    Args:
        root: cache folder (``data.cache_dir``).
        fingerprint: ``encoder_fingerprint(encoder, transform)``.
        store_dtype: dtype written to disk (``None`` keeps the encoder's; ``torch.float16``
            halves the size at a small precision cost). Loaded embeddings are float32.

    ``hits``, ``misses``, ``corrupt`` and ``computed`` count what ``get``/``fill`` did.
    """

    def __init__(
        self, root: str | Path, fingerprint: str, store_dtype: torch.dtype | None = None
    ) -> None:
        self.fingerprint = fingerprint
        # Entries of another storage precision must not be mistaken for these.
        suffix = "" if store_dtype is None else "-" + str(store_dtype).removeprefix("torch.")
        self.dir = Path(root).expanduser() / "embeddings" / (fingerprint[:32] + suffix)
        self.store_dtype = store_dtype
        self.hits = 0
        self.misses = 0
        self.corrupt = 0
        self.computed = 0

    def path(self, digest: str) -> Path:
        """Entry file of an image digest."""
        return self.dir / digest[:2] / f"{digest}.pt"

    def get(self, digest: str) -> Embedding | None:
        """(C, h, w) float32 embedding (or a dict of such tensors), or ``None`` when missing,
        truncated or corrupt."""
        path = self.path(digest)
        if not path.is_file():
            self.misses += 1
            return None
        try:
            entry = torch.load(path, map_location="cpu", weights_only=True)
            emb = entry["embedding"]
            ok = (
                entry["format"] == EMBEDDING_CACHE_FORMAT
                and entry["digest"] == digest
                and entry["fingerprint"] == self.fingerprint
                and _shape(emb) == entry["shape"]
                and _checksum(emb) == entry["sha256"]
            )
        except Exception as e:  # unreadable means "recompute", never "use"
            log.warning("embedding cache entry %s is unreadable (%s); recomputing", path, e)
            ok = False
        if not ok:
            self.corrupt += 1
            self.misses += 1
            self._distrust(digest)
            return None
        self.hits += 1
        return map_embedding(lambda t: t.float(), emb)

    def put(self, digest: str, embedding: Embedding) -> None:
        """Store a (C, h, w) embedding (or a dict of them) atomically (a concurrent writer's copy
        is equally valid)."""
        dtype = self.store_dtype
        emb = map_embedding(lambda t: t.detach().cpu().contiguous().to(dtype or t.dtype), embedding)
        entry = {
            "format": EMBEDDING_CACHE_FORMAT,
            "digest": digest,
            "fingerprint": self.fingerprint,
            "shape": _shape(emb),
            "sha256": _checksum(emb),
            "embedding": emb,
        }
        atomic_write(self.path(digest), lambda f: torch.save(entry, f))

    def entry_bytes(self, embedding: Embedding) -> int:
        """Disk size of one entry holding ``embedding`` (C, h, w) in the storage dtype."""
        size = 0
        for _, t in embedding_tensors(embedding):
            size += t.numel() * torch.empty(0, dtype=self.store_dtype or t.dtype).element_size()
        return size + ENTRY_OVERHEAD_BYTES

    def check_space(self, count: int, embedding: Embedding) -> int:
        """Log the estimated size of ``count`` new entries like ``embedding``, and stop when the
        cache's disk has less free space than that.

        Returns:
            The estimate in bytes.

        Raises:
            DataError: not enough free disk space (names the folder, the need and the space).
        """
        need = count * self.entry_bytes(embedding)
        free = free_bytes(self.dir)
        log.info(
            "embedding cache %s: %d new entries of %s, ~%s (%s free)",
            self.dir,
            count,
            format_bytes(self.entry_bytes(embedding)),
            format_bytes(need),
            format_bytes(free),
        )
        if need > free:
            raise DataError(
                str(self.dir),
                f"the embedding cache needs ~{format_bytes(need)} for {count} slices but only "
                f"{format_bytes(free)} is free; free disk space, point data.cache_dir at a larger "
                "disk, or set data.cache_embeddings=false",
            )
        return need

    def load(self, digest: str) -> Embedding:
        """Like ``get`` but raises ``DataError`` naming the file when the entry is not valid
        (used by the dataset, which has no encoder to recompute with)."""
        emb = self.get(digest)
        if emb is None:
            raise DataError(
                str(self.path(digest)),
                "embedding cache entry missing or corrupt after the cache was filled "
                "(deleted or damaged by another job?); rerun to recompute it",
            )
        return emb

    # Stat stamps: an entry whose (size, mtime_ns, inode) is what it was when it was written or
    # last verified is not loaded again at the next start; one that failed a read since is.

    @staticmethod
    def tag(digests: Sequence[str]) -> str:
        """Name of the stamps of a list of digests."""
        return hashlib.sha256("\n".join(digests).encode()).hexdigest()[:32]

    def _distrust(self, digest: str) -> None:
        with contextlib.suppress(OSError):
            (self.dir / "distrusted").mkdir(parents=True, exist_ok=True)
            (self.dir / "distrusted" / digest).touch()

    def known_stamps(self, tags: Sequence[str]) -> dict[bytes, tuple[int, int, int]]:
        """{digest: stamp} from the stamps ``tags`` and the ``RECENT`` most recent others."""
        folder = self.dir / "stamps"
        try:
            files = sorted(folder.glob("*.npy"), key=lambda p: p.stat().st_mtime_ns)[::-1]
        except OSError:
            files = []
        known: dict[bytes, tuple[int, int, int]] = {}
        for path in dict.fromkeys([folder / f"{t}.npy" for t in tags] + files[:RECENT]):
            with contextlib.suppress(Exception):  # missing or damaged: those entries are read
                for row in np.load(path, allow_pickle=False).tolist():
                    known.setdefault(row[0], tuple(row[1:]))
        return known

    def unchanged(self, digests: Sequence[str], tags: Sequence[str] = ()) -> set[str]:
        """The digests whose entry has the stamp recorded in ``tags`` (or a recent stamps
        file) and was not marked damaged since: no need to load them."""
        known = self.known_stamps(tags)
        try:
            bad = set(os.listdir(self.dir / "distrusted"))
        except OSError:
            bad = set()
        return {
            d
            for d in digests
            if d not in bad and (s := known.get(d.encode())) is not None
            and file_stamp(self.path(d)) == s
        }  # fmt: skip

    def save_stamps(self, tag: str, digests: Sequence[str]) -> None:
        """Record the stamps of ``digests``' entries (just verified or written) as ``tag``."""
        rows = [(d.encode(), *st) for d in digests if (st := file_stamp(self.path(d)))]
        stamps = np.array(rows, dtype=STAMP)
        atomic_write(self.dir / "stamps" / f"{tag}.npy", lambda f: np.save(f, stamps))
        for d in digests:
            with contextlib.suppress(OSError):
                os.unlink(self.dir / "distrusted" / d)

    @torch.no_grad()
    def fill(
        self,
        records: Sequence[SliceRecord | SliceRef],
        encode: Callable[[torch.Tensor], Embedding],
        transform: SamTransform,
        batch_size: int = 8,
        device: torch.device | str = "cpu",
        progress: bool = True,
        tags: Sequence[str] = (),
    ) -> list[str]:
        """Make sure every record's embedding is cached, encoding only the misses.

        Args:
            records: slices whose ``image`` (H, W, 3) uint8 is encoded; ``SliceRef``s give
                their digest from the index and are read from disk only when encoded.
            encode: (B, 3, S, S) float model input on ``device`` -> (B, C, h, w) embeddings.
            transform: builds the model input (``transform.apply_image``).
            batch_size: images per ``encode`` call.
            device: where the batch is sent.
            progress: show progress bars.

        Returns:
            The image digest of each record (same order), the key for ``load``.

        An existing entry is loaded and verified here (a damaged one is recomputed now rather
        than failing in a dataloader worker later) unless its stat stamp is unchanged since it
        was written or verified (``tags``: stamps saved by other ranks; see :meth:`unchanged`):
        an unchanged cache is checked with one ``stat`` per entry. The stamps of every entry
        are saved under :meth:`tag` of the digests.
        """
        if callable(getattr(records, "digests", None)):  # a SliceIndex: one column
            digests = records.digests()
        else:
            digests = [
                r.digest if isinstance(r, SliceRef) else image_digest(r.image) for r in records
            ]
        unique = list(dict.fromkeys(digests))
        unchanged = self.unchanged(unique, tags)
        where = dict(zip(digests, range(len(digests)), strict=True))
        todo: dict[str, SliceRecord | SliceRef] = {}
        for digest in tqdm(
            [d for d in unique if d not in unchanged],
            desc="embedding cache: check",
            disable=not progress,
            leave=False,
        ):
            if self.get(digest) is None:
                todo[digest] = records[where[digest]]
        items = list(todo.items())
        bar = tqdm(total=len(items), desc="embedding cache: encode", disable=not progress)
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            images = [
                r.load(raw=False).image if isinstance(r, SliceRef) else r.image for _, r in chunk
            ]
            batch = torch.stack([transform.apply_image(im) for im in images]).to(device)
            embeddings = encode(batch)
            if embedding_count(embeddings) != len(chunk):
                count = embedding_count(embeddings)
                raise ValueError(f"encode returned {count} embeddings for {len(chunk)} images")
            if start == 0:  # the first batch gives the entry size; nothing is written yet
                self.check_space(len(items), embedding_at(embeddings, 0))
            for (digest, _), emb in zip(chunk, unbatch(embeddings), strict=True):
                self.put(digest, emb)
            self.computed += len(chunk)
            bar.update(len(chunk))
        bar.close()
        self.save_stamps(self.tag(unique), unique)
        return digests
