"""The plain synthetic set: files and CSV, exact reversals with opposite captions, determinism."""

from __future__ import annotations

import csv
import hashlib

import numpy as np
import pytest

from mugstan_chat import video as V
from mugstan_chat.synthetic.plain import BACKGROUND, MOTIONS, make_synthetic_videos, render_clip

OPPOSITES = {("moving right", "moving left"), ("moving down", "moving up"),
             ("growing", "shrinking"), ("appearing", "disappearing")}


@pytest.fixture(scope="module")
def synth(synthetic_videos):
    return synthetic_videos(8, seed=3)


def test_synthetic_files_and_csv(synth):
    out, videos = synth
    assert len(videos) == 8 and all(p.exists() and p.stat().st_size > 0 for p, _ in videos)
    assert [p.name for p, _ in videos[:2]] == ["pair0000_a.mp4", "pair0000_b.mp4"]
    with open(out / "annotations.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["video", "caption", "pair"]
    assert [(out / r["video"], r["caption"]) for r in rows] == videos
    assert [r["pair"] for r in rows] == ["0", "0", "1", "1", "2", "2", "3", "3"]
    info = V.probe_video(videos[0][0])
    assert (info.width, info.height, info.num_frames) == (64, 64, 24)


def test_synthetic_pairs_are_reversed_with_opposite_captions(synth):
    out, videos = synth
    for (path_a, cap_a), (path_b, cap_b) in zip(videos[0::2], videos[1::2]):
        a = V.read_frames(path_a, range(24)).astype(np.int16)
        b = V.read_frames(path_b, range(24)).astype(np.int16)
        assert np.abs(a - b[::-1]).mean() < 1.0  # same frames, reversed
        assert np.abs(a - b).mean() > 2 * np.abs(a - b[::-1]).mean()  # and order matters
        words_a, words_b = cap_a.split(), cap_b.split()
        assert words_a[:3] == words_b[:3]  # same "a <colour> <shape>"
        verbs = (" ".join(words_a[3:]), " ".join(words_b[3:]))
        assert verbs in OPPOSITES or verbs[::-1] in OPPOSITES


def test_synthetic_deterministic_and_even(tmp_path, synth):
    _, videos = synth
    again = make_synthetic_videos(tmp_path, num=8, seed=3)
    assert [c for _, c in again] == [c for _, c in videos]
    assert all(p.read_bytes() == q.read_bytes() for (p, _), (q, _) in zip(again, videos))
    with pytest.raises(ValueError):
        make_synthetic_videos(tmp_path / "odd", num=3, seed=0)


@pytest.mark.parametrize("motion", MOTIONS)
def test_clips_are_one_shape_on_a_flat_background(motion):
    clip = render_clip("circle", "red", motion, 32, 6, np.random.default_rng(0))
    assert clip.shape == (6, 32, 32, 3) and clip.dtype == np.uint8
    assert (clip[:, 0, 0] == BACKGROUND).all()  # the corner is background in every frame: no noise, no texture
    assert not np.array_equal(clip[0], clip[-1])  # it moves
    if motion != "fade":  # the first frame shows the shape (the browser test relies on it)
        assert (clip[0] != BACKGROUND).any()
    with pytest.raises(ValueError, match="unknown motion"):
        render_clip("circle", "red", "teleport", 32, 6, np.random.default_rng(0))


def test_rendered_pixels_are_pinned():
    """The frames before encoding, as the generator has always drawn them: a change must be deliberate."""
    rng = np.random.default_rng(0)
    digests = {m: hashlib.sha256(render_clip("triangle", "blue", m, 32, 6, rng).tobytes()).hexdigest()[:16]
               for m in MOTIONS}
    assert digests == {"horizontal": "b115083f0a7b2d85", "vertical": "c1ae696af3e8e177",
                       "scale": "919a10a2a78023d8", "fade": "8c47279b36751502"}


def _digests(videos):
    return [hashlib.sha256(path.read_bytes()).hexdigest() for path, _ in videos]


def test_videos_of_one_run_are_pairwise_distinct(tmp_path):
    """`videos OUT --num 32 --seed 1` once wrote pair0015_a.mp4 byte-identical to pair0003_a.mp4 (a centred
    growing shape has 12 shape-colour choices); 120 small videos need more growing/fading clips than that."""
    videos = make_synthetic_videos(tmp_path / "s1", num=32, seed=1)
    assert len(set(_digests(videos))) == 32
    many = make_synthetic_videos(tmp_path / "many", num=120, seed=0, size=32, frames=6)
    assert len(set(_digests(many))) == 120
    captions = [c for _, c in many]
    assert sum(c.endswith("growing") for c in captions) == 15 > 12  # more than the centred choices


def test_no_distinct_videos_left_is_one_error(tmp_path):
    """At 8 px the shapes are too small to move apart; the generator stops after a bounded number of draws."""
    with pytest.raises(ValueError, match="cannot draw 400 distinct videos at size 8"):
        make_synthetic_videos(tmp_path, num=400, seed=0, size=8, frames=2)
