"""Video input: open, sample, decode and preprocess video frames for Mug-STAN / LLaVA.

This is the only module of the project that opens video files (for reading and,
for synthetic data and benchmarks, for writing). It provides:

* metadata (:class:`VideoInfo`) and limits (:class:`VideoLimits`);
* frame access by index list (:func:`read_frames`) with decord as the fast
  backend and PyAV as the fallback, every read guarded by a no-progress
  watchdog so that a file decord spins on cannot hang the caller;
* sparse sampling (:func:`sample_indices`, :func:`clip_indices`);
* batched CLIP preprocessing (:func:`preprocess_frames`,
  :func:`processor_settings`);
* the high-level entry point :func:`load_video_clips`.

Every failure to read a video raises :class:`VideoDecodeError` naming the file
and the cause. Randomness (training sampling and crops) uses a
``torch.Generator``; pass a seeded one for reproducible results.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, Sequence

import numpy as np
import torch

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

#: Container extensions the project accepts for upload/CLI (both backends are
#: FFmpeg based, so other containers FFmpeg understands usually work too).
SUPPORTED_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".gif")

BACKENDS = ("auto", "decord", "pyav")

# Random-resized-crop parameters for training (area fraction, aspect ratio).
TRAIN_CROP_SCALE = (0.5, 1.0)
TRAIN_CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)

_DECORD_CHUNK = 16  # frames per decord get_batch call (watchdog heartbeat)


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


class VideoClips(NamedTuple):
    """Result of :func:`load_video_clips`.

    clips: float tensor (C, T, 3, size, size); info: :class:`VideoInfo`;
    indices: C lists of T frame indices (sorted, into the whole video).
    """

    clips: torch.Tensor
    info: VideoInfo
    indices: list[list[int]]


@dataclass(frozen=True)
class PreprocessSettings:
    """Image-processor settings honoured by :func:`preprocess_frames`.

    size: output crop side; resize_to: shortest side after resize (eval);
    center_crop: crop the centre (else squash to size x size);
    interpolation: "bicubic" | "bilinear" | "nearest"; rescale_factor: usually 1/255.
    """

    size: int = 224
    resize_to: int = 224
    mean: tuple[float, ...] = CLIP_MEAN
    std: tuple[float, ...] = CLIP_STD
    center_crop: bool = True
    interpolation: str = "bicubic"
    rescale_factor: float = 1.0 / 255.0

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :func:`preprocess_frames`."""
        return dict(
            size=self.size,
            mean=self.mean,
            std=self.std,
            resize_to=self.resize_to,
            center_crop=self.center_crop,
            interpolation=self.interpolation,
            rescale_factor=self.rescale_factor,
        )


