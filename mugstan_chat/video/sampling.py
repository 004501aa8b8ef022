"""Sampling of frame indices: sparse segment sampling, multi-clip splits and time windows."""

from __future__ import annotations

import math

import torch

from .limits import VideoInfo


def sample_indices(
    num_frames: int,
    num_samples: int,
    mode: str = "eval",
    generator: torch.Generator | None = None,
    start_frame: int | None = None,
    end_frame: int | None = None,
) -> list[int]:
    """Sparse sampling: split [start_frame, end_frame) into ``num_samples`` equal
    segments and take one frame from each.

    Args:
        num_frames: frames in the video.
        num_samples: T, the number of segments / sampled frames.
        mode: "eval" (or "chat"): the middle of each segment; "train": a uniformly
            random frame inside each segment drawn from ``generator`` (torch.Generator;
            seeded => reproducible; None => torch's global RNG).
        start_frame, end_frame: optional window (end exclusive), default the whole video.

    Returns:
        T sorted indices in [start_frame, end_frame); they repeat when the window
        has fewer than T frames.
    """
    start = 0 if start_frame is None else int(start_frame)
    end = num_frames if end_frame is None else min(int(end_frame), num_frames)
    if num_samples <= 0:
        raise ValueError("num_samples must be positive")
    if not 0 <= start < end:
        raise ValueError(f"empty frame window [{start}, {end}) for a video of {num_frames} frames")
    length = end - start
    edges = torch.arange(num_samples + 1, dtype=torch.float64) * (length / num_samples)
    if mode in ("eval", "chat"):
        offsets = torch.floor((edges[:-1] + edges[1:]) / 2)
    elif mode == "train":
        lo = torch.floor(edges[:-1])
        span = torch.clamp(torch.floor(edges[1:]) - lo, min=1)
        offsets = lo + torch.floor(torch.rand(num_samples, generator=generator, dtype=torch.float64) * span)
    else:
        raise ValueError(f"mode must be 'eval', 'chat' or 'train', got {mode!r}")
    offsets = torch.clamp(offsets, 0, length - 1)
    return [start + int(o) for o in offsets]


def clip_indices(
    num_frames: int,
    frames_per_clip: int,
    num_clips: int | None = None,
    *,
    mode: str = "eval",
    generator: torch.Generator | None = None,
    max_seconds_per_clip: float | None = None,
    fps: float | None = None,
    start_frame: int | None = None,
    end_frame: int | None = None,
) -> list[list[int]]:
    """Multi-clip sampling: split the video (or window) into C consecutive equal parts
    and sample ``frames_per_clip`` frames in each with :func:`sample_indices`.

    Args:
        num_clips: C; or derive it with ``max_seconds_per_clip`` and ``fps``:
            C = ceil(window duration / max_seconds_per_clip).

    Returns:
        C lists of T indices, in time order, together covering the window.
    """
    start = 0 if start_frame is None else int(start_frame)
    end = num_frames if end_frame is None else min(int(end_frame), num_frames)
    if max_seconds_per_clip is not None:
        if not fps or fps <= 0 or max_seconds_per_clip <= 0:
            raise ValueError("max_seconds_per_clip needs a positive fps and a positive value")
        num_clips = max(1, math.ceil((end - start) / fps / max_seconds_per_clip - 1e-9))
    num_clips = 1 if num_clips is None else int(num_clips)
    if num_clips <= 0:
        raise ValueError("num_clips must be positive")
    bounds = [start + (end - start) * c / num_clips for c in range(num_clips + 1)]
    clips = []
    for c in range(num_clips):
        lo = int(math.floor(bounds[c]))
        hi = max(lo + 1, int(math.floor(bounds[c + 1])))
        clips.append(sample_indices(num_frames, frames_per_clip, mode, generator, lo, hi))
    return clips


def _frame_at(seconds: float, info: VideoInfo, rounding) -> int:
    """The frame index at ``seconds``, clamped to [0, num_frames]; a huge time (1e308 s x fps) is the end."""
    if not math.isfinite(seconds):
        raise ValueError(f"time window bounds must be finite numbers of seconds, got {seconds}")
    position = max(0.0, seconds) * info.fps
    return info.num_frames if not math.isfinite(position) or position >= info.num_frames else int(rounding(position))


def seconds_to_frames(info: VideoInfo, start: float | None, end: float | None) -> tuple[int, int]:
    """Convert a [start, end) window in seconds to a frame window via fps (clamped to the video)."""
    first = 0 if start is None else _frame_at(start, info, math.floor)
    last = info.num_frames if end is None else _frame_at(end, info, math.ceil)
    if first >= last:
        raise ValueError(f"empty time window start={start} end={end} for a {info.duration:.2f} s video")
    return first, last


def clip_spans(indices: list[list[int]], times) -> list[tuple[float, float]]:
    """(start, end) seconds of each clip: the timestamps of its first and last sampled frame.

    Why the sampled frames and not the clip's nominal segment: the language model sees those
    frames, so a time it reads is a time it saw (docs/design.md section 4c). ``times`` is the
    video's :class:`.timestamps.FrameTimes` (presentation timestamps: right for variable-rate
    and edited videos too), or a frame rate for a source whose timestamps are not at hand
    (``index / fps``, a constant-rate video's times).
    """
    if isinstance(times, (int, float)):
        if not times or times <= 0:
            raise ValueError(f"clip times need a positive frame rate, got {times}")
        fps = float(times)
        return [(min(clip) / fps, max(clip) / fps) for clip in indices]
    return [(times[min(clip)], times[max(clip)]) for clip in indices]
