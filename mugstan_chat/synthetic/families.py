"""Time-reversal pairs from many motion families: a probe of whether a model knows which way time runs.

Each family renders a forward clip whose caption depends on frame order; its
partner is the same frames reversed, with the opposite caption. Every clip also
gets an appearance-only caption (what any single frame shows), used by the
image-text warm-up of the temporal probe (``mugstan_train.temporal_probe``). Backgrounds are
random smooth textures with per-frame noise; positions, sizes, speeds, directions, colours and
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

The layout written is the probe's annotation layout: ``<family>_<pair>_a.mp4`` (forward),
``<family>_<pair>_b.mp4`` (reversed) and ``annotations.csv`` with columns ``video``,
``caption``, ``pair`` (shared by a clip and its reversal), ``appearance`` and ``family``.
Drawn with the shared renderer (:mod:`.render`) and written like the plain set (:mod:`.pairs`).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..entrypoints.progress import progress_bar
from .pairs import write_annotations, write_pair
from .render import COLOURS, SHAPES, Canvas, shape_mask, texture, to_uint8

COLUMNS = ["video", "caption", "pair", "appearance", "family"]
NOISE = 4.0  # std of the per-frame noise, in grey levels


def _canvas(rng: np.random.Generator, size: int, frames: int) -> Canvas:
    """A random textured background (drawn first from ``rng``) with per-frame noise."""
    return Canvas(texture(rng, size, size), frames, rng, noise=NOISE)


def _pick(rng, options, exclude=None):
    choices = [o for o in options if o != exclude]
    return choices[rng.integers(len(choices))]


def _object(rng):
    return _pick(rng, list(COLOURS)), _pick(rng, SHAPES)


def _render(family: str, rng: np.random.Generator, size: int, frames: int):
    """Forward frames (T, S, S, 3) uint8, forward caption, reversed caption, appearance caption."""
    t = np.linspace(0.0, 1.0, frames)
    canvas = _canvas(rng, size, frames)
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
            canvas.paint(i, shape_mask(shape, size, cx, cy, r), rgb)
        if family == "speed":
            return canvas.finish(), f"{thing} speeding up", f"{thing} slowing down", thing
        verbs = {"horizontal": ("moving right", "moving left"), "vertical": ("moving down", "moving up")}[family]
        forward, backward = verbs if direction > 0 else verbs[::-1]
        return canvas.finish(), f"{thing} {forward}", f"{thing} {backward}", thing
    cx, cy = rng.uniform(lo + r, hi - r), rng.uniform(lo + r, hi - r)
    if family == "scale":
        small, big = size * rng.uniform(0.04, 0.07), size * rng.uniform(0.2, 0.28)
        for i in range(frames):
            canvas.paint(i, shape_mask(shape, size, size / 2, size / 2, small + (big - small) * t[i]), rgb)
        return canvas.finish(), f"{thing} growing", f"{thing} shrinking", thing
    if family == "fade":
        for i in range(frames):
            canvas.paint(i, shape_mask(shape, size, cx, cy, r * 1.4), rgb, alpha=t[i])
        return canvas.finish(), f"{thing} appearing", f"{thing} disappearing", thing
    if family == "rotation":
        thing = f"a {colour} bar"
        start, turn = rng.uniform(0, 2 * np.pi), rng.uniform(0.5, 0.9) * np.pi  # under half a turn: unambiguous
        direction = rng.choice([-1, 1])  # +1: clockwise on screen (y points down)
        for i in range(frames):
            angle = start + direction * turn * t[i]
            canvas.paint(i, shape_mask("bar", size, size / 2, size / 2, size * 0.3, angle), rgb)
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
            canvas.paint(i, shape_mask(shape, size, left, y, r), rgb)
            canvas.paint(i, shape_mask(shape2, size, right, y, r), COLOURS[colour2])
        pair = f"{thing} and a {colour2} {shape2}"
        return canvas.finish(), f"{pair} approaching each other", f"{pair} moving apart", pair
    if family == "occlusion":
        wall_x, wall_half = size / 2, size * 0.12
        direction = rng.choice([-1, 1])
        start = wall_x - direction * size * 0.38
        y = rng.uniform(lo, hi)
        for i in range(frames):
            canvas.paint(i, shape_mask(shape, size, start + (wall_x - start) * t[i], y, r), rgb)
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
                    canvas.paint(i, shape_mask("circle", size, x, y, size * 0.06), rgb)
        return (canvas.finish(), f"{colour} dots appearing one by one", f"{colour} dots disappearing one by one",
                f"{colour} dots")
    if family == "colour":
        colour2 = _pick(rng, list(COLOURS), exclude=colour)
        a, b = np.asarray(rgb, float), np.asarray(COLOURS[colour2], float)
        for i in range(frames):
            canvas.paint(i, shape_mask(shape, size, cx, cy, r * 1.3), a + (b - a) * t[i])
        names = sorted([colour, colour2])
        return (canvas.finish(), f"a {shape} turning {colour2}", f"a {shape} turning {colour}",
                f"a {names[0]} and {names[1]} {shape}")
    if family == "pan":
        wide = texture(rng, size, 2 * size)
        ox, oy = rng.uniform(size * 0.6, size * 1.4), rng.uniform(lo, hi)
        scene = wide.copy()
        scene[shape_mask(shape, (size, 2 * size), ox, oy, r)] = rgb
        shift = rng.uniform(0.3, 0.5) * size
        x0 = rng.uniform(0, size - shift)
        out = np.stack([scene[:, int(round(x0 + shift * ti)):int(round(x0 + shift * ti)) + size] for ti in t])
        return to_uint8(out, rng, NOISE), f"{thing}, camera panning right", f"{thing}, camera panning left", thing
    raise ValueError(f"unknown motion family {family!r}; expected one of {FAMILIES}")


FAMILIES = ("horizontal", "vertical", "scale", "fade", "rotation", "converge", "occlusion", "count", "speed",
            "colour", "pan")


def render_pair(family: str, rng: np.random.Generator, size: int = 64, frames: int = 24):
    """One time-reversal pair: (forward frames uint8 (T, S, S, 3), forward caption, reversed caption, appearance)."""
    return _render(family, rng, size, frames)


def make_time_reversal_dataset(out_dir: str | os.PathLike, pairs_per_family: int, seed: int,
                               families: tuple[str, ...] | list[str] = FAMILIES, size: int = 64,
                               frames: int = 24, progress: bool = False) -> Path:
    """Writes ``pairs_per_family`` pairs of every family (H.264 mp4) and ``annotations.csv``; returns the CSV path.

    ``progress``: a tqdm bar on stderr when it is a terminal (the command line's default).
    """
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown motion families {unknown}; expected some of {FAMILIES}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    pair = 0
    bar = progress_bar(progress, total=2 * pairs_per_family * len(families), unit="video", desc="videos")
    for _ in range(pairs_per_family):
        for family in families:
            clip, forward, backward, appearance = render_pair(family, rng, size, frames)
            fields = {"pair": pair, "appearance": appearance, "family": family}
            rows += write_pair(out, f"{family}_{pair:04d}", clip, {"caption": forward, **fields},
                               {"caption": backward, **fields})
            pair += 1
            bar.update(2)
    bar.close()
    return write_annotations(out, rows, COLUMNS)
