"""Time-reversal pairs from many motion families: a probe of whether a model knows which way time runs.

Each family renders a forward clip whose caption depends on frame order; its
partner is the same frames reversed, with the opposite caption. Every clip also
gets an appearance-only caption (what any single frame shows), used by the
image-text warm-up of ``scripts/temporal_probe.py``. Backgrounds are random smooth
textures with per-frame noise; positions, sizes, speeds, directions, colours and
shapes are drawn at random, so appearance alone never tells a clip from its
reversal: the two hold exactly the same frames.

Families (forward caption / reversed caption):

========== ============================================================
horizontal moving right / moving left (or the other way round)
vertical   moving down / moving up
scale      growing / shrinking
fade       appearing / disappearing
rotation   rotating clockwise / rotating counterclockwise
converge   approaching each other / moving apart (two objects)
occlusion  going behind a wall / coming out from behind a wall
count      appearing one by one / disappearing one by one (dots)
speed      speeding up / slowing down (direction drawn at random)
colour     turning <B> / turning <A> (colour A to colour B)
pan        camera panning right / camera panning left (the whole scene moves)
========== ============================================================

The layout written is the probe's annotation layout: ``annotations.csv`` with
columns ``video``, ``caption``, ``pair`` (shared by a clip and its reversal),
``appearance`` and ``family``.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 80, 230), "yellow": (235, 215, 50),
           "white": (235, 235, 235), "purple": (160, 60, 200)}
SHAPES = ("circle", "square", "triangle")
FPS = 12


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random dark texture (H, W, 3) float in [0, 255]: coarse noise, bilinearly upsampled."""
    cells = rng.uniform(10, 80, size=(6, max(2, 6 * width // height), 3))
    ys = np.linspace(0, cells.shape[0] - 1, height)
    xs = np.linspace(0, cells.shape[1] - 1, width)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, cells.shape[0] - 1), np.minimum(x0 + 1, cells.shape[1] - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    top = cells[y0][:, x0] * (1 - fx) + cells[y0][:, x1] * fx
    bottom = cells[y1][:, x0] * (1 - fx) + cells[y1][:, x1] * fx
    return top * (1 - fy) + bottom * fy


def _mask(shape: str, size: int | tuple[int, int], cx: float, cy: float, r: float,
          angle: float = 0.0) -> np.ndarray:
    """Boolean mask of a shape centred at (cx, cy), half-size r, rotated by ``angle`` radians (clockwise on screen).

    ``size``: the side of a square frame, or (height, width).
    """
    height, width = (size, size) if isinstance(size, int) else size
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    dx, dy = xx - cx, yy - cy
    if angle:
        c, s = np.cos(angle), np.sin(angle)
        dx, dy = c * dx + s * dy, -s * dx + c * dy
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r) & (np.abs(dy) <= r)
    if shape == "bar":  # a bar with a knob at one end: no rotational symmetry
        return ((np.abs(dy) <= r * 0.25) & (np.abs(dx) <= r)) | ((dx - r) ** 2 + dy ** 2 <= (0.45 * r) ** 2)
    t = (dy + r) / (2 * r)  # upward triangle
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)


class _Canvas:
    """Frames over one static textured background, with per-frame noise."""

    def __init__(self, rng: np.random.Generator, size: int, frames: int):
        self.rng, self.size, self.frames = rng, size, frames
        self.background = _texture(rng, size, size)
        self.out = np.repeat(self.background[None], frames, axis=0)

    def paint(self, i: int, mask: np.ndarray, colour, alpha: float = 1.0) -> None:
        colour = np.asarray(colour, dtype=np.float64)
        self.out[i][mask] = self.out[i][mask] * (1 - alpha) + colour * alpha

    def finish(self) -> np.ndarray:
        noise = self.rng.normal(0.0, 4.0, size=self.out.shape)
        return np.clip(self.out + noise, 0, 255).round().astype(np.uint8)


def _pick(rng, options, exclude=None):
    choices = [o for o in options if o != exclude]
    return choices[rng.integers(len(choices))]


def _object(rng):
    return _pick(rng, list(COLOURS)), _pick(rng, SHAPES)


def _render(family: str, rng: np.random.Generator, size: int, frames: int):
    """Forward frames (T, S, S, 3) uint8, forward caption, reversed caption, appearance caption."""
    t = np.linspace(0.0, 1.0, frames)
    canvas = _Canvas(rng, size, frames)
    colour, shape = _object(rng)
    rgb = COLOURS[colour]
    r = size * rng.uniform(0.09, 0.15)
    lo, hi = r + 2, size - r - 2
    thing = f"a {colour} {shape}"
    if family in ("horizontal", "vertical", "speed"):
        span = rng.uniform(0.45, 0.8) * (hi - lo)
        start = rng.uniform(lo, hi - span)
        direction = rng.choice([-1, 1])
        progress = t ** 2 if family == "speed" else t
        moving = start + span * (progress if direction > 0 else 1 - progress)
        fixed = rng.uniform(lo, hi)
        for i in range(frames):
            cx, cy = (moving[i], fixed) if family != "vertical" else (fixed, moving[i])
            canvas.paint(i, _mask(shape, size, cx, cy, r), rgb)
        if family == "speed":
            return canvas.finish(), f"{thing} speeding up", f"{thing} slowing down", thing
        verbs = {"horizontal": ("moving right", "moving left"), "vertical": ("moving down", "moving up")}[family]
        forward, backward = verbs if direction > 0 else verbs[::-1]
        return canvas.finish(), f"{thing} {forward}", f"{thing} {backward}", thing
    cx, cy = rng.uniform(lo + r, hi - r), rng.uniform(lo + r, hi - r)
    if family == "scale":
        small, big = size * rng.uniform(0.04, 0.07), size * rng.uniform(0.2, 0.28)
        for i in range(frames):
            canvas.paint(i, _mask(shape, size, size / 2, size / 2, small + (big - small) * t[i]), rgb)
        return canvas.finish(), f"{thing} growing", f"{thing} shrinking", thing
    if family == "fade":
        for i in range(frames):
            canvas.paint(i, _mask(shape, size, cx, cy, r * 1.4), rgb, alpha=t[i])
        return canvas.finish(), f"{thing} appearing", f"{thing} disappearing", thing
    if family == "rotation":
        thing = f"a {colour} bar"
        start, turn = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.9) * np.pi  # under half a turn: unambiguous
        direction = rng.choice([-1, 1])  # +1: clockwise on screen (y points down)
        for i in range(frames):
            canvas.paint(i, _mask("bar", size, size / 2, size / 2, size * 0.3, start + direction * turn * t[i]), rgb)
        verbs = ("rotating clockwise", "rotating counterclockwise")
        forward, backward = verbs if direction > 0 else verbs[::-1]
        return canvas.finish(), f"{thing} {forward}", f"{thing} {backward}", thing
    if family == "converge":
        colour2 = _pick(rng, list(COLOURS), exclude=colour)
        shape2 = _pick(rng, SHAPES)
        y = rng.uniform(lo, hi)
        gap = rng.uniform(r * 2.1, r * 2.5)
        for i in range(frames):
            left = lo + (size / 2 - gap / 2 - lo) * t[i]
            right = hi - (hi - size / 2 - gap / 2) * t[i]
            canvas.paint(i, _mask(shape, size, left, y, r), rgb)
            canvas.paint(i, _mask(shape2, size, right, y, r), COLOURS[colour2])
        pair = f"{thing} and a {colour2} {shape2}"
        return canvas.finish(), f"{pair} approaching each other", f"{pair} moving apart", pair
    if family == "occlusion":
        wall_x, wall_half = size / 2, size * 0.12
        direction = rng.choice([-1, 1])
        start = wall_x - direction * size * 0.38
        y = rng.uniform(lo, hi)
        for i in range(frames):
            canvas.paint(i, _mask(shape, size, start + (wall_x - start) * t[i], y, r), rgb)
            canvas.paint(i, np.abs(np.arange(size)[None, :] + 0.5 - wall_x).repeat(size, 0) <= wall_half,
                         (140, 140, 140))
        return (canvas.finish(), f"{thing} going behind a wall", f"{thing} coming out from behind a wall",
                f"{thing} and a grey wall")
    if family == "count":
        dots = int(rng.integers(3, 6))
        places = [(rng.uniform(lo, hi), rng.uniform(lo, hi)) for _ in range(dots)]
        times = np.sort(rng.uniform(0.05, 0.8, size=dots))
        for i in range(frames):
            for (x, y), when in zip(places, times):
                if t[i] >= when:
                    canvas.paint(i, _mask("circle", size, x, y, size * 0.06), rgb)
        return (canvas.finish(), f"{colour} dots appearing one by one", f"{colour} dots disappearing one by one",
                f"{colour} dots")
    if family == "colour":
        colour2 = _pick(rng, list(COLOURS), exclude=colour)
        a, b = np.asarray(rgb, float), np.asarray(COLOURS[colour2], float)
        for i in range(frames):
            canvas.paint(i, _mask(shape, size, cx, cy, r * 1.3), a + (b - a) * t[i])
        names = sorted([colour, colour2])
        return (canvas.finish(), f"a {shape} turning {colour2}", f"a {shape} turning {colour}",
                f"a {names[0]} and {names[1]} {shape}")
    if family == "pan":
        wide = _texture(rng, size, 2 * size)
        ox, oy = rng.uniform(size * 0.6, size * 1.4), rng.uniform(lo, hi)
        scene = wide.copy()
        scene[_mask(shape, (size, 2 * size), ox, oy, r)] = rgb
        shift = rng.uniform(0.3, 0.5) * size
        x0 = rng.uniform(0, size - shift)
        out = np.stack([scene[:, int(round(x0 + shift * ti)):int(round(x0 + shift * ti)) + size] for ti in t])
        out = np.clip(out + rng.normal(0.0, 4.0, size=out.shape), 0, 255).round().astype(np.uint8)
        return out, f"{thing}, camera panning right", f"{thing}, camera panning left", thing
    raise ValueError(f"unknown motion family {family!r}; expected one of {FAMILIES}")


