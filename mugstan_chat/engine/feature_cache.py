"""A bounded LRU cache of encoded videos, so many questions about one video decode and encode it once.

A server is stateless per request (each request carries the whole conversation),
so :class:`mugstan_chat.engine.conversation.ChatSession` objects do not outlive a request; this
cache is what lets the tenth question about a video skip the decoder and the video
tower. Entries are keyed by everything that changes the features (the content hash
of the file, frames, clips, temporal mode, time window, the model) and bounded in
bytes, the resource that runs out; the least recently used entry goes first.

The server, the web app (one cache shared by every visitor) and the CLI's ``chat``
command all build their keys here (:func:`session_key`, :func:`image_key`) and go through
:meth:`FeatureCache.get_or_encode`, so the three agree on what makes two encodings the
same, and N requests for the same new video at once decode and encode it once: the first
does the work, the others wait for its result.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field


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
    selection: tuple = ()  # clip selection: (M candidates, the chosen candidates' indices); () for uniform clips


def model_identity(chat_model) -> str:
    """What identifies the encoder of a loaded ``ChatModel``: checkpoint, STAN branch, dtype, quantization.

    Why: the branch changes "stan" features and the dtype their values. 4/8-bit loading keeps
    the tower and projector in 16 bit today (loader's skip list), so quantisation is in the key
    only so that a loader change can never serve stale features. One cache serves one loaded
    model in practice; the identity keeps a cache that outlives a reload from returning
    another model's features.
    """
    s = chat_model.settings
    return f"{s.model}|stan={s.stan}|{s.dtype}|{s.quantization or 'full'}"


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks (an upload may be hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def session_key(session, content_hash: str) -> FeatureKey:
    """The key of a ``chat.ChatSession``'s video features, given its file's content hash.

    Every setting of the session that changes its features is in the key: frames, clips,
    temporal mode ("concat" for the frames-as-images baseline, whose features differ from
    both modes), time window and the model's identity.
    """
    start, end = session.window
    temporal = "concat" if session.frames_as_images else session.temporal
    return FeatureKey(content_hash, session.frames, session.clips, temporal, start, end,
                      model_identity(session.chat_model))


def image_key(chat_model, content_hash: str) -> FeatureKey:
    """The key of a single image's features (stock LLaVA image chat: one frame, no temporal branch)."""
    return FeatureKey(content_hash, 1, 1, "image", None, None, model_identity(chat_model))


def features_nbytes(features) -> int:
    """Bytes held by a ``chat.VideoFeatures`` (its tensors; metadata is negligible)."""
    return sum(t.numel() * t.element_size() for t in features.features)


@dataclass
class InFlight:
    """An encode under way: waiters block on ``done``; ``features`` stays None if it failed."""

    done: threading.Event = field(default_factory=threading.Event)
    features: object | None = None


class FeatureCache:
    """Thread-safe LRU mapping :class:`FeatureKey` -> ``chat.VideoFeatures``, at most ``max_bytes``.

    An entry larger than the whole budget is not stored. ``max_bytes = 0`` disables the cache
    (concurrent requests for one key still share one encode).
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
        self.shared = 0  # requests that waited for another request's encode of the same key
        self._in_flight: dict[FeatureKey, InFlight] = {}

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

    def get_or_encode(self, key: FeatureKey, encode) -> tuple[object, bool]:
        """The features of ``key``, from the cache or from ``encode()``, encoding each key once at a time.

        The first caller of a missing key runs ``encode()`` (and stores its result); callers
        that arrive while it runs wait and take the same result. If ``encode()`` raises, the
        error goes to its caller and each waiter tries again itself (so each request reports
        its own failure, and a cancelled encode does not fail the others).

        Returns:
            (features, True) when they came from the cache or another caller's encode,
            (features, False) when this call encoded them.
        """
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    self._entries.move_to_end(key)
                    self.hits += 1
                    return entry[0], True
                flight = self._in_flight.get(key)
                owner = flight is None
                if owner:
                    flight = self._in_flight[key] = InFlight()
                    self.misses += 1
                else:
                    self.shared += 1
            if not owner:
                flight.done.wait()
                if flight.features is not None:
                    return flight.features, True
                continue  # the encode failed: try it here
            try:
                features = encode()
                self.put(key, features)
                flight.features = features
            finally:
                with self._lock:
                    del self._in_flight[key]
                flight.done.set()
            return features, False

    def session_features(self, session, content_hash: str | None = None, before_decoding=None) -> bool:
        """Gives ``session`` its video features from the cache, or decodes, encodes and stores them.

        Args:
            session: a ``chat.ChatSession`` not yet prepared.
            content_hash: sha256 of the session's video file (default: hashed here).
            before_decoding: called on a miss only, before the decoder (e.g. the app's header limit
                checks: a hit's bytes passed them when they were encoded, so a hit skips them).
        Returns:
            True on a hit (the session reports its features as cached), False if it was encoded now.
        Raises:
            whatever ``before_decoding`` or ``ChatSession.prepare`` raise (``video.VideoDecodeError`` ...); nothing is stored then.
        """
        if getattr(session, "selects", False):  # question-aware clips: the candidates' embeddings go through self
            if before_decoding is not None:
                before_decoding()
            session.feature_cache = self
            if content_hash is not None:
                session.content_hash = content_hash
            return not session.prepare()
        if hasattr(session, "resolve_clips"):
            session.resolve_clips()  # --clips auto: the key holds the number chosen
        key = session_key(session, content_hash or file_sha256(session.video_path))

        def encode():
            if before_decoding is not None:
                before_decoding()
            session.prepare()
            return session.video_features

        features, cached = self.get_or_encode(key, encode)
        if cached:
            session.attach_features(features)
        return cached

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: FeatureKey) -> bool:
        return key in self._entries

    def stats(self) -> dict:
        """Counters for /health and logs."""
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.bytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "shared": self.shared, "evictions": self.evictions}