# --------------------------------------------------------------------------- #
# Watchdog: run a read in an abandonable daemon thread.
# --------------------------------------------------------------------------- #
class _Progress:
    """Heartbeat the worker calls after each unit of work (frame/chunk)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def tick(self) -> None:
        self.last = time.monotonic()


class _ReadTimeout(Exception):
    """A backend made no progress for ``timeout_s``."""


def _run_guarded(fn: Callable[[_Progress], Any], timeout_s: float, what: str) -> Any:
    """Run ``fn(progress)`` in a daemon thread; abandon it after ``timeout_s`` without a tick.

    Why a thread: decord can spin forever inside C code (with the GIL
    released) on files whose header claims more frames than decode. A daemon
    thread can be abandoned while the caller keeps working; it is reaped at
    process exit. (It may keep one core busy until then.)
    """
    progress = _Progress()
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn(progress)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=target, name=f"video-read:{what}", daemon=True)
    thread.start()
    poll = max(0.01, min(0.25, timeout_s / 4))
    while not done.wait(poll):
        if time.monotonic() - progress.last > timeout_s:
            raise _ReadTimeout(f"{what}: no progress for {timeout_s:g} s (read abandoned)")
    if "error" in box:
        raise box["error"]
    return box["value"]


# --------------------------------------------------------------------------- #
# Backends
# --------------------------------------------------------------------------- #
def _load_decord():
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


def decord_available() -> bool:
    """Whether the decord backend can be used in this environment."""
    return _load_decord() is not None


def _to_numpy(batch: Any) -> np.ndarray:
    """decord returns its NDArray, or a torch tensor if a global bridge was set."""
    if hasattr(batch, "asnumpy"):
        return batch.asnumpy()
    if isinstance(batch, torch.Tensor):
        return batch.cpu().numpy()
    return np.asarray(batch)


def _decord_read(path: str, wanted: list[int], progress: _Progress) -> dict[int, np.ndarray]:
    """Decode the sorted unique indices ``wanted`` with decord -> {index: (H, W, 3) uint8}."""
    decord = _load_decord()
    if decord is None:
        raise RuntimeError("decord is not installed")
    reader = decord.VideoReader(path, ctx=decord.cpu(0))
    progress.tick()
    count = len(reader)
    if wanted and wanted[-1] >= count:
        raise RuntimeError(f"frame {wanted[-1]} requested but decord sees only {count} frames")
    out: dict[int, np.ndarray] = {}
    for start in range(0, len(wanted), _DECORD_CHUNK):
        chunk = wanted[start : start + _DECORD_CHUNK]
        frames = _to_numpy(reader.get_batch(chunk))
        out.update(zip(chunk, frames))
        progress.tick()
    return out


def _open_av(path: str):
    import av  # noqa: PLC0415 - lazy: no work at import time

    return av.open(path, mode="r")


class _PacketIndex:
    """Presentation-order timestamps and keyframe positions of a video stream (demux only)."""

    def __init__(self, container, stream, progress: _Progress | None = None) -> None:
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


def _pyav_read(path: str, wanted: list[int], progress: _Progress, claimed: int | None) -> dict[int, np.ndarray]:
    """Decode ``wanted`` (sorted unique) with PyAV: seek to the keyframe before each
    far-away frame and decode forward; never decodes the whole file for a few frames."""
    with _open_av(path) as container:
        if not container.streams.video:
            raise RuntimeError("no video stream")
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        index = _PacketIndex(container, stream, progress)
        progress.tick()
        available = len(index)
        if wanted and wanted[-1] >= available:
            raise RuntimeError(
                f"fewer decodable frames than the header claims: frame {wanted[-1]} requested, "
                f"header claims {claimed if claimed else 'unknown'}, only {available} frames present"
            )
        return _pyav_decode_wanted(container, stream, index, wanted, progress)


def _pyav_decode_wanted(container, stream, index: _PacketIndex, wanted: list[int], progress: _Progress):
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
            raise RuntimeError(
                f"fewer decodable frames than the header claims: frame {target} could not be decoded "
                f"(decoding stopped at frame {pos}, {len(index)} frames present)"
            )
    logger.debug("pyav decoded %d frames with %d seeks for %d wanted", decoded[0], seeks, len(wanted))
    return out


def _decode_until(
    decoder: Iterator, index: _PacketIndex, target: int, out: dict, progress: _Progress, decoded: list[int]
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
# Metadata and reading
# --------------------------------------------------------------------------- #
def _check_file(path: str) -> None:
    if not os.path.exists(path):
        raise VideoDecodeError(f"{path}: missing file (no such file)")
    if not os.path.isfile(path):
        raise VideoDecodeError(f"{path}: not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoDecodeError(f"{path}: empty file (0 bytes)")


def _stream_info(container, stream) -> VideoInfo:
    """VideoInfo from the header; frame count by demuxing when the header lacks it."""
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else 0.0
    duration = float(stream.duration * stream.time_base) if stream.duration and stream.time_base else 0.0
    if duration <= 0 and container.duration:
        duration = container.duration / 1_000_000
    frames = int(stream.frames or 0)
    if frames <= 0:
        frames = len(_PacketIndex(container, stream))
    if fps <= 0:
        fps = frames / duration if duration > 0 else 25.0
    if duration <= 0:
        duration = frames / fps
    ctx = stream.codec_context
    return VideoInfo(frames, fps, duration, int(ctx.width or 0), int(ctx.height or 0))


def _probe_pyav(path: str, progress: _Progress) -> VideoInfo:
    with _open_av(path) as container:
        progress.tick()
        if not container.streams.video:
            raise VideoDecodeError(f"{path}: no video stream (streams: {[s.type for s in container.streams]})")
        return _stream_info(container, container.streams.video[0])


def _probe_decord(path: str, progress: _Progress) -> VideoInfo:
    decord = _load_decord()
    if decord is None:
        raise RuntimeError("decord is not installed")
    reader = decord.VideoReader(path, ctx=decord.cpu(0))
    progress.tick()
    frames, fps = len(reader), float(reader.get_avg_fps() or 0.0) or 25.0
    height, width = _to_numpy(reader.get_batch([0])).shape[1:3]
    return VideoInfo(frames, fps, frames / fps, int(width), int(height))


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


def probe_video(path: str | os.PathLike, limits: VideoLimits | None = None) -> VideoInfo:
    """Read metadata from the container header (PyAV; decord if PyAV cannot open it).

    Why header first: it is cheap (no decoding) and lets limits be enforced
    before any large frame is decoded.

    Raises:
        VideoDecodeError: missing/empty/not-a-video file, no video stream, over limits.
    """
    path, limits = os.fspath(path), limits or VideoLimits()
    _check_file(path)
    try:
        info = _run_guarded(lambda p: _probe_pyav(path, p), limits.timeout_s, "pyav-probe")
    except VideoDecodeError:
        raise
    except Exception as av_exc:  # noqa: BLE001
        try:
            info = _run_guarded(lambda p: _probe_decord(path, p), limits.timeout_s, "decord-probe")
        except Exception as dec_exc:  # noqa: BLE001
            raise VideoDecodeError(
                f"{path}: not a video, or a truncated/corrupted container "
                f"(pyav: {_describe(av_exc)}; decord: {_describe(dec_exc)})"
            ) from av_exc
    _check_limits(path, info, limits)
    return info


def _read_with_backend(backend: str, path: str, wanted: list[int], limits: VideoLimits, claimed: int | None):
    if backend == "decord":
        fn = lambda p: _decord_read(path, wanted, p)  # noqa: E731
    else:
        fn = lambda p: _pyav_read(path, wanted, p, claimed)  # noqa: E731
    return _run_guarded(fn, limits.timeout_s, backend)


def read_frames(
    path: str | os.PathLike,
    indices: Sequence[int],
    *,
    backend: str = "auto",
    limits: VideoLimits | None = None,
    info: VideoInfo | None = None,
    as_tensor: bool = False,
) -> np.ndarray | torch.Tensor:
    """Decode the frames at ``indices`` in one call.

    Args:
        path: video file.
        indices: frame indices (any order, repeats allowed) in [0, num_frames).
        backend: "auto" (decord, falling back to PyAV), "decord" or "pyav".
        limits: size/duration limits and the no-progress timeout.
        info: metadata from :func:`probe_video` (probed when omitted).
        as_tensor: return a torch tensor instead of a numpy array.

    Returns:
        uint8 RGB array/tensor (N, H, W, 3), N = len(indices), in the given order.

    Raises:
        VideoDecodeError: naming the file and the cause (both causes when both backends fail).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    path, limits = os.fspath(path), limits or VideoLimits()
    info = info or probe_video(path, limits)
    indices = [int(i) for i in indices]
    if not indices:
        raise ValueError("indices must not be empty")
    if min(indices) < 0 or max(indices) >= info.num_frames:
        raise ValueError(f"indices must lie in [0, {info.num_frames}) for {path}")
    wanted = sorted(set(indices))
    decoded = _decode_with_fallback(path, wanted, backend, limits, info.num_frames)
    frames = np.stack([decoded[i] for i in indices])
    return torch.from_numpy(frames) if as_tensor else frames


