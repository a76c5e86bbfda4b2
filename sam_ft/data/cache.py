"""On-disk cache of a case's preprocessed slices, so later epochs and later runs read no NIfTI.

One ``.npz`` file per case, named by a key that hashes the source file(s) (path, size, mtime) and
the slicing/intensity settings: editing a file or a setting gives a new key, so a stale entry is
never read. Writes are atomic (:func:`sam_ft.atomic.atomic_write`), so parallel jobs
can share one cache folder. A truncated or damaged entry fails to load (zip CRC, key check) and is
recomputed.

The entry is also what training and evaluation read (the data set lives on disk): the header
alone gives the index (a row per slice of :mod:`sam_ft.data.slice_index`: case, slice, object
labels, sizes, image digest; :class:`SliceRef` is one row's view), and a slice's image and
masks are read member by member when an item is needed (:func:`read_slice`, where zipfile
checks each member's CRC), so memory does not grow with the number of cases. A read that fails
marks the entry (:func:`distrust`): the next start verifies it whole and recomputes it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sam_ft import bitmask
from sam_ft.atomic import atomic_write
from sam_ft.data.types import CaseFiles, SliceRecord
from sam_ft.errors import DataError

log = logging.getLogger(__name__)

# Bump when the entry layout changes: old entries then simply stop matching.
SLICE_CACHE_FORMAT = 2  # 2: per-slice labels, image shape and digest in the header


def _file_stamp(path: str | Path) -> list[Any]:
    """[absolute path, size, mtime_ns] of a file, or of every file under a folder (DICOM)."""
    p = Path(path).expanduser().absolute()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        return [str(p), [[str(f.relative_to(p)), *_stat(f)] for f in files]]
    if not p.exists():
        # The loader reports the missing file; the key only has to differ from a present one.
        return [str(p), "missing"]
    return [str(p), *_stat(p)]


def _stat(p: Path) -> list[int]:
    st = p.stat()
    return [int(st.st_size), int(st.st_mtime_ns)]


def slice_cache_key(case: CaseFiles, settings: Mapping[str, Any]) -> str:
    """Hex key of a case's cache entry: source files (path, size, mtime) + slicing settings.

    Args:
        case: the case's files.
        settings: every option that changes the slices (intensity window, slicing axis,
            ``min_object_pixels``, label grouping, ...); must be JSON-serialisable after
            ``str()`` of unknown types.
    """
    payload = {
        "format": SLICE_CACHE_FORMAT,
        "case": case.case,
        "image_id": case.image_id,
        "image": _file_stamp(case.image),
        "label": None if case.label is None else _file_stamp(case.label),
        "label_parts": [_file_stamp(p) for p in case.label_parts],
        "settings": settings,
    }
    text = json.dumps(payload, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def image_digest(image: np.ndarray) -> str:
    """Hex SHA-256 of an (H, W, 3) uint8 image's shape, dtype and pixels (the embedding cache's
    key of an image; stored in the slice-cache header so the index needs no pixel read)."""
    image = np.ascontiguousarray(image)
    h = hashlib.sha256(f"{image.shape}:{image.dtype}\n".encode())
    h.update(image.reshape(-1).view(np.uint8))
    return h.hexdigest()


def _slug(case: str) -> str:
    """File-name-safe short form of a case id (the key keeps entries unique)."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", case)[:60] or "case"


