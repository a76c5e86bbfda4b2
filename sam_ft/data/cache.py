"""On-disk cache of a case's preprocessed slices, so later epochs and later runs read no NIfTI.

One ``.npz`` file per case, named by a key that hashes the source file(s) (path, size, mtime) and
the slicing/intensity settings: editing a file or a setting gives a new key, so a stale entry is
never read. Writes are atomic (temp file in the same folder + ``os.replace``), so parallel jobs
can share one cache folder. A truncated or damaged entry fails to load (zip CRC, key check) and is
recomputed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from sam_ft.data.types import CaseFiles, SliceRecord

log = logging.getLogger(__name__)

# Bump when the entry layout changes: old entries then simply stop matching.
SLICE_CACHE_FORMAT = 1


def atomic_write(path: str | Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` so readers see the old file or the whole new one.

    The temp file lives in the same folder because ``os.replace`` is only atomic within one
    filesystem; two jobs writing the same entry each replace it with a complete file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


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
        out[f"masks_{i}"] = np.packbits(masks.reshape(-1))
        out[f"image_{i}"] = np.ascontiguousarray(r.image, dtype=np.uint8)
        out[f"labels_{i}"] = np.asarray(r.labels, dtype=np.int64)
        if r.raw is not None:
            out[f"raw_{i}"] = np.asarray(r.raw, dtype=np.float32)
        header["slices"].append(
            {
                "case": r.case,
                "slice_index": int(r.slice_index),
                "masks_shape": list(masks.shape),
                "names": list(r.names),
                "spacing": [float(s) for s in r.spacing],
                "modality": r.modality,
                "has_raw": r.raw is not None,
                "num_slices": int(r.num_slices),
                "slice_spacing": float(r.slice_spacing),
                "image_id": r.image_id,
                "extra": r.extra,
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
                masks=unpack_masks(z[f"masks_{i}"], s["masks_shape"]),
                labels=z[f"labels_{i}"],
                names=list(s["names"]),
                spacing=tuple(s["spacing"]),
                modality=s["modality"],
                raw=z[f"raw_{i}"] if s["has_raw"] else None,
                num_slices=s["num_slices"],
                slice_spacing=s["slice_spacing"],
                image_id=s["image_id"],
                extra=s["extra"],
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

    def load(self, case: str, key: str) -> CachedCase | None:
        """The entry of ``case`` under ``key``, or ``None`` when missing, truncated or corrupt."""
        if self.root is None:
            return None
        path = self.path(case, key)
        if not path.is_file():
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
        (``meta`` or a record's ``extra`` not JSON-able)."""
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


def unpack_masks(packed: np.ndarray, shape: Iterable[int]) -> np.ndarray:
    """Inverse of ``np.packbits(mask.reshape(-1))``: (n_bytes,) uint8 -> bool array of ``shape``."""
    shape = tuple(shape)
    return np.unpackbits(packed, count=int(np.prod(shape))).astype(bool).reshape(shape)
