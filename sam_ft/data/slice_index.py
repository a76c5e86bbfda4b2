"""The slice-cache index in columns: numpy arrays instead of one Python object per slice.

A split's index is a few arrays (one row per slice, one per entry, a label array and a string
table) saved in one uncompressed ``.npz`` under ``<cache_dir>/index/<tag>.npz`` and opened
memory-mapped: the ranks of a node and every DataLoader worker read the same pages of the page
cache, and reading a row writes nothing, so a forked worker's private memory does not grow with
the number of slices (a list of dataclasses is copied page by page as workers touch the objects'
reference counts).

Each entry row also holds the entry file's stat stamp (size, mtime_ns, inode) taken when it was
verified or written, and the SHA-256 of its bytes: the next start checks the stamp (one
``stat``) instead of reading the entry (see :mod:`sam_ft.data.cache_check`).

``SliceIndex[i]`` is a :class:`~sam_ft.data.cache.SliceRef` built on access (a view of row i).
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sam_ft.atomic import atomic_write
from sam_ft.data.cache import SliceRef
from sam_ft.data.preparation import CaseEntry

ROW = np.dtype(
    [
        ("entry", "<i4"),  # row of ``entries``
        ("member", "<i4"),  # the slice's number inside its entry (``image_<member>``)
        ("slice_index", "<i8"),
        ("image_shape", "<i4", (3,)),  # (H, W, C); C = 0 for a 2D (H, W) image
        ("masks_shape", "<i4", (3,)),  # (K, H, W)
        ("label_start", "<i8"),  # labels[label_start : label_start + K], names likewise
        # The image's SHA-256 (embedding-cache key) as bytes; not "S32", which drops trailing
        # zero bytes when read back.
        ("digest", "u1", (32,)),
        ("spacing", "<f8", (2,)),
        ("slice_spacing", "<f8"),
        ("num_slices", "<i8"),
        ("has_raw", "?"),
        ("case", "<i4"),  # string ids
        ("image_id", "<i4"),
        ("modality", "<i4"),
    ]
)
ENTRY = np.dtype(
    [
        ("path", "<i4"),  # string id of the entry file
        ("case", "<i4"),
        ("image_id", "<i4"),
        ("image", "<i4"),  # the case's source image (for messages)
        ("first", "<i8"),  # rows[first : first + count] are its slices
        ("count", "<i8"),
        ("size", "<i8"),  # stat stamp of the entry file when verified or written
        ("mtime_ns", "<i8"),
        ("ino", "<i8"),
        ("sha256", "u1", (32,)),  # of the entry file's bytes, when made or verified
    ]
)


_ARRAYS = ("rows", "entries", "labels", "names", "text", "offsets")


def file_stamp(path: str | os.PathLike) -> tuple[int, int, int] | None:
    """(size, mtime_ns, inode) of a file, or None when it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return int(st.st_size), int(st.st_mtime_ns), int(st.st_ino)


def _raw(hex_digest: str) -> np.ndarray:
    return np.frombuffer(bytes.fromhex(hex_digest), dtype=np.uint8)


