"""The two decoders: decord (fast sparse access) and PyAV (the fallback), reading frames by index.

Each read function takes the sorted unique indices wanted and a
:class:`~.guard.Progress` heartbeat, and returns {index: (H, W, 3) uint8 RGB}.
"""

from __future__ import annotations

import bisect
import logging
import os
import sys
import threading
from contextlib import contextmanager
from typing import Any, Iterator

import numpy as np
import torch

from .guard import Progress
from .limits import VideoBytes

logger = logging.getLogger(__name__)

_DECORD_CHUNK = 16  # frames per decord get_batch call (watchdog heartbeat)


def load_decord():
    """Import decord lazily; None when it is not installed (e.g. macOS arm64)."""
    try:
        import decord  # noqa: PLC0415
    except Exception:  # ImportError, or a broken native library
        return None
    # decord's bundled FFmpeg logs every damaged packet to stderr; VideoDecodeError already
    # carries the cause, so keep it quiet unless this module is being debugged
    if not logger.isEnabledFor(logging.DEBUG):
        try:
            decord.logging.set_level(decord.logging.QUIET)
        except Exception:  # an old decord without the logging module
            pass
    return decord


_stderr_lock = threading.Lock()
_stderr_state = {"users": 0, "saved": -1}


@contextmanager
def decord_log_silenced(path: Any) -> Iterator[None]:
    """File descriptor 2 goes to /dev/null while decord works on in-memory bytes (``path`` a VideoBytes).

    Why: decord's C++ logger prints the input's *name* when it cannot open it, and for
    bytes that name is the whole video ("ERROR opening: <the mp4 bytes>"), which
    ``set_level(QUIET)`` does not stop (megabytes a minute on a shard of broken videos).
    Enter it in the thread that waits on the read (around ``run_guarded``), so stderr comes
    back even when a read is abandoned. Other threads' stderr is lost for that moment;
    a counter keeps overlapping users (threads) right. Off with debug logging of this module.
    """
    if not isinstance(path, VideoBytes) or logger.isEnabledFor(logging.DEBUG):
        yield
        return
    with _stderr_lock:
        if _stderr_state["users"] == 0:
            sys.stderr.flush()
            _stderr_state["saved"] = os.dup(2)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)
            os.close(devnull)
        _stderr_state["users"] += 1
    try:
        yield
    finally:
        with _stderr_lock:
            _stderr_state["users"] -= 1
            if _stderr_state["users"] == 0:
                os.dup2(_stderr_state["saved"], 2)
                os.close(_stderr_state["saved"])


def decord_available() -> bool:
    """Whether the decord backend can be used in this environment."""
    return load_decord() is not None


def to_numpy(batch: Any) -> np.ndarray:
    """decord returns its NDArray, or a torch tensor if a global bridge was set."""
    if hasattr(batch, "asnumpy"):
        return batch.asnumpy()
    if isinstance(batch, torch.Tensor):
        return batch.cpu().numpy()
    return np.asarray(batch)


def _decord_read(path: str, wanted: list[int], progress: Progress) -> dict[int, np.ndarray]:
    """Decode the sorted unique indices ``wanted`` with decord -> {index: (H, W, 3) uint8}."""
    decord = load_decord()
    if decord is None:
        raise RuntimeError("decord is not installed")
    reader = decord_reader(decord, path)
    progress.tick()
    count = len(reader)
    if wanted and wanted[-1] >= count:
        raise RuntimeError(f"frame {wanted[-1]} requested but decord sees only {count} frames")
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(wanted), _DECORD_CHUNK):
        chunk = wanted[start : start + _DECORD_CHUNK]
        frames = to_numpy(reader.get_batch(chunk))
        out.update(zip(chunk, frames))
        progress.tick()
    return out


def decord_reader(decord, path: str | VideoBytes):
    """A decord VideoReader on a file or on in-memory bytes."""
    return decord.VideoReader(path.open() if isinstance(path, VideoBytes) else path, ctx=decord.cpu(0))


def open_av(path: str | VideoBytes):
    import av  # noqa: PLC0415 - lazy: no work at import time

    return av.open(path.open() if isinstance(path, VideoBytes) else path, mode="r")


class PacketIndex:
    """Presentation-order timestamps and keyframe positions of a video stream (demux only)."""

    def __init__(self, container, stream, progress: Progress | None = None) -> None:
        entries = []
        for n, packet in enumerate(container.demux(stream)):
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None or packet.size == 0:
                continue
            entries.append((ts, bool(packet.is_keyframe)))
            if progress is not None and n % 256 == 0:
                progress.tick()
        entries.sort()
        self.pts = [ts for ts, _ in entries]
        self.keyframes = [i for i, (_, key) in enumerate(entries) if key] or [0]

    def __len__(self) -> int:
        return len(self.pts)

    def index_of(self, pts: int) -> int:
        """Frame index of the entry nearest to ``pts``."""
        i = bisect.bisect_left(self.pts, pts)
        if i == len(self.pts) or (i > 0 and pts - self.pts[i - 1] < self.pts[i] - pts):
            i -= 1
        return i

    def keyframe_before(self, index: int) -> int:
        """Index of the last keyframe at or before ``index``."""
        return self.keyframes[max(0, bisect.bisect_right(self.keyframes, index) - 1)]


