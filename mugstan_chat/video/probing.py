"""Probing: video metadata from the container header, checked against the limits before decoding."""

from __future__ import annotations

import dataclasses
import os

from .backends import (load_decord, open_av, PacketIndex, to_numpy, decord_log_silenced, decord_reader,
                       read_rotation)
from .guard import Progress, run_guarded
from .limits import (VideoBytes, VideoDecodeError, VideoInfo, VideoLimits, check_file, check_limits, describe_error,
                     video_source)


def _stream_info(container, stream) -> VideoInfo:
    """VideoInfo from the header; frame count by demuxing when the header lacks it."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
    if duration <= 0 and container.duration:
        duration = container.duration / 1_000_000
    frames = int(stream.frames or 0)
    if frames <= 0:
        frames = len(PacketIndex(container, stream))
    if fps <= 0:
        fps = frames / duration if duration > 0 else 25.0
    if duration <= 0:
        duration = frames / fps
    ctx = stream.codec_context
    return VideoInfo(frames, fps, duration, int(ctx.width or 0), int(ctx.height or 0),
                     container=str(container.format.name or ""))


def _probe_pyav(path: str, progress: Progress, limits: VideoLimits) -> VideoInfo:
    """Header facts, checked against the limits, then the rotation (one decoded frame) and the displayed size."""
    with open_av(path) as container:
        progress.tick()
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream (streams: {[s.type for s in container.streams]})")
        info = _stream_info(container, container.streams.video[0])
    check_limits(path, info, limits)  # before decoding anything
    try:
        with open_av(path) as container:  # a fresh demuxer: counting frames above read to the end
            rotation = read_rotation(container, container.streams.video[0], progress)
    except Exception:  # noqa: BLE001 - an undecodable first frame is reported by the read, with its cause
        rotation = 0
    if rotation % 180 == 90:
        return dataclasses.replace(info, width=info.height, height=info.width, rotation=rotation)
    return dataclasses.replace(info, rotation=rotation)


def _probe_decord(path: str, progress: Progress) -> VideoInfo:
    decord = load_decord()
    if decord is None:
        raise RuntimeError("decord is not installed")
    reader = decord_reader(decord, path)
    progress.tick()
    frames, fps = len(reader), float(reader.get_avg_fps() or 0.0) or 25.0
    height, width = to_numpy(reader.get_batch([0])).shape[1:3]
    return VideoInfo(frames, fps, frames / fps, int(width), int(height))


def probe_video(path: str | os.PathLike | VideoBytes, limits: VideoLimits | None = None) -> VideoInfo:
    """Read metadata from the container header (PyAV; decord if PyAV cannot open it).

    Why header first: it is cheap and lets limits be enforced before any large
    frame is decoded. Only then is one frame decoded, for its display rotation;
    ``width`` x ``height`` of the result is the displayed size.

    Raises:
        VideoDecodeError: missing/empty/not-a-video file, no video stream, over limits.
    """
    path, limits = video_source(path), limits or VideoLimits()
    check_file(path)
    try:
        info = run_guarded(lambda p: _probe_pyav(path, p, limits), limits.timeout_s, "pyav-probe")
    except VideoDecodeError:
        raise
    except Exception as av_exc:  # noqa: BLE001
        try:
            with decord_log_silenced(path):
                info = run_guarded(lambda p: _probe_decord(path, p), limits.timeout_s, "decord-probe")
        except Exception as dec_exc:  # noqa: BLE001
            raise VideoDecodeError(
                f"{path}: not a video, or a truncated/corrupted container "
                f"(pyav: {describe_error(av_exc)}; decord: {describe_error(dec_exc)})"
            ) from av_exc
    check_limits(path, info, limits)
    return info
