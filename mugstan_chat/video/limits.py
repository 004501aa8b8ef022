"""Limits and errors of video input: what is accepted, and the one exception every failure raises."""

from __future__ import annotations

import errno
import io
import os
import stat
from dataclasses import dataclass

from ..options import SUPPORTED_EXTENSIONS  # noqa: F401 (re-exported: the video package's list of containers)

BACKENDS = ("auto", "decord", "pyav")


class VideoDecodeError(Exception):
    """Any failure to read a video; the message names the file and the cause."""


@dataclass(frozen=True)
class VideoBytes:
    """An encoded video held in memory (e.g. ``KEY.mp4`` of a tar shard), read like a file.

    Why: training shards hold millions of clips as bytes; writing each to disk just
    to decode it would double the I/O. Every reader accepts a ``VideoBytes``
    wherever it takes a path, so sampling and rotation follow the same code.
    ``name`` stands for the path in error messages (e.g. ``shard.tar:KEY``).
    """

    data: bytes
    name: str = "<bytes>"

    def __str__(self) -> str:
        return self.name

    def open(self) -> io.BytesIO:
        """A fresh file object over the bytes (each decoder pass needs its own)."""
        return io.BytesIO(self.data)


def video_source(path: "str | os.PathLike | VideoBytes") -> "str | VideoBytes":
    """A path as a string, or the in-memory video unchanged."""
    return path if isinstance(path, VideoBytes) else os.fspath(path)


@dataclass(frozen=True)
class VideoLimits:
    """Guards against huge or hanging inputs.

    Args:
        max_width, max_height: largest accepted frame size in pixels (default 8K UHD).
        max_seconds: longest accepted duration (default 3 hours).
        timeout_s: a read that makes no progress for this long is abandoned.
    """

    max_width: int = 7680
    max_height: int = 4320
    max_seconds: float = 3 * 3600.0
    timeout_s: float = 30.0


@dataclass(frozen=True)
class VideoInfo:
    """Video metadata read from the container header (plus the first frame's display matrix).

    ``width`` x ``height`` is the displayed size: the stored (coded) size turned
    by ``rotation``, which is what every reader returns frames in.
    """

    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    rotation: int = 0  # counter-clockwise degrees (0, 90, 180, 270) applied to the stored frames
    container: str = ""  # FFmpeg's demuxer name, e.g. "mov,mp4,m4a,3gp,3g2,mj2" or "mpegts"

    @property
    def coded_size(self) -> tuple[int, int]:
        """(width, height) as stored in the stream, before the rotation."""
        return (self.height, self.width) if self.rotation % 180 == 90 else (self.width, self.height)


def check_file(path: "str | VideoBytes") -> None:
    """One message per way a path can fail before any decoder sees it.

    Why stat and open here: ``os.path.exists`` is False for a symlink loop and for a
    path it may not look up, and a decoder would then blame the file's contents.
    """
    if isinstance(path, VideoBytes):
        if not path.data:
            raise VideoDecodeError(f"{path}: empty video (0 bytes)")
        return
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise VideoDecodeError(f"{path}: broken symlink (its target {os.readlink(path)} does not exist)") from None
        raise VideoDecodeError(f"{path}: missing file (no such file)") from None
    except PermissionError:
        raise VideoDecodeError(f"{path}: permission denied (a folder on the path cannot be searched)") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise VideoDecodeError(f"{path}: symlink loop (the links never reach a file)") from None
        raise VideoDecodeError(f"{path}: cannot access the file ({exc.strerror or exc})") from None
    if not stat.S_ISREG(info.st_mode):
        raise VideoDecodeError(f"{path}: not a regular file")
    if info.st_size == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)")
    try:
        with open(path, "rb"):
            pass
    except PermissionError:
        raise VideoDecodeError(f"{path}: permission denied (the file is not readable)") from None
    except OSError as exc:
        raise VideoDecodeError(f"{path}: cannot open the file ({exc.strerror or exc})") from None



def describe_error(exc: BaseException, limit: int = 300) -> str:
    """One-line cause for error messages (decord messages are long and multi-line)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_limits(path: str, info: VideoInfo, limits: VideoLimits) -> None:
    """The size limit bounds the decoded (stored) frame, so a portrait video is checked before rotation."""
    width, height = info.coded_size
    if width <= 0 or height <= 0 or info.num_frames <= 0:
        raise VideoDecodeError(f"{path}: not a decodable video (header reports {info})")
    if width > limits.max_width or height > limits.max_height:
        raise VideoDecodeError(
            f"{path}: resolution {width}x{height} exceeds the limit "
            f"{limits.max_width}x{limits.max_height}"
        )
    if info.duration > limits.max_seconds:
        raise VideoDecodeError(
            f"{path}: duration {info.duration:.1f} s exceeds the limit of {limits.max_seconds:g} s"
        )