def _records_to_arrays(
    key: str,
    records: list[SliceRecord],
    meta: Mapping[str, Any],
    arrays: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Flatten records into named arrays (no pickled objects, so loading runs no code)."""
    out: dict[str, np.ndarray] = {f"array_{k}": np.asarray(v) for k, v in arrays.items()}
    header: dict[str, Any] = {
        "format": SLICE_CACHE_FORMAT,
        "key": key,
        "meta": meta,
        "arrays": sorted(arrays),
        "slices": [],
    }
    for i, r in enumerate(records):
        masks = np.asarray(r.masks, dtype=bool)
        # Masks are 1 bit of information in 8; packing shrinks the entry ~8x.
        out[f"masks_{i}"] = bitmask.pack(masks, ndim=masks.ndim)  # the stack as one run of bits
        image = np.ascontiguousarray(r.image, dtype=np.uint8)
        out[f"image_{i}"] = image
        out[f"labels_{i}"] = np.asarray(r.labels, dtype=np.int64)
        if r.raw is not None:
            out[f"raw_{i}"] = np.asarray(r.raw, dtype=np.float32)
        header["slices"].append(
            {
                "case": r.case,
                "slice_index": int(r.slice_index),
                "masks_shape": list(masks.shape),
                # Index fields: what a data set needs without reading the slice's arrays.
                "labels": [int(v) for v in np.asarray(r.labels).reshape(-1)],
                "image_shape": list(image.shape),
                "digest": image_digest(image),
                "names": list(r.names),
                "spacing": [float(s) for s in r.spacing],
                "modality": r.modality,
                "has_raw": r.raw is not None,
                "num_slices": int(r.num_slices),
                "slice_spacing": float(r.slice_spacing),
                "image_id": r.image_id,
            }
        )
    # A numpy unicode array, not an object array: loads with allow_pickle=False.
    out["header"] = np.array(json.dumps(header))
    return out


def _arrays_to_records(z: Mapping[str, np.ndarray], key: str) -> CachedCase:
    header = json.loads(str(z["header"][()]))
    if header.get("format") != SLICE_CACHE_FORMAT or header.get("key") != key:
        raise ValueError("cache entry belongs to another key or format")
    records = []
    for i, s in enumerate(header["slices"]):
        records.append(
            SliceRecord(
                case=s["case"],
                slice_index=s["slice_index"],
                image=z[f"image_{i}"],
                masks=bitmask.unpack(z[f"masks_{i}"], s["masks_shape"]),
                labels=z[f"labels_{i}"],
                names=list(s["names"]),
                spacing=tuple(s["spacing"]),
                modality=s["modality"],
                raw=z[f"raw_{i}"] if s["has_raw"] else None,
                num_slices=s["num_slices"],
                slice_spacing=s["slice_spacing"],
                image_id=s["image_id"],
            )
        )
    arrays = {k: z[f"array_{k}"] for k in header["arrays"]}
    return CachedCase(records, header["meta"], arrays)


def _write_npz(f: BinaryIO, arrays: Mapping[str, np.ndarray]) -> None:
    """``np.savez`` with fast deflate for integer/bool arrays (labels, images and packed masks
    shrink several-fold) and none for float arrays (which barely compress). ``np.load`` reads it.
    """
    with zipfile.ZipFile(
        f, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1, allowZip64=True
    ) as zf:
        for name, arr in arrays.items():
            arr = np.asarray(arr)
            member: str | zipfile.ZipInfo = f"{name}.npy"
            if arr.dtype.kind not in "biuU":
                member = zipfile.ZipInfo(f"{name}.npy")
                member.compress_type = zipfile.ZIP_STORED
            with zf.open(member, "w", force_zip64=True) as out:
                np.lib.format.write_array(out, arr, allow_pickle=False)


@dataclass
class CachedCase:
    """A cache entry: the case's slices, a JSON-able ``meta`` dict and named extra arrays
    (e.g. the label volume and affine a 3D evaluation needs)."""

    records: list[SliceRecord]
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


class SliceCache:
    """Per-case cache of ``CachedCase`` entries (slices, JSON meta, arrays) under ``root/slices``.

    Args:
        root: cache folder (``data.cache_dir``); ``None`` disables the cache (always computes).

    ``hits``, ``misses`` and ``corrupt`` count lookups, so tests and logs can tell whether the
    sources were read.
    """

    def __init__(self, root: str | Path | None) -> None:
        self.root = None if root is None else Path(root).expanduser() / "slices"
        self.hits = 0
        self.misses = 0
        self.corrupt = 0

    @property
    def enabled(self) -> bool:
        return self.root is not None

    def path(self, case: str, key: str) -> Path:
        """Entry file of ``case`` (the case's ``image_id``) under ``key``."""
        if self.root is None:
            raise RuntimeError("the slice cache is disabled (no cache_dir)")
        return self.root / f"{_slug(case)}-{key[:32]}.npz"

    def _existing(self, case: str, key: str) -> Path | None:
        """The entry file of ``case`` under ``key`` if the cache is on and the file exists."""
        if self.root is None:
            return None
        path = self.path(case, key)
        return path if path.is_file() else None

    def load(self, case: str, key: str) -> CachedCase | None:
        """The entry of ``case`` under ``key``, or ``None`` when missing, truncated or corrupt."""
        if (path := self._existing(case, key)) is None:
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                # Read every member now: zipfile checks each member's CRC as it is read.
                return _arrays_to_records({k: z[k] for k in z.files}, key)
        except Exception as e:  # any failure to parse means "recompute", never "use"
            log.warning("slice cache entry %s is unreadable (%s); recomputing", path, e)
            self.corrupt += 1
            return None

    def save(self, case: str, key: str, entry: CachedCase) -> bool:
        """Write an entry atomically; returns False (and logs) when it cannot be serialised
        (``meta`` not JSON-able)."""
        if self.root is None:
            return False
        try:
            arrays = _records_to_arrays(key, entry.records, entry.meta, entry.arrays)
        except (TypeError, ValueError) as e:
            log.warning("case %s not cached: %s", case, e)
            return False
        atomic_write(self.path(case, key), lambda f: _write_npz(f, arrays))
        return True

    def get_or_compute(
        self, case: CaseFiles, settings: Mapping[str, Any], compute: Callable[[], CachedCase]
    ) -> CachedCase:
        """The cached entry of ``case``, calling ``compute()`` (which reads the files) on a miss
        and storing its result. Exceptions from ``compute`` propagate and nothing is stored.

        Args:
            case: the case's files (their path, size and mtime are part of the key).
            settings: every option the slices depend on (see ``slice_cache_key``).
            compute: loads the case from its source files.
        """
        key = slice_cache_key(case, settings)
        hit = self.load(case.image_id, key)
        if hit is not None:
            self.hits += 1
            return hit
        self.misses += 1
        entry = compute()
        self.save(case.image_id, key, entry)
        return entry

    def entry_header(self, case: str, key: str) -> dict[str, Any] | None:
        """The header of the entry of ``case`` under ``key`` after checking every member's CRC
        (streamed in 1 MiB chunks, so memory stays small however large the case); ``None`` when
        missing, truncated or corrupt."""
        if (path := self._existing(case, key)) is None:
            return None
        try:
            return _verified_header(path, key)
        except Exception as e:  # any failure to parse means "recompute", never "use"
            log.warning("slice cache entry %s is unreadable (%s); recomputing", path, e)
            self.corrupt += 1
            return None

    def ensure(
        self, case: CaseFiles, settings: Mapping[str, Any], compute: Callable[[], CachedCase]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Make sure the entry of ``case`` exists (``compute()`` on a miss, stored, then freed;
        an existing one is verified whole) and return its header and the facts of its file.

        Returns:
            (header, facts): ``header["slices"]`` describes each slice (no pixel data);
            ``facts`` holds the entry file's ``path``, ``stamp`` ((size, mtime_ns, inode)) and
            ``sha256``, what :mod:`sam_ft.data.slice_index` keeps so that the next start checks
            a ``stat`` instead of reading the file.

        Raises:
            DataError: from ``compute``; or the entry cannot be stored (``meta`` not JSON-able),
                since the data set is read back from it.
        """
        if self.root is None:
            raise RuntimeError("the slice cache is disabled (no cache_dir)")
        key = slice_cache_key(case, settings)
        header = self.entry_header(case.image_id, key)
        if header is not None:
            self.hits += 1
        else:
            self.misses += 1
            entry = compute()
            if not self.save(case.image_id, key, entry):
                raise DataError(case.image, "its slices cannot be stored in the slice cache")
            del entry
            header = _verified_header(self.path(case.image_id, key), key)
        return header, entry_facts(self.path(case.image_id, key))


def entry_facts(path: str | Path) -> dict[str, Any]:
    """``path``, ``stamp`` ((size, mtime_ns, inode)) and ``sha256`` of an entry file, read now
    (a verified or freshly written entry)."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    stamp = (int(st.st_size), int(st.st_mtime_ns), int(st.st_ino))
    return {"path": str(path), "stamp": stamp, "sha256": h.hexdigest()}


DISTRUSTED = Path("index") / "distrusted"
"""Under the cache folder: one empty file per entry that failed a read after it was indexed;
its stat stamp is not trusted again until the entry is verified whole (see ``cache_check``)."""


def distrust(path: str | Path) -> None:
    """Mark the entry file ``path`` (``<cache>/slices/<name>``) as damaged for the next start."""
    path = Path(path)
    marker = path.parent.parent / DISTRUSTED / path.name
    with contextlib.suppress(OSError):
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.touch()


@dataclass
class SliceRef:
    """Index entry of one cached slice: where it lives and what is known without reading it.

    ``load()`` reads the slice's arrays from the entry file and returns the
    :class:`~sam_ft.data.types.SliceRecord`. Attributes mirror ``SliceRecord`` (``labels`` (K,)
    int64; ``original_size`` (H, W)); ``digest`` is the embedding cache's key of the image.
    """

    path: str
    index: int
    case: str
    slice_index: int
    labels: np.ndarray
    names: list[str]
    original_size: tuple[int, int]
    image_shape: tuple[int, ...]
    masks_shape: tuple[int, int, int]
    digest: str
    spacing: tuple[float, float]
    modality: str
    num_slices: int
    slice_spacing: float
    image_id: str
    has_raw: bool

    def load(self, image: bool = True, raw: bool = True) -> SliceRecord:
        """The slice's record; ``image=False`` / ``raw=False`` skip reading those arrays (the
        record then holds a read-only all-zero view of the image's shape / None)."""
        names = ["masks"] + (["image"] if image else []) + (["raw"] if raw and self.has_raw else [])
        arrays = read_slice(self.path, self.index, names)
        return SliceRecord(
            case=self.case,
            slice_index=self.slice_index,
            # Not read: a zero-stride view of the right shape (original_size still holds).
            image=arrays["image"] if image else np.broadcast_to(np.uint8(0), self.image_shape),
            masks=bitmask.unpack(arrays["masks"], self.masks_shape),
            labels=self.labels,
            names=list(self.names),
            spacing=self.spacing,
            modality=self.modality,
            raw=arrays.get("raw"),
            num_slices=self.num_slices,
            slice_spacing=self.slice_spacing,
            image_id=self.image_id,
        )


def _verified_header(path: Path, key: str) -> dict[str, Any]:
    """The entry's header; every member is read to its end first, so zipfile checks its CRC."""
    with zipfile.ZipFile(path) as zf:
        for name in zf.namelist():
            with zf.open(name) as f:
                while f.read(1 << 20):
                    pass
        with zf.open("header.npy") as f:
            header = json.loads(str(np.lib.format.read_array(f, allow_pickle=False)[()]))
    if header.get("format") != SLICE_CACHE_FORMAT or header.get("key") != key:
        raise ValueError("cache entry belongs to another key or format")
    return header


# Open entry files of this process, so reading an item does not parse the zip directory again.
# Keyed by process id: a DataLoader worker forked from the main process must not share the
# parent's file offset.
_OPEN: dict[tuple[int, str], zipfile.ZipFile] = {}
_MAX_OPEN = 8


def _zip(path: str) -> zipfile.ZipFile:
    key = (os.getpid(), path)
    zf = _OPEN.pop(key, None)
    if zf is None:
        zf = zipfile.ZipFile(path)
        while len(_OPEN) >= _MAX_OPEN:
            old_key = next(iter(_OPEN))
            old = _OPEN.pop(old_key)
            if old_key[0] == os.getpid():
                old.close()
    _OPEN[key] = zf  # most recently used last
    return zf


def read_slice(path: str | Path, index: int, names: Iterable[str]) -> dict[str, np.ndarray]:
    """Arrays ``<name>_<index>`` of one slice of an entry (e.g. ``image``, ``masks``, ``raw``),
    read from disk on demand (a DataLoader worker reads only the items it serves).

    Raises:
        DataError: the entry file is gone or damaged after it was indexed.
    """
    try:
        zf = _zip(str(path))
        out = {}
        for name in names:
            with zf.open(f"{name}_{index}.npy") as f:
                out[name] = np.lib.format.read_array(f, allow_pickle=False)
        return out
    except Exception as e:
        _OPEN.pop((os.getpid(), str(path)), None)
        distrust(path)
        raise DataError(
            str(path), f"slice cache entry unreadable after indexing ({e}); rerun to rebuild it"
        ) from e


def read_entry(path: str | Path, key: str | None = None) -> CachedCase:
    """A whole entry (one case: slices, meta, arrays) read from ``path``, e.g. for evaluating
    it; ``key`` (when given) must match the entry's."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception:
        distrust(path)
        raise
    if key is None:
        key = json.loads(str(arrays["header"][()]))["key"]
    return _arrays_to_records(arrays, key)
