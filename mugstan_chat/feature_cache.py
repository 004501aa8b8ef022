"""A bounded LRU cache of encoded videos, so many questions about one video decode and encode it once.

A server is stateless per request (each request carries the whole conversation),
so :class:`mugstan_chat.chat.ChatSession` objects do not outlive a request; this
cache is what lets the tenth question about a video skip the decoder and the video
tower. Entries are keyed by everything that changes the features (the content hash
of the file, frames, clips, temporal mode, time window, the model) and bounded in
bytes, the resource that runs out; the least recently used entry goes first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(frozen=True)
class FeatureKey:
    """What the features of one video depend on."""

    content_hash: str  # sha256 of the file's bytes (never its path: the same bytes under two names share)
    frames: int  # T
    clips: int  # C
    temporal: str  # "stan", "mean", or "image" for a single image
    start: float | None  # time window in seconds (None: the whole video)
    end: float | None
    model: str  # identity of the model and branch that encoded them


def features_nbytes(features) -> int:
    """Bytes held by a ``chat.VideoFeatures`` (its tensors; metadata is negligible)."""
    return sum(t.numel() * t.element_size() for t in features.features)


class FeatureCache:
    """Thread-safe LRU mapping :class:`FeatureKey` -> ``chat.VideoFeatures``, at most ``max_bytes``.

    An entry larger than the whole budget is not stored. ``max_bytes = 0`` disables the cache.
    """

    def __init__(self, max_bytes: int):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[FeatureKey, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    def get(self, key: FeatureKey):
        """The cached features (marked most recently used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry[0]

    def put(self, key: FeatureKey, features) -> bool:
        """Stores ``features``, evicting least recently used entries; False if it is too large to keep."""
        size = features_nbytes(features)
        with self._lock:
            if size > self.max_bytes:
                return False
            old = self._entries.pop(key, None)
            if old is not None:
                self.bytes -= old[1]
            while self._entries and self.bytes + size > self.max_bytes:
                _, (_, evicted) = self._entries.popitem(last=False)
                self.bytes -= evicted
                self.evictions += 1
            self._entries[key] = (features, size)
            self.bytes += size
            return True

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: FeatureKey) -> bool:
        return key in self._entries

    def stats(self) -> dict:
        """Counters for /health and logs."""
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "evictions": self.evictions}
