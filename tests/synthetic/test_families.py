"""Time-reversal motion families: order-dependent captions, exact reversals, appearance that does not tell."""

import csv
import hashlib

import numpy as np
import pytest

from mugstan_chat.synthetic.families import FAMILIES, make_time_reversal_dataset, render_pair


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_moves_and_has_order_dependent_captions(family):
    clip, forward, backward, appearance = render_pair(family, np.random.default_rng(0), size=64, frames=24)
    assert clip.shape == (24, 64, 64, 3) and clip.dtype == np.uint8
    assert forward != backward
    # something changes over time beyond the per-frame noise (std 4)
    assert np.abs(clip[0].astype(float) - clip[-1].astype(float)).mean() > 2.0
    # the appearance caption names no order: it is a prefix of, or shared by, both captions' objects
    for word in ("left", "right", "up", "down", "growing", "shrinking", "clockwise", "apart", "approaching",
                 "behind", "one by one", "speeding", "slowing", "turning", "panning"):
        assert word not in appearance


def test_random_draws_vary_direction_and_clips():
    rng = np.random.default_rng(1)
    captions = {render_pair("horizontal", rng)[1] for _ in range(12)}
    assert any("right" in c for c in captions) and any("left" in c for c in captions)
    assert len({render_pair("vertical", rng)[0][0].tobytes() for _ in range(3)}) == 3  # different clips


def test_dataset_layout_and_exact_reversals(tmp_path):
    families = ("horizontal", "rotation", "count")
    path = make_time_reversal_dataset(tmp_path, pairs_per_family=2, seed=3, families=families, size=32, frames=8)
    rows = list(csv.DictReader(open(path)))
    assert list(rows[0]) == ["video", "caption", "pair", "appearance", "family"]
    assert len(rows) == 2 * 2 * len(families) and {r["family"] for r in rows} == set(families)
    by_pair = {}
    for row in rows:
        by_pair.setdefault(row["pair"], []).append(row)
        assert (tmp_path / row["video"]).is_file()
    for a, b in by_pair.values():
        assert a["caption"] != b["caption"] and a["appearance"] == b["appearance"] and a["family"] == b["family"]
    from mugstan_chat.video import read_frames

    a, b = by_pair["0"]
    fa, fb = read_frames(tmp_path / a["video"], list(range(8))), read_frames(tmp_path / b["video"], list(range(8)))
    # b holds a's frames in reverse order (up to H.264 at crf 12)
    assert np.abs(fa.astype(float) - fb[::-1].astype(float)).mean() < 3.0
    assert np.abs(fa.astype(float) - fb.astype(float)).mean() > np.abs(fa.astype(float) - fb[::-1].astype(float)).mean()
    # same seed, same captions
    again = make_time_reversal_dataset(tmp_path / "again", 2, seed=3, families=families, size=32, frames=8)
    assert [r["caption"] for r in csv.DictReader(open(again))] == [r["caption"] for r in rows]
    with pytest.raises(ValueError, match="unknown motion families"):
        make_time_reversal_dataset(tmp_path / "bad", 1, seed=0, families=("teleport",))


def test_rendered_pixels_are_pinned():
    """The probe's results (docs/temporal_probe.md) were measured on these frames: a change must be deliberate."""
    rng = np.random.default_rng(0)
    digests = {f: hashlib.sha256(render_pair(f, rng, 32, 6)[0].tobytes()).hexdigest()[:16] for f in FAMILIES}
    assert digests == {
        "horizontal": "9207f3f13a6b059d", "vertical": "72a72d6a0190c3bc", "scale": "543e38f94afdd684",
        "fade": "15c700b771475f85", "rotation": "405ed915524139c7", "converge": "65ef3a7438024139",
        "occlusion": "dc71e32b3c0179e3", "count": "2a665468c28a05e5", "speed": "c8330895b133749d",
        "colour": "848d23bc3e587265", "pan": "1257233412dc05aa"}
