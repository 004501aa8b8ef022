"""The high-level entry point: a video file to (C, T, 3, size, size) clips ready for the video tower."""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Sequence

import torch

from .limits import VideoBytes, VideoInfo, VideoLimits
from .preprocessing import CLIP_MEAN, CLIP_STD, PreprocessSettings, preprocess_frames, processor_settings
from .probing import probe_video
from .reading import read_frames
from .sampling import clip_indices, seconds_to_frames


class VideoClips(NamedTuple):
    """Result of :func:`load_video_clips`.

    clips: float tensor (C, T, 3, size, size); info: :class:`VideoInfo`;
    indices: C lists of T frame indices (sorted, into the whole video).
    """

    clips: torch.Tensor
    info: VideoInfo
    indices: list[list[int]]



def plan_clips(path: str | os.PathLike, frames_per_clip: int, num_clips: int, start: float | None = None,
               end: float | None = None, limits: VideoLimits | None = None,
               info: VideoInfo | None = None) -> tuple[VideoInfo, list[list[int]]]:
    """(info, C lists of T frame indices) the evaluation-mode sampling would read, without decoding a frame.

    Why: clip times (and the number of clips ``--clips auto`` can fit) must be known before
    anything is decoded; only the container header is read (docs/design.md section 4c).
    """
    info = info or probe_video(path, limits or VideoLimits())
    first, last = seconds_to_frames(info, start, end)
    return info, clip_indices(info.num_frames, frames_per_clip, num_clips, mode="eval",
                              start_frame=first, end_frame=last)


def load_video_clips(
    path: str | os.PathLike | VideoBytes,
    frames_per_clip: int = 8,
    num_clips: int = 1,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    mode: str = "eval",
    generator: torch.Generator | None = None,
    start: float | None = None,
    end: float | None = None,
    limits: VideoLimits | None = None,
    *,
    max_seconds_per_clip: float | None = None,
    image_processor: Any = None,
    backend: str = "auto",
    indices: list[list[int]] | None = None,
    info: VideoInfo | None = None,
) -> VideoClips:
    """Open a video, sample C clips of T frames, decode and preprocess them.

    Args:
        path: video file (mp4/mkv/webm/avi/mov/gif), or a :class:`VideoBytes` (the same video in memory).
        frames_per_clip: T.
        num_clips: C (ignored when ``max_seconds_per_clip`` is given:
            C = ceil(window duration / max_seconds_per_clip)).
        size, mean, std: preprocessing (overridden by ``image_processor`` when given).
        mode: "eval"/"chat" (segment middles, centre crop) or "train" (random frame
            per segment, one random resized crop per clip), randomness from ``generator``.
        start, end: optional time window in seconds.
        limits: :class:`VideoLimits`.
        image_processor: a transformers CLIPImageProcessor whose settings to honour.
        backend: "auto", "decord" or "pyav".
        indices: read exactly these clips (C lists of T frame indices, e.g. chosen by
            :func:`plan_clips` or by clip selection) instead of sampling; ``num_clips``,
            ``start``, ``end`` and ``max_seconds_per_clip`` are then unused.
        info: the video's :func:`probe_video` result, when the caller has it already.

    Returns:
        VideoClips(clips=float tensor (C, T, 3, size, size), info, indices=C lists of T ints).

    Raises:
        VideoDecodeError: for every failure to read the video.
    """
    limits = limits or VideoLimits()
    info = info or probe_video(path, limits)
    if indices is None:
        first, last = seconds_to_frames(info, start, end)
        indices = clip_indices(
            info.num_frames, frames_per_clip, num_clips, mode=mode, generator=generator,
            max_seconds_per_clip=max_seconds_per_clip, fps=info.fps, start_frame=first, end_frame=last,
        )
    elif any(len(clip) != frames_per_clip for clip in indices):
        raise ValueError(f"every clip must have {frames_per_clip} frame indices")
    flat = [i for clip in indices for i in clip]
    frames = read_frames(path, flat, backend=backend, limits=limits, info=info, as_tensor=True)
    settings = processor_settings(image_processor) if image_processor is not None else PreprocessSettings(
        size=size, resize_to=size, mean=tuple(mean), std=tuple(std)
    )
    kwargs = settings.as_kwargs()
    if mode == "train":
        per_clip = frames.view(len(indices), frames_per_clip, *frames.shape[1:])
        clips = torch.stack([preprocess_frames(c, train=True, generator=generator, **kwargs) for c in per_clip])
    else:
        side = kwargs["size"]
        clips = preprocess_frames(frames, **kwargs).view(len(indices), frames_per_clip, 3, side, side)
    return VideoClips(clips, info, indices)