FAMILIES = ("horizontal", "vertical", "scale", "fade", "rotation", "converge", "occlusion", "count", "speed",
            "colour", "pan")


def render_pair(family: str, rng: np.random.Generator, size: int = 64, frames: int = 24):
    """One time-reversal pair: (forward frames uint8 (T, S, S, 3), forward caption, reversed caption, appearance)."""
    return _render(family, rng, size, frames)


def make_time_reversal_dataset(out_dir: str | os.PathLike, pairs_per_family: int, seed: int,
                               families: tuple[str, ...] | list[str] = FAMILIES, size: int = 64,
                               frames: int = 24) -> Path:
    """Writes ``pairs_per_family`` pairs of every family (H.264 mp4) and ``annotations.csv``; returns the CSV path."""
    from .video import write_video

    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown motion families {unknown}; expected some of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    pair = 0
    for _ in range(pairs_per_family):
        for family in families:
            clip, forward, backward, appearance = render_pair(family, rng, size, frames)
            for suffix, caption, seq in (("a", forward, clip), ("b", backward, clip[::-1])):
                name = f"{family}_{pair:04d}_{suffix}.mp4"
                write_video(out / name, seq, fps=FPS, options={"preset": "ultrafast", "crf": "12", "threads": "1"})
                rows.append({"video": name, "caption": caption, "pair": pair, "appearance": appearance,
                             "family": family})
            pair += 1
    path = out / "annotations.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["video", "caption", "pair", "appearance", "family"])
        writer.writeheader()
        writer.writerows(rows)
    return path
