"""Frame times from the container's presentation timestamps (PTS), not from index / fps.

Why: a clip's span is shown to the language model ("Clip 2 (00:30-00:58)") and an answer's
times seek the player, so they must be the times a player shows. ``index / average fps`` is
that time only for a constant-rate video; a variable-frame-rate phone video or an edited
video (a slow part, a cut) drifts from it by seconds. The readers decode frame ``i`` as the
``i``-th frame in presentation order (:class:`.backends.PacketIndex`), so frame ``i``'s time is
the ``i``-th smallest PTS, in seconds from the stream's first frame. Reading the timestamps
demuxes the file (no decoding), under the same no-progress guard as every read.
"""

from __future__ import annotations

import bisect
import os
from fractions import Fraction
from typing import Sequence

from .backends import PacketIndex, open_av
from .guard import Progress, run_guarded
from .limits import VideoBytes, VideoDecodeError, VideoLimits, describe_error, video_source


class FrameTimes:
    """Seconds of every frame in presentation order (``times[i]`` is frame ``i``'s time)."""

    def __init__(self, seconds: Sequence[float]):
        if not seconds:
            raise ValueError("a video without frames has no frame times")
        self.seconds = [float(s) for s in seconds]

    def __len__(self) -> int:
        return len(self.seconds)

    def __getitem__(self, index: int) -> float:
        """Frame ``index``'s time; an index past the last frame (a header that overcounts) gets the last time."""
        return self.seconds[min(index, len(self.seconds) - 1)]

    def frame_at(self, seconds: float) -> int:
        """The index of the frame shown at ``seconds`` (the last frame whose time is not after it)."""
        return max(0, bisect.bisect_right(self.seconds, seconds + 1e-9) - 1)

    @classmethod
    def constant_rate(cls, num_frames: int, fps: float) -> FrameTimes:
        """``i / fps``: the times of a constant-rate video (for a source whose PTS cannot be read)."""
        if not fps or fps <= 0:
            raise ValueError(f"frame times need a positive frame rate, got {fps}")
        return cls([i / fps for i in range(max(1, num_frames))])


def read_frame_times(path: str | os.PathLike | VideoBytes, limits: VideoLimits | None = None) -> FrameTimes:
    """Every frame's presentation time in seconds, from the first frame (demux only, no decoding).

    Raises VideoDecodeError naming the file when it cannot be demuxed or has no timestamps.
    """
    source = video_source(path)
    limits = limits or VideoLimits()

    def demux(progress: Progress) -> FrameTimes:
        with open_av(source) as container:
            if not container.streams.video:
                raise VideoDecodeError(f"{source}: no video stream")
            stream = container.streams.video[0]
            index = PacketIndex(container, stream, progress)
            if not len(index) or stream.time_base is None:
                raise VideoDecodeError(f"{source}: no frame timestamps")
            base, first = Fraction(stream.time_base), index.pts[0]
            return FrameTimes([float((pts - first) * base) for pts in index.pts])  # exact, then rounded once

    try:
        return run_guarded(demux, limits.timeout_s, "pyav")
    except VideoDecodeError:
        raise
    except Exception as error:  # noqa: BLE001 - any demuxer failure is the file's, reported in one line
        raise VideoDecodeError(f"{source}: cannot read frame timestamps ({describe_error(error)})") from error