def _decode_with_fallback(path: str, wanted: list[int], backend: str, limits: VideoLimits, claimed: int):
    order = ["decord", "pyav"] if backend == "auto" else [backend]
    causes = []
    for name in order:
        if name == "decord" and not decord_available():
            causes.append("decord: not installed")
            logger.debug("decord not installed; using PyAV for %s", path)
            continue
        try:
            decoded = _read_with_backend(name, path, wanted, limits, claimed)
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            causes.append(f"{name}: {_describe(exc)}")
            logger.debug("backend %s failed on %s: %s", name, path, exc)
            continue
        logger.debug("read %d frames of %s with %s", len(wanted), path, name)
        return decoded
    raise VideoDecodeError(f"{path}: cannot decode frames ({'; '.join(causes)})")


def iter_frame_batches(
    path: str | os.PathLike,
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
    path, limits = os.fspath(path), limits or VideoLimits()
    info = probe_video(path, limits)
    if backend not in ("decord", "pyav"):
        raise ValueError("backend must be 'decord' or 'pyav' for sequential decoding")
    try:
        if backend == "decord":
            yield from _iter_decord_batches(path, batch_size, limits, info.num_frames)
        else:
            yield from _iter_pyav_batches(path, batch_size, limits)
    except VideoDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise VideoDecodeError(f"{path}: sequential decode with {backend} failed ({_describe(exc)})") from exc


def _iter_pyav_batches(path: str, batch_size: int, limits: VideoLimits) -> Iterator[np.ndarray]:
    with _open_av(path) as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        frames = container.decode(stream)

        def next_batch(progress: _Progress) -> list[np.ndarray]:
            batch = []
            for frame in frames:
                batch.append(frame.to_ndarray(format="rgb24"))
                progress.tick()
                if len(batch) == batch_size:
                    break
            return batch

        while batch := _run_guarded(next_batch, limits.timeout_s, "pyav-seq"):
            yield np.stack(batch)


def _iter_decord_batches(path: str, batch_size: int, limits: VideoLimits, count: int) -> Iterator[np.ndarray]:
    decord = _load_decord()
    if decord is None:
        raise VideoDecodeError(f"{path}: decord is not installed")
    reader = _run_guarded(lambda p: decord.VideoReader(path, ctx=decord.cpu(0)), limits.timeout_s, "decord-open")
    total = min(count, len(reader))

    def next_batch(progress: _Progress, size: int) -> np.ndarray:
        # next() decodes forward; get_batch would re-seek to a keyframe per batch.
        frames = []
        for _ in range(size):
            frames.append(_to_numpy(reader.next()))
            progress.tick()
        return np.stack(frames)

    for start in range(0, total, batch_size):
        size = min(batch_size, total - start)
        yield _run_guarded(lambda p: next_batch(p, size), limits.timeout_s, "decord-seq")


# --------------------------------------------------------------------------- #
# Writing (synthetic data and benchmarks)
# --------------------------------------------------------------------------- #
def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: int = 24,
    *,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
) -> int:
    """Encode RGB frames with PyAV.

    Args:
        path: output file; the container is chosen from the extension.
        frames: iterable of uint8 (H, W, 3) RGB frames of one size (H, W even for yuv420p).
        fps: frame rate.
        options: codec options, e.g. {"preset": "ultrafast", "crf": "18", "g": "60"}.
        container_options: muxer options, e.g. {"movflags": "+faststart"}.

    Returns:
        Number of frames written.
    """
    import av  # noqa: PLC0415

    count = 0
    with av.open(os.fspath(path), mode="w", options=container_options or {}) as container:
        stream = None
        for rgb in frames:
            if stream is None:
                stream = container.add_stream(codec, rate=fps, options=options or {})
                stream.height, stream.width = rgb.shape[:2]
                stream.pix_fmt = pix_fmt
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
            count += 1
        if stream is not None:
            container.mux(stream.encode(None))
    return count


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #
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


