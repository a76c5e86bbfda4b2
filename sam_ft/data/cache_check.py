"""Checking the slice cache at start in O(1) per entry, and verifying it whole on demand.

A split's index (:mod:`sam_ft.data.slice_index`) is saved under ``<cache>/index/<tag>.npz``,
where the tag hashes what the entries' keys hash (the cases, their source files' path, size and
mtime, the slicing settings): an unchanged split finds its index by the tag, and each entry is
then checked by one ``stat`` against the stamp (size, mtime_ns, inode) taken when it was written
or last verified whole. Nothing is read from the entries: a requeued job or another rank starts
at once. An entry that changed, or that failed a read since (:func:`sam_ft.data.cache.distrust`),
is verified whole again (every member's CRC) and its stamp renewed. Damage that keeps the
stamp (a bit flip in place) is found when the slice is read, with a one-line error, and the
next start verifies that entry whole.

``python -m sam_ft.data.cache_check verify DIR`` (``sam-ft-cache verify DIR``) reads every
entry of a cache folder whole: every member's CRC, the header, and the SHA-256 the index
recorded, and marks the bad ones for recomputation.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import stat
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sam_ft.data.cache import (
    DISTRUSTED,
    SLICE_CACHE_FORMAT,
    SliceCache,
    _file_stamp,
    _verified_header,
    slice_cache_key,
)
from sam_ft.data.loading import dataset_meta, slice_settings
from sam_ft.data.preparation import case_settings
from sam_ft.data.slice_index import SliceIndex, build_index, open_index
from sam_ft.data.types import CaseFiles

INDEX = "index"
RECENT = 4
"""Besides the ones asked for, the most recently written indexes whose stamps a changed split
reuses (one case edited: only that case is read again)."""


def _source_stamp(path: str) -> str:
    """One ``stat`` of a source file (its full listing for a DICOM folder), as text."""
    try:
        st = os.stat(path)
    except OSError:
        return "missing"
    if stat.S_ISDIR(st.st_mode):
        return json.dumps(_file_stamp(path))
    return f"{st.st_size}:{st.st_mtime_ns}"


def split_tag(cases: Sequence[CaseFiles], task: Mapping[str, Any], data: Mapping[str, Any]) -> str:
    """Hex tag of a list of cases under the task's slicing settings: it changes whenever one of
    their cache keys (``slice_cache_key``) would, at a few ``stat`` calls per case."""
    h = hashlib.sha256(f"format={SLICE_CACHE_FORMAT};cwd={os.getcwd()}\n".encode())
    h.update(json.dumps(slice_settings(task, data), sort_keys=True, default=str).encode())
    metas: dict[str, str] = {}  # dataset.json per folder of images
    for c in cases:
        folder = os.path.dirname(str(c.image))
        if folder not in metas:
            meta = dataset_meta(c, task)
            metas[folder] = hashlib.sha256(
                json.dumps(meta, sort_keys=True, default=str).encode()
            ).hexdigest()
        parts = [c.case, c.image_id, str(c.image), _source_stamp(str(c.image)), metas[folder]]
        if c.label is not None:
            parts += [str(c.label), _source_stamp(str(c.label))]
        for p in c.label_parts:
            parts += [str(p), _source_stamp(str(p))]
        h.update(("\0".join(parts) + "\n").encode())
    return h.hexdigest()[:32]


def index_path(cache_dir: str | Path, tag: str) -> Path:
    return Path(cache_dir) / INDEX / f"{tag}.npz"


def distrusted(cache_dir: str | Path) -> set[str]:
    """Names of the entry files marked damaged since they were indexed."""
    try:
        return set(os.listdir(Path(cache_dir) / DISTRUSTED))
    except OSError:
        return set()


def clear_distrust(cache_dir: str | Path, paths: Sequence[str]) -> None:
    """Remove the marks of entries just verified whole or rewritten."""
    marked = distrusted(cache_dir)
    for p in paths:
        if (name := os.path.basename(p)) in marked:
            with contextlib.suppress(OSError):
                os.unlink(Path(cache_dir) / DISTRUSTED / name)


def trusted(index: SliceIndex, cache_dir: str | Path) -> np.ndarray:
    """(E,) bool: entry e's file has the stamp the index recorded and was not marked since."""
    bad = distrusted(cache_dir)
    out = np.zeros(len(index.entries), dtype=bool)
    for e, row in enumerate(index.entries):
        path = index.string(row["path"])
        try:
            st = os.stat(path)
        except OSError:
            continue
        out[e] = (
            st.st_size == row["size"]
            and st.st_mtime_ns == row["mtime_ns"]
            and st.st_ino == row["ino"]
            and os.path.basename(path) not in bad
        )
    return out


def open_trusted(cache_dir: str | Path, tag: str) -> SliceIndex | None:
    """The saved index of ``tag`` when every one of its entries is unchanged, else None."""
    index = open_index(index_path(cache_dir, tag))
    if index is None or not trusted(index, cache_dir).all():
        return None
    return index


def known_entries(cache_dir: str | Path, tags: Sequence[str] = ()) -> dict[str, tuple]:
    """{entry path: (header, facts)} of the unchanged entries of the indexes ``tags`` (with their
    ``-<split>`` / ``-partial`` variants) and of the ``RECENT`` most recently written others:
    what a changed split need not read again."""
    folder = Path(cache_dir) / INDEX
    try:
        others = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime_ns, reverse=True)
    except OSError:
        others = []
    asked = [p for t in tags for p in sorted(folder.glob(f"{t}*.npz"))]  # -<split>, -partial
    paths = list(dict.fromkeys(asked + others[:RECENT]))
    known: dict[str, tuple] = {}
    for path in paths:
        index = open_index(path)
        if index is None:
            continue
        for e in np.flatnonzero(trusted(index, cache_dir)):
            facts = index.facts(int(e))
            if facts["path"] not in known:
                known[facts["path"]] = (index.header(int(e)), facts)
    return known


