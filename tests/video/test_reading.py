"""Tests for mugstan_chat.video (reading, sampling, preprocessing, errors), on its own clips and
on synthetic time-order videos. CPU only, no network, a few seconds."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
import wave

import numpy as np
import pytest
import torch

from mugstan_chat import video as V
from mugstan_chat.video import backends

FAST = {"preset": "ultrafast", "threads": "1"}


def _moving_frames(n: int, h: int = 64, w: int = 64) -> np.ndarray:
    """Distinct, smoothly changing frames (N, H, W, 3) uint8."""
    yy, xx = np.mgrid[0:h, 0:w]
    frames = np.zeros((n, h, w, 3), np.uint8)
    for i in range(n):
        frames[i, ..., 0] = (xx * 3 + i * 5) % 256
        frames[i, ..., 1] = (yy * 2 + i * 3) % 256
        frames[i, ..., 2] = (i * 9) % 256
        frames[i, 8:20, (i % (w - 12)) : (i % (w - 12)) + 12] = 255
    return frames


@pytest.fixture(scope="module")
def synth(synthetic_videos):
    return synthetic_videos(8, seed=3)


@pytest.fixture(scope="module")
def good_video(tmp_path_factory):
    """A 120-frame 64x64 H.264 mp4 with a keyframe every 12 frames and B-frames."""
    path = tmp_path_factory.mktemp("good") / "good.mp4"
    V.write_video(path, _moving_frames(120), fps=24, options={"preset": "fast", "g": "12", "threads": "1"})
    return path


def _assert_good_read_works(path) -> None:
    frames = V.read_frames(path, [0, 60, 119])
    assert frames.shape == (3, 64, 64, 3) and frames.dtype == np.uint8


# --------------------------------------------------------------------------- #
# Sampling
# --------------------------------------------------------------------------- #
def test_eval_sampling_takes_segment_middles():
    idx = V.sample_indices(100, 8, mode="eval")
    assert idx == [int(np.floor((i + 0.5) * 100 / 8)) for i in range(8)]
    assert V.sample_indices(100, 8, mode="chat") == idx


@pytest.mark.parametrize("num_frames,T", [(100, 8), (37, 16), (5, 8), (1, 4), (32, 32)])
@pytest.mark.parametrize("mode", ["eval", "train"])
def test_sampling_count_bounds_one_per_segment(num_frames, T, mode):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        idx = V.sample_indices(num_frames, T, mode=mode, generator=gen)
        assert len(idx) == T and idx == sorted(idx)
        assert all(0 <= i < num_frames for i in idx)
        for s, i in enumerate(idx):  # frame i's span [i, i+1) overlaps segment s
            lo = int(np.floor(s * num_frames / T))
            hi = int(np.ceil((s + 1) * num_frames / T))
            assert lo <= i < hi, (s, i, lo, hi)


def test_fewer_frames_than_T_repeat_sorted():
    idx = V.sample_indices(3, 8)
    assert len(idx) == 8 and idx == sorted(idx) and set(idx) == {0, 1, 2}


def test_train_sampling_seeded_reproducible_and_random():
    a = V.sample_indices(1000, 16, "train", torch.Generator().manual_seed(7))
    b = V.sample_indices(1000, 16, "train", torch.Generator().manual_seed(7))
    c = V.sample_indices(1000, 16, "train", torch.Generator().manual_seed(8))
    assert a == b and a != c


def test_sampling_window():
    idx = V.sample_indices(100, 4, start_frame=40, end_frame=60)
    assert idx == [42, 47, 52, 57]
    with pytest.raises(ValueError):
        V.sample_indices(100, 4, start_frame=60, end_frame=60)


def test_clip_indices_cover_video_in_order():
    clips = V.clip_indices(100, 4, num_clips=4)
    assert len(clips) == 4 and all(len(c) == 4 for c in clips)
    flat = [i for c in clips for i in c]
    assert flat == sorted(flat)
    for c, clip in enumerate(clips):
        assert all(25 * c <= i < 25 * (c + 1) for i in clip)
    gen = torch.Generator().manual_seed(0)
    train = V.clip_indices(100, 4, 4, mode="train", generator=gen)
    for c, clip in enumerate(train):
        assert all(25 * c <= i < 25 * (c + 1) for i in clip)


def test_clip_count_from_max_seconds():
    clips = V.clip_indices(300, 8, max_seconds_per_clip=3.0, fps=30.0)  # 10 s -> ceil(10/3)
    assert len(clips) == 4
    assert len(V.clip_indices(300, 8, max_seconds_per_clip=10.0, fps=30.0)) == 1


# --------------------------------------------------------------------------- #
# Reading
# --------------------------------------------------------------------------- #
def test_probe_metadata(good_video):
    info = V.probe_video(good_video)
    assert info == V.VideoInfo(num_frames=120, fps=24.0, duration=5.0, width=64, height=64, rotation=0,
                               container="mov,mp4,m4a,3gp,3g2,mj2")
    with pytest.raises(Exception):
        info.fps = 1  # frozen


def test_frames_in_requested_order_with_repeats(good_video):
    everything = V.read_frames(good_video, range(120), backend="pyav")
    picked = V.read_frames(good_video, [90, 3, 3, 50], backend="pyav", as_tensor=True)
    assert isinstance(picked, torch.Tensor) and picked.shape == (4, 64, 64, 3)
    assert np.array_equal(picked.numpy(), everything[[90, 3, 3, 50]])


def test_pyav_sparse_read_seeks_instead_of_decoding_everything(good_video, caplog):
    caplog.set_level(logging.DEBUG, logger="mugstan_chat.video")
    V.read_frames(good_video, [5, 100], backend="pyav")
    msg = next(r.getMessage() for r in caplog.records if "pyav decoded" in r.getMessage())
    decoded = int(msg.split()[2])
    assert decoded < 60, msg  # two GOPs of 12 (+ decoder delay), not 120 frames


@pytest.mark.skipif(not V.decord_available(), reason="decord not installed")
def test_decord_and_pyav_return_same_frames(synth, good_video):
    _, videos = synth
    for path in [good_video] + [p for p, _ in videos]:
        info = V.probe_video(path)
        idx = V.sample_indices(info.num_frames, 8)
        a = V.read_frames(path, idx, backend="decord").astype(np.int16)
        b = V.read_frames(path, idx, backend="pyav").astype(np.int16)
        assert np.abs(a - b).mean() < 1.0


@pytest.mark.parametrize(
    "ext,codec", [("mkv", "libx264"), ("webm", "libvpx"), ("avi", "mpeg4"), ("mov", "libx264")]
)
def test_other_containers(tmp_path, ext, codec):
    frames = _moving_frames(20)
    path = tmp_path / f"clip.{ext}"
    if codec == "libvpx":
        # decord's library is loaded RTLD_GLOBAL and its bundled FFmpeg breaks PyAV's
        # libvpx *encoder* in the same process (ABI mismatch); decoding is unaffected.
        np.save(tmp_path / "frames.npy", frames)
        code = (
            "import sys, numpy as np; from mugstan_chat.video import write_video; "
            "write_video(sys.argv[1], np.load(sys.argv[2]), fps=10, codec='libvpx')"
        )
        subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "frames.npy")], check=True)
    else:
        V.write_video(path, frames, fps=10, codec=codec, options=FAST if codec == "libx264" else {})
    info = V.probe_video(path)
    assert (info.num_frames, info.width, info.height) == (20, 64, 64)
    for backend in ("auto", "pyav"):
        got = V.read_frames(path, [0, 10, 19], backend=backend).astype(np.int16)
        assert np.abs(got - frames[[0, 10, 19]]).mean() < 12  # lossy codecs


def test_animated_gif(tmp_path):
    from PIL import Image

    frames = _moving_frames(10)
    path = tmp_path / "anim.gif"
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=100, loop=0)
    got = V.read_frames(path, [0, 9])  # decord cannot read GIF; auto falls back to PyAV
    assert got.shape == (2, 64, 64, 3)
    assert V.load_video_clips(path, 4, size=32).clips.shape == (1, 4, 3, 32, 32)


# --------------------------------------------------------------------------- #
# Errors
# --------------------------------------------------------------------------- #
def _bad_file(kind: str, tmp_path, good_video):
    data = good_video.read_bytes()
    path = tmp_path / f"bad_{kind}.mp4"
    if kind == "missing":
        return tmp_path / "does_not_exist.mp4"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("this is not a video\n" * 50)
    elif kind == "truncated":  # moov atom at the end: cut in half
        path.write_bytes(data[: len(data) // 2])
    elif kind == "header_claims_more":  # moov first: header promises 120, half the data
        full = tmp_path / "faststart.mp4"
        V.write_video(full, _moving_frames(120), fps=24, options=FAST, container_options={"movflags": "+faststart"})
        fs = full.read_bytes()
        path.write_bytes(fs[: len(fs) // 2])
    elif kind == "corrupted":
        noise = np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes()
        mid = len(data) // 3
        path.write_bytes(data[:mid] + noise + data[mid + 400 :])
    elif kind == "audio_only":
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(8000)
            w.writeframes(b"\0\0" * 8000)
    elif kind == "directory":
        path = tmp_path / "folder.mp4"
        path.mkdir()
    return path


BAD_KINDS = {
    "missing": "missing file",
    "empty": "0 bytes",
    "text": "not a video",
    "truncated": "truncated",
    "header_claims_more": "fewer decodable frames",
    "corrupted": "pyav",
    "audio_only": "no video stream",
    "directory": "not a regular file",
}


@pytest.mark.parametrize("kind", sorted(BAD_KINDS))
def test_bad_input_raises_named_error_then_good_read_works(kind, tmp_path, good_video):
    path = _bad_file(kind, tmp_path, good_video)
    limits = V.VideoLimits(timeout_s=2.0)
    start = time.monotonic()
    with pytest.raises(V.VideoDecodeError) as err:
        V.load_video_clips(path, 8, num_clips=2, size=32, limits=limits)
    assert time.monotonic() - start < 5.0
    assert path.name in str(err.value) and BAD_KINDS[kind] in str(err.value)
    _assert_good_read_works(good_video)


def test_both_backend_causes_are_reported(tmp_path, good_video):
    path = _bad_file("header_claims_more", tmp_path, good_video)
    with pytest.raises(V.VideoDecodeError) as err:
        V.read_frames(path, [0, 119], limits=V.VideoLimits(timeout_s=2.0))
    message = str(err.value)
    assert path.name in message and "pyav:" in message
    if V.decord_available():
        assert "decord:" in message


@pytest.mark.parametrize(
    "limits,cause",
    [
        (V.VideoLimits(max_width=32, max_height=4320), "resolution 64x64"),
        (V.VideoLimits(max_width=7680, max_height=32), "resolution 64x64"),
        (V.VideoLimits(max_seconds=1.0), "duration 5.0 s"),
    ],
)
def test_over_limits(good_video, limits, cause):
    with pytest.raises(V.VideoDecodeError) as err:
        V.load_video_clips(good_video, 4, limits=limits)
    assert good_video.name in str(err.value) and cause in str(err.value)


@pytest.fixture
def hanging_decord(monkeypatch):
    """Replace the decord read by one that makes no progress (as decord does on some files)."""
    release = threading.Event()

    def hang(path, wanted, progress):
        release.wait(30)
        raise RuntimeError("released")

    monkeypatch.setattr(backends, "_decord_read", hang)
    monkeypatch.setattr(backends, "decord_available", lambda: True)
    yield
    release.set()


def test_hanging_decord_is_abandoned_and_pyav_takes_over(hanging_decord, good_video, caplog):
    caplog.set_level(logging.DEBUG, logger="mugstan_chat.video")
    limits = V.VideoLimits(timeout_s=0.5)
    start = time.monotonic()
    frames = V.read_frames(good_video, [1, 2, 3], limits=limits)
    assert time.monotonic() - start < 3.0 and frames.shape == (3, 64, 64, 3)
    assert any("with pyav" in r.getMessage() for r in caplog.records)
    with pytest.raises(V.VideoDecodeError, match="no progress"):
        V.read_frames(good_video, [1], backend="decord", limits=limits)


def test_decord_failing_mid_read_falls_back(monkeypatch, good_video, caplog):
    def broken(path, wanted, progress):
        progress.tick()
        raise RuntimeError("decoder exploded mid-read")

    monkeypatch.setattr(backends, "_decord_read", broken)
    monkeypatch.setattr(backends, "decord_available", lambda: True)
    caplog.set_level(logging.DEBUG, logger="mugstan_chat.video")
    expected = V.read_frames(good_video, [7, 70], backend="pyav")
    assert np.array_equal(V.read_frames(good_video, [7, 70]), expected)
    assert any("decoder exploded" in r.getMessage() for r in caplog.records)


def test_without_decord_reads_through_pyav(monkeypatch, good_video, caplog):
    monkeypatch.setitem(sys.modules, "decord", None)  # `import decord` now raises ImportError
    assert not V.decord_available()
    caplog.set_level(logging.DEBUG, logger="mugstan_chat.video")
    out = V.load_video_clips(good_video, 8, num_clips=2, size=32)
    assert out.clips.shape == (2, 8, 3, 32, 32)
    assert any("with pyav" in r.getMessage() for r in caplog.records)
    with pytest.raises(V.VideoDecodeError, match="decord: not installed"):
        V.read_frames(good_video, [0], backend="decord")


# --------------------------------------------------------------------------- #
# Preprocessing
# --------------------------------------------------------------------------- #
def test_preprocess_shape_dtype_and_grey_value():
    frames = np.full((5, 48, 80, 3), 128, np.uint8)
    out = V.preprocess_frames(frames, size=32)
    assert out.shape == (5, 3, 32, 32) and out.dtype == torch.float32
    expected = (128 / 255 - torch.tensor(V.CLIP_MEAN)) / torch.tensor(V.CLIP_STD)
    assert torch.allclose(out, expected.view(1, 3, 1, 1).expand_as(out), atol=1e-5)
    train = V.preprocess_frames(frames, size=32, train=True, generator=torch.Generator().manual_seed(0))
    assert train.shape == (5, 3, 32, 32)
    assert torch.allclose(train, expected.view(1, 3, 1, 1).expand_as(train), atol=1e-5)


def test_train_crop_same_for_every_frame_and_seeded():
    frame = _moving_frames(1, 80, 120)
    frames = np.repeat(frame, 4, axis=0)
    a = V.preprocess_frames(frames, size=48, train=True, generator=torch.Generator().manual_seed(1))
    b = V.preprocess_frames(frames, size=48, train=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert all(torch.equal(a[0], a[i]) for i in range(1, 4))  # one crop per clip
    crops = {V.preprocess_frames(frame, size=48, train=True, generator=torch.Generator().manual_seed(s)).sum().item()
             for s in range(5)}
    assert len(crops) > 1


@pytest.mark.parametrize("backend", ["torchvision", "pil"])
@pytest.mark.parametrize("shape", [(64, 64), (64, 96), (90, 50)])
def test_matches_clip_image_processor(backend, shape):
    """Measured: torchvision-backed processor: max diff ~5e-7 (identical ops);
    PIL-backed: max 0.03 normalised units (= 2 grey levels), mean < 3e-4."""
    transformers = pytest.importorskip("transformers")
    from PIL import Image

    cls = transformers.CLIPImageProcessor if backend == "torchvision" else transformers.CLIPImageProcessorPil
    processor = cls(size={"shortest_edge": 48}, crop_size={"height": 48, "width": 48})
    settings = V.processor_settings(processor)
    assert (settings.size, settings.resize_to, settings.interpolation) == (48, 48, "bicubic")
    frame = _moving_frames(1, *shape)
    ref = processor(images=[Image.fromarray(frame[0])], return_tensors="pt")["pixel_values"]
    ours = V.preprocess_frames(frame, **settings.as_kwargs())
    diff = (ref - ours).abs()
    assert ours.shape == ref.shape == (1, 3, 48, 48)
    max_tol, mean_tol = (1e-5, 1e-6) if backend == "torchvision" else (0.05, 1e-3)
    assert diff.max() < max_tol and diff.mean() < mean_tol


def test_processor_settings_from_llava_style_dicts():
    class Proc:  # what LLaVA's processor config looks like
        size = {"shortest_edge": 336}
        crop_size = {"height": 336, "width": 336}
        image_mean = [0.5, 0.5, 0.5]
        image_std = [0.25, 0.25, 0.25]
        do_center_crop = True
        resample = 3

    s = V.processor_settings(Proc())
    assert (s.size, s.resize_to, s.mean, s.std, s.interpolation) == (336, 336, (0.5,) * 3, (0.25,) * 3, "bicubic")


# --------------------------------------------------------------------------- #
# High-level entry point
# --------------------------------------------------------------------------- #
def test_load_video_clips_shapes_and_indices(good_video):
    out = V.load_video_clips(good_video, frames_per_clip=4, num_clips=3, size=32)
    clips, info, indices = out
    assert clips.shape == (3, 4, 3, 32, 32) and clips.dtype == torch.float32
    assert info.num_frames == 120 and indices == V.clip_indices(120, 4, 3)
    direct = V.preprocess_frames(V.read_frames(good_video, indices[1]), size=32)
    assert torch.allclose(clips[1], direct)


def test_load_video_clips_window_and_max_seconds(good_video):
    out = V.load_video_clips(good_video, 4, start=1.0, end=3.0, size=32)  # frames [24, 72)
    assert all(24 <= i < 72 for i in out.indices[0])
    out = V.load_video_clips(good_video, 4, size=32, max_seconds_per_clip=2.0)  # 5 s -> 3 clips
    assert out.clips.shape[0] == 3


def test_load_video_clips_train_reproducible(good_video):
    a = V.load_video_clips(good_video, 4, 2, size=32, mode="train", generator=torch.Generator().manual_seed(0))
    b = V.load_video_clips(good_video, 4, 2, size=32, mode="train", generator=torch.Generator().manual_seed(0))
    assert a.indices == b.indices and torch.equal(a.clips, b.clips)


def test_video_bytes_read_like_the_file(tmp_path):
    """A video in memory (a tar shard's KEY.mp4) samples, turns and fails exactly as the file does."""
    path = tmp_path / "turned.mp4"
    frames = [np.full((16, 32, 3), 10 * i, dtype=np.uint8) for i in range(10)]
    frames = [np.concatenate([f[:, :16], 255 - f[:, 16:]], axis=1) for f in frames]
    V.write_video(path, frames, fps=10, display_rotation=90)
    data = path.read_bytes()
    for backend in ("auto", "pyav"):
        from_file = V.load_video_clips(path, 4, mode="train", size=16, generator=torch.Generator().manual_seed(3),
                                     backend=backend)
        from_bytes = V.load_video_clips(V.VideoBytes(data, "s.tar:k"), 4, mode="train", size=16,
                                      generator=torch.Generator().manual_seed(3), backend=backend)
        assert from_bytes.info == from_file.info and from_bytes.info.rotation == 90
        assert from_bytes.indices == from_file.indices
        torch.testing.assert_close(from_bytes.clips, from_file.clips, rtol=0, atol=0)
    with pytest.raises(V.VideoDecodeError, match="s.tar:cut"):
        V.load_video_clips(V.VideoBytes(data[: len(data) // 2], "s.tar:cut"), 4)