def seconds_to_frames(info: VideoInfo, start: float | None, end: float | None) -> tuple[int, int]:
    """Convert a [start, end) window in seconds to a frame window via fps (clamped to the video)."""
    first = 0 if start is None else int(math.floor(max(0.0, start) * info.fps))
    last = info.num_frames if end is None else int(math.ceil(end * info.fps))
    last = min(last, info.num_frames)
    if first >= last:
        raise ValueError(f"empty time window start={start} end={end} for a {info.duration:.2f} s video")
    return first, last


# --------------------------------------------------------------------------- #
# Preprocessing
# --------------------------------------------------------------------------- #
def _interpolation(name: str):
    from torchvision.transforms import InterpolationMode  # noqa: PLC0415

    return {
        "bicubic": InterpolationMode.BICUBIC,
        "bilinear": InterpolationMode.BILINEAR,
        "nearest": InterpolationMode.NEAREST,
    }[name]


def _as_nchw_uint8(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else frames
    if tensor.ndim != 4 or tensor.shape[-1] != 3:
        raise ValueError(f"frames must have shape (N, H, W, 3), got {tuple(tensor.shape)}")
    if tensor.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {tensor.dtype}")
    return tensor.permute(0, 3, 1, 2)


def _center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre crop like transformers (top = floor((h - size) / 2)); zero-pads if smaller."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        pad_w, pad_h = max(0, size - w), max(0, size - h)
        x = torch.nn.functional.pad(x, (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2))
        h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def _random_crop_box(height: int, width: int, generator: torch.Generator | None) -> tuple[int, int, int, int]:
    """RandomResizedCrop parameters (top, left, h, w) drawn from ``generator``."""
    area = height * width
    log_ratio = torch.log(torch.tensor(TRAIN_CROP_RATIO, dtype=torch.float64))
    for _ in range(10):
        u = torch.rand(2, generator=generator, dtype=torch.float64)
        target = area * (TRAIN_CROP_SCALE[0] + u[0].item() * (TRAIN_CROP_SCALE[1] - TRAIN_CROP_SCALE[0]))
        ratio = math.exp(log_ratio[0].item() + u[1].item() * (log_ratio[1] - log_ratio[0]).item())
        w, h = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < w <= width and 0 < h <= height:
            pos = torch.rand(2, generator=generator, dtype=torch.float64)
            return int(pos[0] * (height - h + 1)), int(pos[1] * (width - w + 1)), h, w
    side = min(height, width)  # fallback: centre square
    return (height - side) // 2, (width - side) // 2, side, side


def preprocess_frames(
    frames: np.ndarray | torch.Tensor,
    size: int = 224,
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
    train: bool = False,
    generator: torch.Generator | None = None,
    *,
    resize_to: int | None = None,
    center_crop: bool = True,
    interpolation: str = "bicubic",
    rescale_factor: float = 1.0 / 255.0,
) -> torch.Tensor:
    """CLIP preprocessing of a clip as batched tensor ops.

    eval: resize the shortest side to ``resize_to`` (default ``size``; bicubic,
    antialias), centre crop to ``size``, normalise. train: resize the shortest side
    to round(size * 256 / 224), then one random resized crop (scale
    TRAIN_CROP_SCALE, ratio TRAIN_CROP_RATIO, drawn from ``generator``) applied to
    every frame (temporal consistency), then normalise.

    Args:
        frames: uint8 RGB (N, H, W, 3), numpy or torch.
        size: output side.
        mean, std: per-channel normalisation (after multiplying by ``rescale_factor``).
        center_crop: eval only; False squashes the frame to size x size instead.

    Returns:
        float32 tensor (N, 3, size, size).
    """
    from torchvision.transforms.v2 import functional as F  # noqa: PLC0415

    x = _as_nchw_uint8(frames)
    mode = _interpolation(interpolation)
    if train:
        x = F.resize(x, [round(size * 256 / 224)], interpolation=mode, antialias=True)
        top, left, h, w = _random_crop_box(x.shape[-2], x.shape[-1], generator)
        x = F.resized_crop(x, top, left, h, w, [size, size], interpolation=mode, antialias=True)
    elif not center_crop:
        x = F.resize(x, [size, size], interpolation=mode, antialias=True)
    else:
        short = resize_to or size
        if min(x.shape[-2:]) != short:
            x = F.resize(x, [short], interpolation=mode, antialias=True)
        x = _center_crop(x, size)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    return (x.to(torch.float32) * rescale_factor - mean_t) / std_t


def _field(obj: Any, key: str) -> Any:
    """Read ``key`` from a dict, a transformers SizeDict, or an int (square)."""
    if obj is None or isinstance(obj, int):
        return obj
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def _resample_name(resample: Any) -> str:
    if resample is None:
        return "bicubic"
    name = getattr(resample, "value", resample)
    if isinstance(name, int):
        return _RESAMPLE.get(name, "bicubic")
    return str(name).lower() if str(name).lower() in ("nearest", "bilinear", "bicubic") else "bicubic"


def processor_settings(image_processor: Any) -> PreprocessSettings:
    """Read size, crop, mean, std, centre-crop and resample from a transformers
    ``CLIPImageProcessor`` so LLaVA's own processor settings are honoured.

    Handles ``size={"shortest_edge": 336}`` / ``crop_size={"height": 336, "width": 336}``
    (dicts or SizeDicts) and plain ints.
    """
    size_cfg = getattr(image_processor, "size", None)
    crop_cfg = getattr(image_processor, "crop_size", None)
    shortest = _field(size_cfg, "shortest_edge") if not isinstance(size_cfg, int) else size_cfg
    shortest = shortest or _field(size_cfg, "height") or 224
    crop = _field(crop_cfg, "height") if not isinstance(crop_cfg, int) else crop_cfg
    do_crop = bool(getattr(image_processor, "do_center_crop", True))
    crop = int(crop or shortest) if do_crop else int(shortest)
    do_norm = getattr(image_processor, "do_normalize", True)
    do_rescale = getattr(image_processor, "do_rescale", True)
    return PreprocessSettings(
        size=crop,
        resize_to=int(shortest),
        mean=tuple(float(v) for v in image_processor.image_mean) if do_norm else (0.0, 0.0, 0.0),
        std=tuple(float(v) for v in image_processor.image_std) if do_norm else (1.0, 1.0, 1.0),
        center_crop=do_crop,
        interpolation=_resample_name(getattr(image_processor, "resample", None)),
        rescale_factor=float(getattr(image_processor, "rescale_factor", 1 / 255)) if do_rescale else 1.0,
    )


# --------------------------------------------------------------------------- #
# High-level entry point
# --------------------------------------------------------------------------- #
def load_video_clips(
    path: str | os.PathLike,
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
) -> VideoClips:
    """Open a video, sample C clips of T frames, decode and preprocess them.

    Args:
        path: video file (mp4/mkv/webm/avi/mov/gif).
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

    Returns:
        VideoClips(clips=float tensor (C, T, 3, size, size), info, indices=C lists of T ints).

    Raises:
        VideoDecodeError: for every failure to read the video.
    """
    limits = limits or VideoLimits()
    info = probe_video(path, limits)
    first, last = seconds_to_frames(info, start, end)
    indices = clip_indices(
        info.num_frames, frames_per_clip, num_clips, mode=mode, generator=generator,
        max_seconds_per_clip=max_seconds_per_clip, fps=info.fps, start_frame=first, end_frame=last,
    )
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
