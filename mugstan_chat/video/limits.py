"""Limits and errors of video input: what is accepted, and the one exception every failure raises."""

from __future__ import annotations

import os
from dataclasses import dataclass

#: Container extensions the project accepts for upload/CLI (both backends are
#: FFmpeg based, so other containers FFmpeg understands usually work too).
SUPPORTED_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".gif")

BACKENDS = ("auto", "decord", "pyav")


class VideoDecodeError(Exception):
    """Any failure to read a video; the message names the file and the cause."""


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
    """Video metadata read from the container header (no frame decoding)."""

    num_frames: int
    fps: float
    duration: float
    width: int
    height: int


def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(f"{path}: missing file (no such file)")
    if not os.path.isfile(path):
        raise VideoDecodeError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)")



def _describe(exc: BaseException, limit: int = 300) -> str:
    """One-line cause for error messages (decord messages are long and multi-line)."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _check_limits(path: str, info: VideoInfo, limits: VideoLimits) -> None:
    if info.width <= 0 or info.height <= 0 or info.num_frames <= 0:
        raise VideoDecodeError(f"{path}: not a decodable video (header reports {info})")
    if info.width > limits.max_width or info.height > limits.max_height:
        raise VideoDecodeError(
            f"{path}: resolution {info.width}x{info.height} exceeds the limit "
            f"{limits.max_width}x{limits.max_height}"
        )
    if info.duration > limits.max_seconds:
        raise VideoDecodeError(
            f"{path}: duration {info.duration:.1f} s exceeds the limit of {limits.max_seconds:g} s"
        )
