"""Loaded adapters kept between requests: least recently used out first, bounded by their tensors' bytes.

An entry is keyed by its file and remembers the file's size and modification time, so an adapter retrained
in place is read again on its next use instead of being served stale. An adapter larger than the whole
cache is still loaded for the request that needs it, just not kept.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from difflora.adapter.lycoris import is_lycoris
from difflora.adapter.types import Adapter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheEntry:
    name: str
    path: Path
    adapter: Adapter
    nbytes: int
    stamp: tuple[int, int]  # (size, mtime_ns) of the file when it was read


@dataclass(frozen=True)
class CacheStats:
    hits: int
    misses: int
    evictions: int
    nbytes: int
    capacity: int
    entries: int


def adapter_bytes(adapter: Adapter) -> int:
    """Memory held by an adapter's tensors."""
    return sum(
        sum(t.nbytes for t in w.tensors().values()) if is_lycoris(w) else w.down.nbytes + w.up.nbytes  # type: ignore[union-attr]
        for w in adapter.modules.values()
    )


def _stamp(path: Path) -> tuple[int, int]:
    status = os.stat(path)
    return status.st_size, status.st_mtime_ns


class AdapterCache:
    """`get(name, path)` returns the adapter in `path`, read with `load` on a miss. Thread-safe (the
    engine serialises requests anyway, but /adapters and /metrics read it while a request runs)."""

    def __init__(self, capacity_bytes: int, load: Callable[[str, Path], Adapter]) -> None:
        self.capacity = max(0, int(capacity_bytes))
        self._load = load
        self._entries: OrderedDict[Path, CacheEntry] = OrderedDict()
        self._lock = threading.Lock()
        self._bytes = self.hits = self.misses = self.evictions = 0

    def get(self, name: str, path: Path) -> CacheEntry:
        key = path.resolve()
        stamp = _stamp(key)
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.stamp == stamp:
                self._entries.move_to_end(key)
                self.hits += 1
                return entry
            self.misses += 1
            if entry is not None:  # the file changed since it was read
                self._drop(key, why="its file changed")
        # Read outside the lock: a slow disk must not block /metrics. Two requests cannot race here, the
        # engine's lock admits one at a time; at worst a concurrent reader would load the file twice.
        adapter = self._load(name, key)
        entry = CacheEntry(name, key, adapter, adapter_bytes(adapter), stamp)
        with self._lock:
            self._insert(entry)
        return entry

    def _insert(self, entry: CacheEntry) -> None:
        if entry.nbytes > self.capacity:
            if self.capacity:
                logger.warning(
                    "adapter %s (%.1f MiB) is larger than the whole adapter cache (%.1f MiB, --cache-mb): "
                    "it is read from disk on every use",
                    entry.name,
                    entry.nbytes / 2**20,
                    self.capacity / 2**20,
                )
            return
        if entry.path in self._entries:
            self._drop(entry.path, why="replaced")
        while self._entries and self._bytes + entry.nbytes > self.capacity:
            oldest = next(iter(self._entries))
            self._drop(oldest, why="least recently used")
            self.evictions += 1
        self._entries[entry.path] = entry
        self._bytes += entry.nbytes

    def _drop(self, key: Path, *, why: str) -> None:
        entry = self._entries.pop(key)
        self._bytes -= entry.nbytes
        logger.info("adapter cache: evicted %s (%.2f MiB, %s)", entry.name, entry.nbytes / 2**20, why)

    def cached(self) -> list[CacheEntry]:
        """The entries, least recently used first."""
        with self._lock:
            return list(self._entries.values())

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(
                self.hits, self.misses, self.evictions, self._bytes, self.capacity, len(self._entries)
            )
