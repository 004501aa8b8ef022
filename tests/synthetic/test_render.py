"""The shared renderer: shape masks, blending, and noise drawn only when asked for."""

from __future__ import annotations

import numpy as np
import pytest

from mugstan_chat.synthetic.render import Canvas, shape_mask, texture, to_uint8


def test_masks_have_their_shapes():
    circle = shape_mask("circle", 32, 16, 16, 8)
    square = shape_mask("square", 32, 16, 16, 8)
    triangle = shape_mask("triangle", 32, 16, 16, 8)
    assert circle.shape == (32, 32) and circle.dtype == bool
    assert square.sum() > circle.sum() > triangle.sum() > 0
    assert triangle[9:16].sum() < triangle[16:23].sum()  # points up: wider at the bottom
    assert not square[:, :7].any() and not square[:, 25:].any()
    wide = shape_mask("circle", (16, 48), 40, 8, 4)  # (height, width)
    assert wide.shape == (16, 48) and wide[:, 40:].any() and not wide[:, :30].any()


def test_the_bar_tells_a_rotation_from_its_reverse():
    bar = shape_mask("bar", 64, 32, 32, 20)
    assert not np.array_equal(bar, bar[:, ::-1])  # the knob makes it asymmetric
    turned = shape_mask("bar", 64, 32, 32, 20, angle=np.pi / 2)  # clockwise on screen: the knob goes down
    assert turned[40:].sum() > turned[:24].sum()


def test_canvas_blends_and_adds_noise_only_when_asked():
    background = np.full((8, 8, 3), 30.0)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    rng = np.random.default_rng(0)
    flat = Canvas(background, 3, rng)
    flat.paint(1, mask, (230, 30, 30), alpha=0.5)
    frames = flat.finish()
    assert frames.shape == (3, 8, 8, 3) and frames.dtype == np.uint8
    assert (frames[1, 2, 2] == (130, 30, 30)).all() and (frames[1, 0, 0] == 30).all() and (frames[0] == 30).all()
    state = rng.bit_generator.state
    Canvas(background, 3, rng).finish()
    assert rng.bit_generator.state == state  # a noiseless canvas leaves the random stream alone
    noisy = Canvas(background, 3, rng, noise=4.0).finish()
    assert rng.bit_generator.state != state and 1.0 < np.abs(noisy.astype(float) - 30).mean() < 8.0
    with pytest.raises(ValueError, match="rng"):
        Canvas(background, 3, noise=4.0)


def test_texture_is_smooth_dark_and_seeded():
    a = texture(np.random.default_rng(1), 32, 64)
    assert a.shape == (32, 64, 3) and 10 <= a.min() and a.max() <= 80
    assert np.abs(np.diff(a, axis=1)).max() < (a.max() - a.min()) / 3  # smooth: bilinear between coarse cells
    assert np.array_equal(a, texture(np.random.default_rng(1), 32, 64))
    assert np.array_equal(to_uint8(np.array([-3.0, 12.5, 300.0])), np.array([0, 12, 255], np.uint8))
