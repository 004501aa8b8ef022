"""Writing time-reversal pairs to disk: ``<stem>_a.mp4`` (forward), ``<stem>_b.mp4`` (reversed), one CSV.

Shared by both generators so their files are encoded alike: H.264 at 12 fps, crf 12, and
x264 single-threaded, which keeps the bytes identical for the same seed.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from mugstan_chat.video import write_video

FPS = 12
ENCODER_OPTIONS = {"preset": "ultrafast", "crf": "12", "threads": "1"}
ANNOTATIONS_FILE = "annotations.csv"


def write_pair(out: Path, stem: str, clip: np.ndarray, forward: dict, backward: dict) -> list[dict]:
    """Writes ``clip`` as ``<stem>_a.mp4`` and its reversal as ``<stem>_b.mp4``.

    Returns their annotation rows: ``{"video": name, **forward}`` then ``{"video": name, **backward}``.
    """
    rows = []
    for suffix, fields, frames in (("a", forward, clip), ("b", backward, clip[::-1])):
        name = f"{stem}_{suffix}.mp4"
        write_video(out / name, frames, fps=FPS, options=ENCODER_OPTIONS)
        rows.append({"video": name, **fields})
    return rows


def write_annotations(out: Path, rows: list[dict], columns: list[str]) -> Path:
    """Writes ``rows`` to ``out/annotations.csv`` with these ``columns``; returns its path."""
    path = out / ANNOTATIONS_FILE
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path
