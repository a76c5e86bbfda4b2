"""Child process of test_cache_faults.py: a second job writing the same slice-cache entries.

Imports only the cache (numpy), so a spawned interpreter starts in well under a second.
"""

from __future__ import annotations

from sam_ft.data.cache import CachedCase, SliceCache


def fill(cache_dir: str, items: list[tuple[str, str, CachedCase]], rounds: int) -> None:
    """Write every (image_id, key, entry) ``rounds`` times, reading each back in between
    (``save``, not ``get_or_compute``, so two writers keep overlapping)."""
    cache = SliceCache(cache_dir)
    for _ in range(rounds):
        for image_id, key, entry in items:
            assert cache.save(image_id, key, entry)
            assert cache.load(image_id, key) is not None
