"""Reading frames: by index (decord, falling back to PyAV) or whole videos in batches, under the guard."""

from __future__ import annotations

import logging
import os
from typing import Iterator, Sequence

import numpy as np
import torch

from . import backends
from .backends import load_decord, open_av, to_numpy, decord_reader
from .guard import Progress, run_guarded
from .limits import BACKENDS, VideoBytes, VideoDecodeError, VideoInfo, VideoLimits, describe_error, video_source
from .probing import probe_video

logger = logging.getLogger(__name__)

#: Demuxers whose seeking is not frame accurate: decord returns wrong frames after a
#: seek (silently) and PyAV lands past its target, so these are decoded sequentially.
SEQUENTIAL_CONTAINERS = ("mpegts",)


def _decord_unfit(info: VideoInfo) -> str | None:
    """Why decord must not read this video (measured with decord 0.6), or None."""
    if info.container in SEQUENTIAL_CONTAINERS:
        return f"{info.container} container: decord's seeking returns wrong frames"
    if info.rotation % 180 == 90 and info.width != info.height:
        return (f"rotated by {info.rotation} degrees: decord fails on turned non-square frames "
                "(it copies them into a buffer of the stored size)")
    return None


# backends are looked up on the module at call time, so tests can replace one
def _read_with_backend(backend: str, path: str, wanted: list[int], limits: VideoLimits, info: VideoInfo):
    if backend == "decord":
        fn = lambda p: backends._decord_read(path, wanted, p)  # noqa: E731 - decord turns frames itself
    else:
        seek = info.container not in SEQUENTIAL_CONTAINERS
        fn = lambda p: backends._pyav_read(path, wanted, p, info.num_frames, info.rotation, seek)  # noqa: E731
    with backends.decord_log_silenced(path if backend == "decord" else None):
        return run_guarded(fn, limits.timeout_s, backend)


def read_frames(
    path: str | os.PathLike | VideoBytes,
    indices: Sequence[int],
    *,
    backend: str = "auto",
    limits: VideoLimits | None = None,
    info: VideoInfo | None = None,
    as_tensor: bool = False,
) -> np.ndarray | torch.Tensor:
    """Decode the frames at ``indices`` in one call.

    Args:
        path: video file, or a :class:`VideoBytes`.
        indices: frame indices (any order, repeats allowed) in [0, num_frames).
        backend: "auto" (decord, falling back to PyAV; PyAV alone for rotated videos and
            MPEG-TS, see :func:`_decord_unfit`), "decord" or "pyav".
        limits: size/duration limits and the no-progress timeout.
        info: metadata from :func:`probe_video` (probed when omitted).
        as_tensor: return a torch tensor instead of a numpy array.

    Returns:
        uint8 RGB array/tensor (N, H, W, 3), N = len(indices), in the given order,
        upright as players display them (H x W is ``info``'s displayed size).

    Raises:
        VideoDecodeError: naming the file and the cause (both causes when both backends fail).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path, limits = video_source(path), limits or VideoLimits()
    info = info or probe_video(path, limits)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("indices must not be empty")
    if min(indices) < 0 or max(indices) >= info.num_frames:
        raise ValueError(f"indices must lie in [0, {info.num_frames}) for {path}")
    wanted = sorted(set(indices))
    decoded = _decode_with_fallback(path, wanted, backend, limits, info)
    frames = np.stack([decoded[i] for i in indices])
    return torch.from_numpy(frames) if as_tensor else frames


def _decode_with_fallback(path: str, wanted: list[int], backend: str, limits: VideoLimits, info: VideoInfo):
    # a rotated video goes to PyAV in "auto": one code path (ours) turns its frames upright
    auto_order = ["pyav"] if info.rotation else ["decord", "pyav"]
    order = auto_order if backend == "auto" else [backend]
    causes = []
    for name in order:
        if name == "decord" and not backends.decord_available():
            causes.append("decord: not installed")
            logger.debug("decord not installed; using PyAV for %s", path)
            continue
        unfit = _decord_unfit(info) if name == "decord" else None
        if unfit:
            causes.append(f"decord: {unfit}")
            logger.debug("decord skipped for %s: %s", path, unfit)
            continue
        try:
            decoded = _read_with_backend(name, path, wanted, limits, info)
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            causes.append(f"{name}: {describe_error(exc)}")
            logger.debug("backend %s failed on %s: %s", name, path, exc)
            continue
        logger.debug("read %d frames of %s with %s", len(wanted), path, name)
        return decoded
    raise VideoDecodeError(f"{path}: cannot decode frames ({'; '.join(causes)})")


def iter_frame_batches(
    path: str | os.PathLike | VideoBytes,
    batch_size: int = 32,
    *,
    backend: str = "pyav",
    limits: VideoLimits | None = None,
) -> Iterator[np.ndarray]:
    """Decode a whole video sequentially in batches (benchmarks, tools).

    Why a separate path: decoding everything through :func:`read_frames` would hold
    every frame in memory. Each batch is produced under the watchdog.

    Yields:
        uint8 arrays (B, H, W, 3), B <= batch_size; the last batch may be shorter.
    """
    path, limits = video_source(path), limits or VideoLimits()
    info = probe_video(path, limits)
    if backend not in ("decord", "pyav"):
        raise ValueError("backend must be 'decord' or 'pyav' for sequential decoding")
    unfit = _decord_unfit(info) if backend == "decord" else None
    if unfit:
        raise VideoDecodeError(f"{path}: cannot decode with decord ({unfit})")
    try:
        if backend == "decord":
            yield from _iter_decord_batches(path, batch_size, limits, info.num_frames)
        else:
            yield from _iter_pyav_batches(path, batch_size, limits, info.rotation)
    except VideoDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise VideoDecodeError(f"{path}: sequential decode with {backend} failed ({describe_error(exc)})") from exc


def _iter_pyav_batches(path: str, batch_size: int, limits: VideoLimits, rotation: int) -> Iterator[np.ndarray]:
    with open_av(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = container.decode(stream)

        def next_batch(progress: Progress) -> list[np.ndarray]:
            batch = []
            for frame in frames:
                batch.append(backends.upright(frame.to_ndarray(format="rgb24"), rotation))
                progress.tick()
                if len(batch) == batch_size:
                    break
            return batch

        while batch := run_guarded(next_batch, limits.timeout_s, "pyav-seq"):
            yield np.stack(batch)


def _iter_decord_batches(path: str, batch_size: int, limits: VideoLimits, count: int) -> Iterator[np.ndarray]:
    decord = load_decord()
    if decord is None:
        raise VideoDecodeError(f"{path}: decord is not installed")
    with backends.decord_log_silenced(path):
        reader = run_guarded(lambda p: decord_reader(decord, path), limits.timeout_s, "decord-open")
    total = min(count, len(reader))

    def next_batch(progress: Progress, size: int) -> np.ndarray:
        # next() decodes forward; get_batch would re-seek to a keyframe per batch.
        frames = []
        for _ in range(size):
            frames.append(to_numpy(reader.next()))
            progress.tick()
        return np.stack(frames)

    for start in range(0, total, batch_size):
        size = min(batch_size, total - start)
        yield run_guarded(lambda p: next_batch(p, size), limits.timeout_s, "decord-seq")
