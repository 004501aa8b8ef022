"""The plain time-order set: one shape on a flat dark background, four motions, small and fast.

Every pair shares the same frames; the second video plays them in reverse and
carries the opposite caption ("a red circle moving left" / "... moving right").
A model that ignores temporal order cannot tell a pair apart, which makes these
clips a cheap probe of the temporal branch, and easy test and demo inputs (no
noise, fixed paths; the first frame shows the shape except for ``fade``). The
harder probe set, with random textures and eleven motions, is :mod:`.families`.
Generation is deterministic given the seed (NumPy ``default_rng``; x264 runs
single-threaded), and every video of one run is distinct: a clip whose frames repeat an
earlier clip's (or its reversal's) is drawn again, with the centre of a growing or fading
shape moved (a centred shape has only 12 shape-colour choices per motion).
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from ..entrypoints.progress import progress_bar
from .pairs import write_annotations, write_pair
from .render import COLOURS as PALETTE
from .render import SHAPES, Canvas, shape_mask

logger = logging.getLogger(__name__)

COLOURS = {name: PALETTE[name] for name in ("red", "green", "blue", "yellow")}
BACKGROUND = (30, 30, 30)
# motion -> (caption of the forward clip, caption of the reversed clip)
MOTIONS = {
    "horizontal": ("moving right", "moving left"),
    "vertical": ("moving down", "moving up"),
    "scale": ("growing", "shrinking"),
    "fade": ("appearing", "disappearing"),
}
COLUMNS = ["video", "caption", "pair"]
MAX_DRAWS = 100  # draws of one pair before giving up on a clip unlike every earlier one


def trajectory(motion: str, size: int, frames: int, rng: np.random.Generator, shift: tuple[int, int] = (0, 0)):
    """Per-frame (cx, cy, r, alpha) arrays of the forward clip: fixed paths, one random coordinate.

    ``shift`` moves the centre of the centred motions (scale, fade) by whole pixels.
    """
    t = np.linspace(0.0, 1.0, frames)
    r0 = size * 0.14
    lo, hi = size * 0.22, size * 0.78
    fixed = np.full(frames, rng.uniform(size * 0.35, size * 0.65))
    ones = np.ones(frames)
    if motion == "horizontal":
        return lo + (hi - lo) * t, fixed, r0 * ones, ones
    if motion == "vertical":
        return fixed, lo + (hi - lo) * t, r0 * ones, ones
    cx, cy = (np.full(frames, size / 2 + d) for d in shift)
    if motion == "scale":
        return cx, cy, size * (0.06 + 0.24 * t), ones
    if motion == "fade":
        return cx, cy, size * 0.22 * ones, t
    raise ValueError(f"unknown motion {motion!r}; expected one of {tuple(MOTIONS)}")


def render_clip(shape: str, colour: str, motion: str, size: int, frames: int, rng: np.random.Generator,
                shift: tuple[int, int] = (0, 0)) -> np.ndarray:
    """Forward frames of one clip, uint8 (frames, size, size, 3)."""
    canvas = Canvas(np.broadcast_to(np.asarray(BACKGROUND, dtype=np.float64), (size, size, 3)), frames)
    for i, (cx, cy, r, alpha) in enumerate(zip(*trajectory(motion, size, frames, rng, shift))):
        canvas.paint(i, shape_mask(shape, size, cx, cy, r), COLOURS[colour], alpha)
    return canvas.finish()


def make_synthetic_videos(
    out_dir: str | os.PathLike, num: int, seed: int, size: int = 64, frames: int = 24, progress: bool = False
) -> list[tuple[Path, str]]:
    """Write ``num`` H.264 mp4 clips (num/2 forward/reverse pairs) and annotations.csv.

    Args:
        out_dir: output folder (created).
        num: number of videos; must be even.
        seed: RNG seed (same seed => same files and captions).
        size: frame side in pixels (even).
        frames: frames per video.
        progress: a tqdm bar on stderr when it is a terminal (the command line's default).

    Returns:
        (path, caption) for every video, pair by pair (forward first). Files are
        ``pair0000_a.mp4``, ``pair0000_b.mp4``, ...; ``annotations.csv`` has the
        columns ``video``, ``caption``, ``pair``.
    """
    if num <= 0 or num % 2:
        raise ValueError(f"num must be a positive even number, got {num}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    colours = list(COLOURS)
    motions = [list(MOTIONS)[i] for i in rng.permutation(len(MOTIONS))]  # every motion appears
    rows = []
    seen: set[bytes] = set()  # digests of every clip so far and of its reversal
    bar = progress_bar(progress, total=num, unit="video", desc="videos")
    for pair in range(num // 2):
        motion = motions[pair % len(motions)]
        for draw in range(MAX_DRAWS):
            shape = SHAPES[rng.integers(len(SHAPES))]
            colour = colours[rng.integers(len(colours))]
            shift = (0, 0) if draw == 0 else tuple(int(d) for d in rng.integers(-(size // 8), size // 8 + 1, 2))
            clip = render_clip(shape, colour, motion, size, frames, rng, shift)
            digests = {hashlib.sha256(c.tobytes()).digest() for c in (clip, clip[::-1])}
            if not digests & seen:
                break
        else:
            raise ValueError(f"cannot draw {num} distinct videos at size {size} with {frames} frames; "
                             "use a larger --size or fewer videos")
        seen |= digests
        forward, backward = (f"a {colour} {shape} {verb}" for verb in MOTIONS[motion])
        rows += write_pair(out, f"pair{pair:04d}", clip, {"caption": forward, "pair": pair},
                           {"caption": backward, "pair": pair})
        bar.update(2)
    bar.close()
    write_annotations(out, rows, COLUMNS)
    logger.info("wrote %d synthetic videos to %s", num, out)
    return [(out / row["video"], row["caption"]) for row in rows]