def index_splits(
    tagged: Sequence[tuple[str, CaseFiles]],
    prepare: Callable[..., list[tuple[str, CaseFiles, tuple]]],
    cache_dir: str | Path,
    tag: str | Mapping[str, str],
    known: Sequence[str] = (),
) -> dict[str, SliceIndex]:
    """The index of each split of ``tagged`` ((split, case) pairs), saved under ``tag`` (one for
    all, or one per split) and opened memory-mapped.

    ``prepare(tagged, known=...)`` preprocesses (or verifies whole) the cases and returns
    (split, case, (header, facts)) of the good ones; ``known`` lists the indexes whose entries
    need no reading when their stamps are unchanged. A split with a bad case is saved as
    ``<tag>-partial``: its good entries' stamps serve the next start, which meets the bad case
    again (and reports or skips it as ``data.on_error`` says).
    """
    done = prepare(tagged, known=known_entries(cache_dir, known))
    out = {}
    # Every split named by ``tag``, an empty one too (an empty index, not a missing one).
    splits = tag if isinstance(tag, Mapping) else dict.fromkeys(s for s, _ in tagged)
    for split in splits:
        rows = [(c.case, c.image_id, str(c.image), *found) for s, c, found in done if s == split]
        index = build_index(rows)
        name = tag[split] if isinstance(tag, Mapping) else f"{tag}-{split}"
        name += "" if len(rows) == sum(s == split for s, _ in tagged) else "-partial"
        path = index.save(index_path(cache_dir, name))
        out[split] = open_index(path) or index  # memory-mapped: shared with ranks and workers
        clear_distrust(cache_dir, index.entry_paths())
    return out


def index_share(
    tagged: Sequence[tuple[str, CaseFiles]],
    prepare: Callable[..., list[tuple[str, CaseFiles, tuple]]],
    cache_dir: str | Path,
    task: Mapping[str, Any],
    data: Mapping[str, Any],
) -> dict[str, SliceIndex]:
    """The index of each split of ``tagged`` alone (one evaluation share): its saved index when
    unchanged, else :func:`index_splits` (saved under the share's tag)."""
    if not tagged:
        return {}
    tag = split_tag([c for _, c in tagged], task, data)
    splits = list(dict.fromkeys(s for s, _ in tagged))
    ready = {s: open_trusted(cache_dir, f"{tag}-{s}") for s in splits}
    if any(index is None for index in ready.values()):
        ready = index_splits(tagged, prepare, cache_dir, tag, [tag])
    return ready


def known_of(
    cases: Sequence[CaseFiles],
    known: Mapping[str, tuple],
    cache: SliceCache,
    task: Mapping[str, Any],
    data: Mapping[str, Any],
) -> list[tuple | None]:
    """The (header, facts) of each case's entry when ``known`` holds it, else None."""
    if not known or cache.root is None:
        return [None] * len(cases)
    out = []
    for case in cases:
        key = slice_cache_key(case, case_settings(case, task, data))
        out.append(known.get(str(cache.path(case.image_id, key))))
    return out


def verify(cache_dir: str | Path) -> list[tuple[str, str]]:
    """Read every slice-cache entry under ``cache_dir`` whole; returns (path, reason) of each
    bad one (also marked, so the next start recomputes it)."""
    from sam_ft.data.cache import distrust

    digests: dict[str, bytes] = {}
    for path in sorted((Path(cache_dir) / INDEX).glob("*.npz")):
        if (index := open_index(path)) is not None:
            for row in index.entries:
                digests[index.string(row["path"])] = row["sha256"].tobytes()
    bad = []
    for entry in sorted((Path(cache_dir) / "slices").glob("*.npz")):
        try:
            header_key = _header_key(entry)
            _verified_header(entry, header_key)
            want = digests.get(str(entry))
            if want is not None and hashlib.sha256(entry.read_bytes()).digest() != want:
                # Still a valid zip, but not the bytes indexed: indexes holding it are stale.
                raise ValueError("its bytes differ from the SHA-256 recorded when it was indexed")
        except Exception as e:
            bad.append((str(entry), str(e)))
            distrust(entry)
    return bad


def _header_key(path: Path) -> str:
    import zipfile

    with zipfile.ZipFile(path) as zf, zf.open("header.npy") as f:
        header = json.loads(str(np.lib.format.read_array(f, allow_pickle=False)[()]))
    return str(header.get("key"))


def main(argv: Sequence[str] | None = None) -> int:
    """``sam-ft-cache verify DIR``: exit status 1 when an entry is damaged."""
    p = argparse.ArgumentParser(prog="sam-ft-cache", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("verify", help="read every slice-cache entry whole (CRC, header, SHA-256)")
    v.add_argument("cache_dir", help="data.cache_dir (the folder holding slices/)")
    args = p.parse_args(argv)
    root = Path(args.cache_dir)
    if not (root / "slices").is_dir():
        print(f"sam-ft-cache: {root}: no slices/ folder (not a data.cache_dir)", file=sys.stderr)
        return 2
    bad = verify(root)
    for path, reason in bad:
        print(f"{path}: {reason}")
    n = len(list((root / "slices").glob("*.npz")))
    print(f"{n - len(bad)} of {n} slice-cache entries verified; {len(bad)} damaged")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
