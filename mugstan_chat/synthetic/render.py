"""The one renderer behind every synthetic clip: a palette, shape masks and a canvas to paint them on.

Both generators (:mod:`.plain` on a flat background, :mod:`.families` on random textures
with noise) draw through :class:`Canvas`, so a shape, a colour or a blend looks the same
in both sets; only what moves where differs.
"""

from __future__ import annotations

import numpy as np

# The flat-background set uses the first four (its captions and random draws predate the other two).
COLOURS = {"red": (220, 40, 40), "green": (40, 190, 70), "blue": (50, 80, 230), "yellow": (235, 215, 50),
           "white": (235, 235, 235), "purple": (160, 60, 200)}
SHAPES = ("circle", "square", "triangle")


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
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


def shape_mask(shape: str, size: int | tuple[int, int], cx: float, cy: float, r: float,
               angle: float = 0.0) -> np.ndarray:
    """Boolean mask of a shape centred at (cx, cy), half-size r, rotated by ``angle`` radians (clockwise on screen).

    ``size``: the side of a square frame, or (height, width). Shapes: those of :data:`SHAPES`
    (the triangle points up) and ``"bar"``, a bar with a knob at one end (no rotational symmetry).
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
    if shape == "bar":
        return ((np.abs(dy) <= r * 0.25) & (np.abs(dx) <= r)) | ((dx - r) ** 2 + dy ** 2 <= (0.45 * r) ** 2)
    t = (dy + r) / (2 * r)  # upward triangle: apex at (cx, cy - r), base at y = cy + r
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r)


class Canvas:
    """``frames`` frames over one static background (H, W, 3); shapes painted per frame, optional noise at the end.

    The noise is drawn from ``rng`` only when ``noise`` > 0, so a noiseless canvas leaves the
    generator's random stream untouched.
    """

    def __init__(self, background: np.ndarray, frames: int, rng: np.random.Generator | None = None,
                 noise: float = 0.0):
        if noise and rng is None:
            raise ValueError("a noisy canvas needs an rng")
        self.rng, self.noise = rng, noise
        self.out = np.repeat(np.asarray(background, dtype=np.float64)[None], frames, axis=0)

    def paint(self, i: int, mask: np.ndarray, colour, alpha: float = 1.0) -> None:
        """Blends ``colour`` over frame ``i`` where ``mask`` holds, with opacity ``alpha``."""
        colour = np.asarray(colour, dtype=np.float64)
        self.out[i][mask] = self.out[i][mask] * (1 - alpha) + colour * alpha

    def finish(self) -> np.ndarray:
        """The frames as uint8 (T, H, W, 3), with Gaussian noise of std ``noise`` added first."""
        return to_uint8(self.out, self.rng, self.noise)


def to_uint8(frames: np.ndarray, rng: np.random.Generator | None = None, noise: float = 0.0) -> np.ndarray:
    """Float frames in [0, 255] as uint8, after adding Gaussian noise of std ``noise`` (drawn only when > 0)."""
    if noise:
        frames = frames + rng.normal(0.0, noise, size=frames.shape)
    return np.clip(frames, 0, 255).round().astype(np.uint8)
