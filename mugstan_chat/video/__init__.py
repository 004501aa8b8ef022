"""Video input: open, sample, decode and preprocess video frames for Mug-STAN / LLaVA.

This package is the only part of the project that opens video files (for
reading and, for synthetic data and benchmarks, for writing). Its modules:

* :mod:`.limits`: :class:`VideoLimits`, :class:`VideoInfo`, :class:`VideoBytes`
  (a video in memory, accepted wherever a path is) and
  :class:`VideoDecodeError`, which every failure to read a video raises,
  naming the file and the cause;
* :mod:`.guard`: the no-progress watchdog every read runs under, so that a
  file a decoder spins on cannot hang the caller;
* :mod:`.backends`: decord (fast sparse access) and PyAV (the fallback);
* :mod:`.probing`: metadata from the container header (:func:`probe_video`);
* :mod:`.reading`: frames by index (:func:`read_frames`) and whole videos in
  batches (:func:`iter_frame_batches`);
* :mod:`.sampling`: sparse sampling (:func:`sample_indices`, :func:`clip_indices`) and the clips'
  spans (:func:`clip_spans`);
* :mod:`.timestamps`: every frame's presentation time (:func:`read_frame_times`), so spans are
  right for variable-frame-rate and edited videos;
* :mod:`.preprocessing`: batched CLIP preprocessing (:func:`preprocess_frames`,
  :func:`processor_settings`);
* :mod:`.clips`: the high-level entry point :func:`load_video_clips`;
* :mod:`.writing`: :func:`write_video` (synthetic data, benchmarks, tests).

Randomness (training sampling and crops) uses a ``torch.Generator``; pass a
seeded one for reproducible results.
"""

from .backends import decord_available
from .clips import VideoClips, load_video_clips, plan_clips
from .limits import BACKENDS, SUPPORTED_EXTENSIONS, VideoBytes, VideoDecodeError, VideoInfo, VideoLimits
from .preprocessing import (
    CLIP_MEAN,
    CLIP_STD,
    TRAIN_CROP_RATIO,
    TRAIN_CROP_SCALE,
    PreprocessSettings,
    preprocess_frames,
    processor_settings,
)
from .probing import probe_video
from .reading import iter_frame_batches, read_frames
from .sampling import clip_indices, clip_spans, sample_indices, seconds_to_frames
from .timestamps import FrameTimes, read_frame_times
from .writing import write_video

__all__ = [
    "BACKENDS", "CLIP_MEAN", "CLIP_STD", "SUPPORTED_EXTENSIONS", "TRAIN_CROP_RATIO", "TRAIN_CROP_SCALE",
    "FrameTimes", "PreprocessSettings", "VideoBytes", "VideoClips", "VideoDecodeError", "VideoInfo", "VideoLimits",
    "clip_indices", "clip_spans", "decord_available", "iter_frame_batches", "load_video_clips", "plan_clips",
    "preprocess_frames",
    "probe_video", "processor_settings", "read_frame_times", "read_frames", "sample_indices", "seconds_to_frames", "write_video",
]
