"""Clip times from presentation timestamps: a variable-frame-rate video made by ffmpeg, checked against ffprobe.

The video's first 10 frames are 0.2 s apart and the rest 0.04 s apart (``setpts``), so its average
rate is 15 fps and ``index / fps`` is wrong by up to 1.3 s; each frame's brightness is its number,
so which frame a reader returns can be read off its pixels.
"""

import subprocess

import numpy as np
import pytest
from outside_programs import require

from mugstan_chat.engine.conversation import ChatSession, GenerationSettings
from mugstan_chat.video import FrameTimes, VideoDecodeError, clip_spans, probe_video, read_frame_times, read_frames
from mugstan_chat.engine.engine import Engine

needs_ffmpeg = pytest.mark.requires("ffmpeg")  # skipped with its install line, failed under MUGSTAN_REQUIRE
SLOW_FRAMES, SLOW_GAP, FAST_GAP, FAST_FROM = 10, 0.2, 0.04, 2.0
LUMA_STEP = 3  # frame n is grey level 16 + 3 n (limited range; 60 frames stay below white)


def _expected_time(n: int) -> float:
    return n * SLOW_GAP if n < SLOW_FRAMES else FAST_FROM + (n - SLOW_FRAMES) * FAST_GAP


@pytest.fixture(scope="module")
def vfr(tmp_path_factory):
    require("ffmpeg")
    path = tmp_path_factory.mktemp("vfr") / "vfr.mp4"
    setpts = f"if(lt(N,{SLOW_FRAMES}),N*{SLOW_GAP}/TB,({FAST_FROM}+(N-{SLOW_FRAMES})*{FAST_GAP})/TB)"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "lavfi", "-i", "color=black:size=64x48:rate=25:duration=2.4",
                    "-vf", f"geq=lum='16+{LUMA_STEP}*N':cb=128:cr=128,setpts='{setpts}'", "-fps_mode", "vfr",
                    "-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "0", str(path)],
                   check=True, timeout=120, capture_output=True)
    return path


def _ffprobe_times(path) -> list[float]:
    out = subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_entries", "packet=pts_time",
                          "-of", "csv=p=0", str(path)], check=True, timeout=60, capture_output=True, text=True).stdout
    return sorted(float(line) for line in out.split())


@needs_ffmpeg
def test_frame_times_are_ffprobes_presentation_times(vfr):
    times = read_frame_times(vfr)
    probed = _ffprobe_times(vfr)
    assert len(times) == len(probed) == probe_video(vfr).num_frames == 60
    # ffprobe prints microseconds: equal to that resolution
    assert np.allclose(times.seconds, [t - probed[0] for t in probed], atol=1e-6)
    assert np.allclose(times.seconds, [_expected_time(n) for n in range(60)], atol=1e-3)
    info = probe_video(vfr)
    assert abs(30 / info.fps - times[30]) > 0.7  # what index / fps would have said is far off
    assert times.frame_at(2.05) == 11 and times.frame_at(0.39) == 1 and times.frame_at(-1.0) == 0
    assert times[10_000] == times.seconds[-1]  # an index past the end (a header that overcounts)


@needs_ffmpeg
def test_frame_i_is_the_frame_at_its_time(vfr):
    """The readers' frame i is the i-th in presentation order, so its time is the i-th timestamp."""
    wanted = [0, 9, 10, 30, 59]
    for backend in ("pyav", "auto"):
        luma = read_frames(vfr, wanted, backend=backend).mean(axis=(1, 2, 3))
        # lossless grey levels 16 + 3n, through the limited-range YUV -> RGB expansion (x 255/219): 3.5 RGB
        # levels per frame, so a neighbouring frame is out of the 1.5 bound
        assert np.allclose(luma, [LUMA_STEP * n * 255 / 219 for n in wanted], atol=1.5)


@needs_ffmpeg
def test_session_spans_use_the_timestamps(vfr, chat_model):
    session = ChatSession(Engine(chat_model), vfr, frames=4, clips=3, generation=GenerationSettings(max_new_tokens=4))
    spans = session.clip_spans
    probed = _ffprobe_times(vfr)
    expected = [(probed[min(c)] - probed[0], probed[max(c)] - probed[0]) for c in session.frame_indices]
    assert np.allclose([(s.start, s.end) for s in spans], expected, atol=1e-6)
    # the prompt names those times (labels floored to tenths for a short video)
    prompt = session.prompt_text("when does it get bright?")
    last = spans[-1]
    assert f"Clip 3 (00:0{int(last.start)}." in prompt


def test_constant_rate_fallback_and_spans_from_a_rate():
    times = FrameTimes.constant_rate(16, 8.0)
    assert clip_spans([[0, 3], [8, 15]], times) == clip_spans([[0, 3], [8, 15]], 8.0) == [(0.0, 0.375), (1.0, 1.875)]
    with pytest.raises(ValueError):
        FrameTimes.constant_rate(4, 0.0)


def test_unreadable_file_is_one_named_error(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(b"\x00" * 4096)
    with pytest.raises(VideoDecodeError, match="junk.mp4"):
        read_frame_times(junk)