def _pyav_read(
    path: str, wanted: list[int], progress: Progress, claimed: int | None, rotation: int = 0, seek: bool = True
) -> dict[int, np.ndarray]:
    """Decode ``wanted`` (sorted unique) with PyAV, turned upright by ``rotation``.

    With ``seek``: seek to the keyframe before each far-away frame and decode forward,
    never decoding the whole file for a few frames. When a seek lands past the frame
    it aimed at (MPEG-TS seeks by byte position and timestamps, not by frame), decode
    sequentially from the first packet instead; ``seek=False`` goes there directly.
    """
    with open_av(path) as container:
        if not container.streams.video:
            raise RuntimeError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        index = PacketIndex(container, stream, progress)
        progress.tick()
        available = len(index)
        if wanted and wanted[-1] >= available:
            raise RuntimeError(
                f"fewer decodable frames than the header claims: frame {wanted[-1]} requested, "
                f"header claims {claimed if claimed else 'unknown'}, only {available} frames present"
            )
        out = None
        if seek:
            try:
                out = _pyav_decode_wanted(container, stream, index, wanted, progress)
            except _SeekMissed as exc:
                logger.debug("pyav seeking missed on %s (%s); decoding sequentially", path, exc)
    if out is None:
        with open_av(path) as container:  # a fresh demuxer: no seek, from the first packet
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            out = _pyav_decode_sequential(container, stream, index, wanted, progress)
    return {i: upright(frame, rotation) for i, frame in out.items()}


class _SeekMissed(RuntimeError):
    """A seek landed after the frame it aimed at, or decoded nothing."""


def _pyav_decode_wanted(container, stream, index: PacketIndex, wanted: list[int], progress: Progress):
    out: dict[int, np.ndarray] = {}
    decoder: Iterator | None = None
    pos, seeks, decoded = -1, 0, [0]  # pos: index of the last decoded frame
    for target in wanted:
        key = index.keyframe_before(target)
        if decoder is None or target <= pos or key > pos:
            container.seek(index.pts[key], stream=stream, backward=True, any_frame=False)
            decoder, pos, seeks = container.decode(stream), -1, seeks + 1
        pos = _decode_until(decoder, index, target, out, progress, decoded)
        if target not in out:
            raise _SeekMissed(f"frame {target} not decoded after seeking to frame {key} (stopped at frame {pos})")
    logger.debug("pyav decoded %d frames with %d seeks for %d wanted", decoded[0], seeks, len(wanted))
    return out


def _pyav_decode_sequential(container, stream, index: PacketIndex, wanted: list[int], progress: Progress):
    out: dict[int, np.ndarray] = {}
    decoder, pos, decoded = container.decode(stream), -1, [0]
    for target in wanted:
        if target > pos:
            pos = _decode_until(decoder, index, target, out, progress, decoded)
        if target not in out:
            raise RuntimeError(
                f"fewer decodable frames than the header claims: frame {target} could not be decoded "
                f"(decoding stopped at frame {pos}, {len(index)} frames present)"
            )
    logger.debug("pyav decoded %d frames sequentially for %d wanted", decoded[0], len(wanted))
    return out


def _decode_until(
    decoder: Iterator, index: PacketIndex, target: int, out: dict, progress: Progress, decoded: list[int]
) -> int:
    """Advance ``decoder`` until frame ``target`` is stored in ``out``; return the last index seen."""
    pos = -1
    for frame in decoder:
        decoded[0] += 1
        ts = frame.pts if frame.pts is not None else frame.dts
        pos = index.index_of(ts) if ts is not None else pos + 1
        progress.tick()
        if pos == target:
            out[target] = frame.to_ndarray(format="rgb24")
            return pos
        if pos > target:
            return pos
    return pos


# --------------------------------------------------------------------------- #
# Display rotation
# --------------------------------------------------------------------------- #
_ROTATION_PACKETS = 256  # packets to demux while looking for the first frame (its display matrix)


def read_rotation(container, stream, progress: Progress | None = None) -> int:
    """Counter-clockwise display rotation of ``stream`` in degrees (0, 90, 180 or 270).

    Why the first frame: FFmpeg attaches the stream's display matrix (phones write
    one for every portrait video) to each decoded frame, and PyAV exposes it as
    ``VideoFrame.rotation``; it has no stream-level accessor. A bare ``rotate`` tag
    without a matrix is ignored, as FFmpeg itself ignores it.
    """
    for n, packet in enumerate(container.demux(stream)):
        if progress is not None:
            progress.tick()
        for frame in packet.decode():
            degrees = float(getattr(frame, "rotation", 0) or 0)
            quarter = round(degrees / 90.0)
            if abs(degrees - 90.0 * quarter) > 1.0:
                logger.warning("display rotation %.1f degrees is not a multiple of 90; using %d", degrees, quarter * 90)
            return (quarter * 90) % 360
        if n >= _ROTATION_PACKETS:
            break
    return 0


def upright(frame: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a stored (H, W, 3) frame by ``rotation`` degrees counter-clockwise, as players display it."""
    quarters = (rotation // 90) % 4
    return frame if quarters == 0 else np.ascontiguousarray(np.rot90(frame, quarters))