class _Strings:
    """Interned strings -> ids, stored as one UTF-8 buffer and offsets."""

    def __init__(self) -> None:
        self.ids: dict[str, int] = {}

    def __call__(self, s: str) -> int:
        return self.ids.setdefault(str(s), len(self.ids))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        data = [s.encode() for s in self.ids]
        offsets = np.zeros(len(data) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum([len(b) for b in data])
        return np.frombuffer(b"".join(data), dtype=np.uint8), offsets


def build_index(entries: Sequence[tuple[str, str, str, Mapping[str, Any], Mapping[str, Any]]]):
    """The index of entries given as (case, image id, source image, header, facts) in order, where
    ``header`` is the entry's header (its ``slices``) and ``facts`` holds ``path``, ``stamp``
    ((size, mtime_ns, inode)) and ``sha256`` (hex) of the entry file."""
    strings = _Strings()
    n_rows = sum(len(h["slices"]) for *_, h, _ in entries)
    rows = np.zeros(n_rows, dtype=ROW)
    table = np.zeros(len(entries), dtype=ENTRY)
    labels: list[int] = []
    names: list[int] = []
    r = 0
    for e, (case, image_id, image, header, facts) in enumerate(entries):
        slices = header["slices"]
        size, mtime_ns, ino = facts["stamp"]
        table[e] = (
            strings(facts["path"]), strings(case), strings(image_id), strings(image), r,
            len(slices), size, mtime_ns, ino, _raw(facts["sha256"]),
        )  # fmt: skip
        for i, s in enumerate(slices):
            shape = [int(v) for v in s["image_shape"]] + [0] * (3 - len(s["image_shape"]))
            if len(s["labels"]) != len(s["names"]):
                raise ValueError(f"{facts['path']}: slice {i} has labels and names of two lengths")
            rows[r] = (
                e, i, int(s["slice_index"]), shape, [int(v) for v in s["masks_shape"]],
                len(labels), _raw(s["digest"]), s["spacing"], float(s["slice_spacing"]),
                int(s["num_slices"]), bool(s["has_raw"]), strings(s["case"]),
                strings(s["image_id"]), strings(s["modality"]),
            )  # fmt: skip
            labels.extend(int(v) for v in s["labels"])
            names.extend(strings(n) for n in s["names"])
            r += 1
    text, offsets = strings.arrays()
    return SliceIndex(
        rows, table, np.asarray(labels, np.int64), np.asarray(names, np.int32), text, offsets
    )


class SliceIndex(Sequence[SliceRef]):
    """Columns of a split's slices (see the module docstring); ``index[i]`` is a ``SliceRef``.

    Attributes:
        rows: (N,) ``ROW`` structured array, one per slice, in case order.
        entries: (E,) ``ENTRY`` structured array, one per case (entry file).
        labels: (sum K,) int64 object label values; ``names``: (sum K,) int32 string ids.
        text, offsets: the string table (UTF-8 bytes and (S + 1,) int64 offsets).
    """

    def __init__(self, rows, entries, labels, names, text, offsets) -> None:
        self.rows, self.entries, self.labels, self.names = rows, entries, labels, names
        self.text, self.offsets = text, offsets
        self.source: Path | None = None

    def string(self, i: int) -> str:
        return bytes(self.text[self.offsets[i] : self.offsets[i + 1]]).decode()

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row = self.rows[int(i)]
        k, start = int(row["masks_shape"][0]), int(row["label_start"])
        shape = tuple(int(v) for v in row["image_shape"] if v) or (0, 0)
        return SliceRef(
            path=self.string(self.entries[row["entry"]]["path"]),
            index=int(row["member"]),
            case=self.string(row["case"]),
            slice_index=int(row["slice_index"]),
            labels=np.array(self.labels[start : start + k]),
            names=[self.string(n) for n in self.names[start : start + k]],
            original_size=(shape[0], shape[1]),
            image_shape=shape,
            masks_shape=tuple(int(v) for v in row["masks_shape"]),  # type: ignore[arg-type]
            digest=row["digest"].tobytes().hex(),
            spacing=(float(row["spacing"][0]), float(row["spacing"][1])),
            modality=self.string(row["modality"]),
            num_slices=int(row["num_slices"]),
            slice_spacing=float(row["slice_spacing"]),
            image_id=self.string(row["image_id"]),
            has_raw=bool(row["has_raw"]),
        )

    def __iter__(self) -> Iterator[SliceRef]:
        for i in range(len(self)):
            yield self[i]

    def digests(self) -> list[str]:
        """Hex image digest of every slice (the embedding cache's keys), in order."""
        return [d.tobytes().hex() for d in self.rows["digest"]]

    def case_entries(self) -> list[CaseEntry]:
        """The cases (entries) of the index, in order."""
        keys = ("image_id", "case", "path", "image")
        return [CaseEntry(*(self.string(e[k]) for k in keys)) for e in self.entries]

    def strings(self) -> list[str]:
        """The whole string table, decoded once (ids index it)."""
        return [self.string(i) for i in range(len(self.offsets) - 1)]

    def slice_keys(self, chunk: int = 65_536) -> Iterator[tuple[str, str]]:
        """(image id, or the case where it has none; ``<slice_index>:<hex digest>``) of every
        slice in order, from the columns: what ``SliceRef.image_id or case``,
        ``slice_index`` and ``digest`` give, without building one ``SliceRef`` per slice.
        Digests are made hex ``chunk`` rows at a time (memory flat in the number of slices)."""
        strings = self.strings()
        for at in range(0, len(self.rows), chunk):
            rows = self.rows[at : at + chunk]
            digests = np.ascontiguousarray(rows["digest"]).tobytes().hex()
            columns = (rows[c].tolist() for c in ("slice_index", "image_id", "case"))
            for i, (index, image, case) in enumerate(zip(*columns, strict=True)):
                yield strings[image] or strings[case], f"{index}:{digests[64 * i : 64 * i + 64]}"

    def modalities(self) -> list[str]:
        """The slices' modalities (non-empty), sorted."""
        found = {self.string(int(m)) for m in np.unique(self.rows["modality"])}
        return sorted(m for m in found if m)

    def first_labels(self) -> dict[str, int]:
        """{object name: its label value on the first slice that has it}, in the order names
        first appear when the slices' ``names`` and ``labels`` are walked in row order."""
        if not len(self.rows):
            return {}
        counts = self.rows["masks_shape"][:, 0].astype(np.int64)
        starts = self.rows["label_start"].astype(np.int64)
        # Each row's label positions, rows in order: start + 0 .. start + K - 1.
        before = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        at = np.repeat(starts - before, counts) + np.arange(int(counts.sum()), dtype=np.int64)
        names, values = np.asarray(self.names)[at], np.asarray(self.labels)[at]
        ids, first = np.unique(names, return_index=True)
        order = np.argsort(first, kind="stable")
        return {self.string(int(ids[k])): int(values[first[k]]) for k in order}

    def entry_paths(self) -> list[str]:
        return [self.string(p) for p in self.entries["path"]]

    def slices_per_image(self) -> dict[str, int]:
        """{image_id: number of slices} from the entry table (no row is read)."""
        out: dict[str, int] = {}
        for e in self.entries:
            if e["count"]:  # an image without a kept slice counts as none, as with no row
                key = self.string(e["image_id"])
                out[key] = out.get(key, 0) + int(e["count"])
        return out

    def save(self, path: str | Path) -> Path:
        """Write the index as one uncompressed ``.npz`` (atomically), for :func:`open_index`."""
        arrays = {k: np.ascontiguousarray(getattr(self, k)) for k in _ARRAYS}
        return atomic_write(path, lambda f: np.savez(f, **arrays))

    def header(self, e: int) -> dict[str, Any]:
        """Entry ``e``'s header (its ``slices``) rebuilt from the rows, to index it again."""
        first, count = int(self.entries[e]["first"]), int(self.entries[e]["count"])
        slices = []
        for i in range(first, first + count):
            ref, row = self[i], self.rows[i]
            slices.append(
                {
                    "case": ref.case, "slice_index": ref.slice_index,
                    "masks_shape": list(ref.masks_shape), "labels": ref.labels.tolist(),
                    "image_shape": [int(v) for v in row["image_shape"] if v], "digest": ref.digest,
                    "names": ref.names, "spacing": list(ref.spacing), "modality": ref.modality,
                    "has_raw": ref.has_raw, "num_slices": ref.num_slices,
                    "slice_spacing": ref.slice_spacing, "image_id": ref.image_id,
                }
            )  # fmt: skip
        return {"slices": slices}

    def facts(self, e: int) -> dict[str, Any]:
        """Entry ``e``'s file: ``path``, ``stamp`` and ``sha256`` (as ``build_index`` takes)."""
        row = self.entries[e]
        stamp = (int(row["size"]), int(row["mtime_ns"]), int(row["ino"]))
        return {
            "path": self.string(row["path"]),
            "stamp": stamp,
            "sha256": row["sha256"].tobytes().hex(),
        }

    # Pickled (a spawned worker, a rank) as the file's path when it came from one: the new
    # process maps the same file instead of receiving a copy of the arrays.
    def __getstate__(self) -> dict[str, Any]:
        if self.source is not None:
            return {"source": str(self.source)}
        return {k: np.asarray(getattr(self, k)) for k in _ARRAYS}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "source" in state:
            other = open_index(state["source"])
            if other is None:
                raise FileNotFoundError(f"slice index {state['source']} is gone or damaged")
            state = {k: getattr(other, k) for k in (*_ARRAYS, "source")}
        self.__dict__.update({"source": None, **state})


def open_index(path: str | Path) -> SliceIndex | None:
    """The index saved at ``path``, its arrays memory-mapped (read-only); None when missing or
    unreadable (then it is rebuilt)."""
    try:
        with zipfile.ZipFile(path) as zf, open(path, "rb") as f:
            arrays = {}
            for info in zf.infolist():
                if info.compress_type != zipfile.ZIP_STORED:
                    raise ValueError(f"{info.filename} is compressed")
                # The member's bytes start after its local header (30 bytes, name, extra).
                f.seek(info.header_offset)
                local = f.read(30)
                start = info.header_offset + 30 + int.from_bytes(local[26:28], "little")
                start += int.from_bytes(local[28:30], "little")
                f.seek(start)
                version = np.lib.format.read_magic(f)
                read_header = {(1, 0): np.lib.format.read_array_header_1_0}.get(
                    version, np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read_header(f)
                name = info.filename.removesuffix(".npy")
                if int(np.prod(shape)) == 0:
                    arrays[name] = np.zeros(shape, dtype=dtype)
                    continue
                order = "F" if fortran else "C"
                arrays[name] = np.memmap(
                    path, dtype=dtype, mode="r", offset=f.tell(), shape=shape, order=order
                )
        if arrays["rows"].dtype != ROW or arrays["entries"].dtype != ENTRY:
            raise ValueError("an index of another layout")
        index = SliceIndex(*(arrays[k] for k in _ARRAYS))
        index.source = Path(path)
        return index
    except Exception:  # missing, truncated, another layout: rebuilt by the caller
        return None
