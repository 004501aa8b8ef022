"""Synthetic time-order videos: moving shapes whose caption depends on frame order.

Every pair shares the same frames; the second video plays them in reverse and
carries the opposite caption ("a red circle moving left" / "... moving right").
A model that ignores temporal order cannot tell a pair apart, which makes these
clips a cheap probe of the temporal branch. Generation is deterministic given
the seed (NumPy ``default_rng``; x264 runs single-threaded).
"""

from __future__ import annotations

import csv
import logging
import os
from pathlib import Path

import numpy as np

from mugstan_chat.video import write_video

logger = logging.getLogger(__name__)

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 190, 70),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 50),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUND = (30, 30, 30)
# motion -> (caption of the forward clip, caption of the reversed clip)
MOTIONS = {
    "horizontal": ("moving right", "moving left"),
    "vertical": ("moving down", "moving up"),
    "scale": ("growing", "shrinking"),
    "fade": ("appearing", "disappearing"),
}
FPS = 12


def _shape_mask(shape: str, size: int, cx: float, cy: float, r: float) -> np.ndarray:
    """Boolean (size, size) mask of a shape centred at (cx, cy) with half-size r."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    # upward triangle: apex at (cx, cy - r), base at y = cy + r
    t = (dy + r) / (2 * r)
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)


def _trajectory(motion: str, size: int, frames: int, rng: np.random.Generator):
    """Per-frame (cx, cy, r, alpha) arrays for the forward clip."""
    t = np.linspace(0.0, 1.0, frames)
    r0 = size * 0.14
    lo, hi = size * 0.22, size * 0.78
    fixed = np.full(frames, rng.uniform(size * 0.35, size * 0.65))
    ones = np.ones(frames)
    if motion == "horizontal":
        return lo + (hi - lo) * t, fixed, r0 * ones, ones
    if motion == "vertical":
        return fixed, lo + (hi - lo) * t, r0 * ones, ones
    centre = np.full(frames, size / 2)
    if motion == "scale":
        return centre, centre, size * (0.06 + 0.24 * t), ones
    return centre, centre, size * 0.22 * ones, t  # fade in


def render_clip(shape: str, colour: str, motion: str, size: int, frames: int, rng: np.random.Generator) -> np.ndarray:
    """Forward frames of one clip, uint8 (frames, size, size, 3)."""
    bg = np.array(BACKGROUND, dtype=np.float32)
    fg = np.array(COLOURS[colour], dtype=np.float32)
    out = np.empty((frames, size, size, 3), dtype=np.uint8)
    for i, (cx, cy, r, a) in enumerate(zip(*_trajectory(motion, size, frames, rng))):
        mask = _shape_mask(shape, size, cx, cy, r)[..., None]
        out[i] = np.where(mask, bg + a * (fg - bg), bg).round().astype(np.uint8)
    return out


def make_synthetic_videos(
    out_dir: str | os.PathLike, num: int, seed: int, size: int = 64, frames: int = 24
) -> list[tuple[Path, str]]:
    """Write ``num`` H.264 mp4 clips (num/2 forward/reverse pairs) and annotations.csv.

    Args:
        out_dir: output folder (created).
        num: number of videos; must be even.
        seed: RNG seed (same seed => same files and captions).
        size: frame side in pixels (even).
        frames: frames per video.

    Returns:
        (path, caption) for every video, pair by pair (forward first).
    """
    if num <= 0 or num % 2:
        raise ValueError(f"num must be a positive even number, got {num}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    motions = [list(MOTIONS)[i] for i in rng.permutation(len(MOTIONS))]  # every motion appears
    rows, result = [], []
    for pair in range(num // 2):
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = colours[rng.integers(len(colours))]
        motion = motions[pair % len(motions)]
        clip = render_clip(shape, colour, motion, size, frames, rng)
        for suffix, verb, seq in (("a", MOTIONS[motion][0], clip), ("b", MOTIONS[motion][1], clip[::-1])):
            name = f"pair{pair:04d}_{suffix}.mp4"
            caption = f"a {colour} {shape} {verb}"
            write_video(out / name, seq, fps=FPS, options={"preset": "ultrafast", "crf": "12", "threads": "1"})
            rows.append({"video": name, "caption": caption, "pair": pair})
            result.append((out / name, caption))
    with open(out / "annotations.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["video", "caption", "pair"])
        writer.writeheader()
        writer.writerows(rows)
    logger.info("wrote %d synthetic videos to %s", num, out)
    return result
