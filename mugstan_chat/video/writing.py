"""Writing videos with PyAV (synthetic data, benchmarks and tests)."""

from __future__ import annotations

import os
from typing import Iterable

import numpy as np


def write_video(
    path: str | os.PathLike,
    frames: Iterable[np.ndarray],
    fps: int = 24,
    *,
    codec: str = "libx264",
    pix_fmt: str = "yuv420p",
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    display_rotation: int = 0,
) -> int:
    """Encode RGB frames with PyAV.

    Args:
        path: output file; the container is chosen from the extension.
        frames: iterable of uint8 (H, W, 3) RGB frames of one size (H, W even for yuv420p).
        fps: frame rate.
        options: codec options, e.g. {"preset": "ultrafast", "crf": "18", "g": "60"}.
        container_options: muxer options, e.g. {"movflags": "+faststart"}.
        display_rotation: counter-clockwise degrees written as the stream's display matrix
            (as phones do for portrait video); the frames themselves are stored unturned.

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
                if display_rotation:
                    stream.set_display_rotation(display_rotation)
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb, dtype=np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
            count += 1
        if stream is not None:
            container.mux(stream.encode(None))
    return count
