"""The three ways to give LLaVA-1.5 a video, compared on the same frames (DESIGN.md section 4).

* ``stan``: our video tower, one clip of T frames -> one image's worth of tokens, STAN fused;
* ``mean``: the same tower with the branch off: temporal mean of CLIP features, same tokens
  (FreeVA's training-free baseline);
* ``concat``: stock LLaVA with every frame as its own image (T ``<image>`` entries, T x one
  image's tokens). It runs as T clips of one frame, which is exactly the tower's image path
  (plain CLIP per frame), and samples the same frame indices as a T-frame clip.

The evaluation and ``scripts/benchmark_chat.py`` both build sessions through :func:`session_shape`.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("stan", "mean", "concat")


@dataclass(frozen=True)
class SessionShape:
    """How a :class:`mugstan_chat.chat.ChatSession` must be built for one mode."""

    frames: int  # T per clip
    clips: int  # C clips, each fills one <image>
    temporal: str  # "stan" or "mean" (the tower's mode for these clips)


def session_shape(mode: str, frames: int, clips: int = 1) -> SessionShape:
    """Frames, clips and tower mode for ``mode`` at T = ``frames`` (C = ``clips`` clips of video).

    ``concat`` turns C clips of T frames into C*T single-frame clips (images); with C = 1 its
    frame indices equal the T-frame clip's.
    """
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if frames < 1 or clips < 1:
        raise ValueError(f"frames and clips must be positive (got {frames}, {clips})")
    if mode == "concat":
        return SessionShape(frames=1, clips=frames * clips, temporal="mean")
    return SessionShape(frames=frames, clips=clips, temporal=mode)
