"""The three ways to give LLaVA-1.5 a video, compared on the same frames (docs/design.md section 4).

* ``stan``: our video tower, one clip of T frames -> one image's worth of tokens, STAN fused;
* ``mean``: the same tower with the branch off: temporal mean of CLIP features, same tokens
  (FreeVA's training-free baseline);
* ``concat``: stock LLaVA with every frame as its own image (T ``<image>`` entries, T x one
  image's tokens): the session decodes the very frames of the T-frame clip and hands each to the
  tower as a one-frame clip, which is exactly the tower's image path (plain CLIP per frame).

The evaluation and the chat benchmark (:mod:`mugstan_chat.benchmarks.chat`) both build sessions through
:func:`session_shape`.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("stan", "mean", "concat")
SELECT_SUFFIX = "+select"  # "stan+select": the mode's tower, K of M candidate clips chosen per question


def base_mode(mode: str) -> str:
    """``stan`` for ``stan+select``: the tower mode a (possibly selecting) evaluation mode runs."""
    return mode[: -len(SELECT_SUFFIX)] if mode.endswith(SELECT_SUFFIX) else mode


def selecting(mode: str) -> bool:
    """Whether ``mode`` chooses its clips per question (docs/design.md section 4c)."""
    return mode.endswith(SELECT_SUFFIX) and base_mode(mode) in ("stan", "mean")


@dataclass(frozen=True)
class SessionShape:
    """How a :class:`mugstan_chat.engine.conversation.ChatSession` must be built for one mode."""

    frames: int  # T per clip
    clips: int  # C clips
    temporal: str  # "stan" or "mean" (the tower's mode for these clips)
    frames_as_images: bool = False  # concat: each of the C x T frames fills its own <image>


def session_shape(mode: str, frames: int, clips: int = 1) -> SessionShape:
    """Frames, clips and tower mode for ``mode`` at T = ``frames`` (C = ``clips`` clips of video).

    Every mode samples the same C x T frames; ``concat`` gives each of them its own ``<image>``.
    """
    mode = base_mode(mode) if selecting(mode) else mode
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; expected one of {', '.join(MODES)}")
    if frames < 1 or clips < 1:
        raise ValueError(f"frames and clips must be positive (got {frames}, {clips})")
    if mode == "concat":
        return SessionShape(frames=frames, clips=clips, temporal="mean", frames_as_images=True)
    return SessionShape(frames=frames, clips=clips, temporal=mode)
