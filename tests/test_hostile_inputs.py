"""Hostile inputs and a newcomer's first hour (issue 14): each case is made at test time.

Rotated phone videos (display matrix), MPEG-TS (also renamed .mp4), symlink loops,
unreadable files, out-of-range and non-finite settings, a literal ``<image>`` in a
question, ``/help`` in chat, a model that cannot be downloaded, a port in use, and
``--help`` without torch. Failures must be one line, with the right exit status,
no traceback, and no hang (every subprocess runs under a timeout).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from live_process import free_port
from mugstan_chat import video as V
from mugstan_chat.entrypoints.cli import main
from mugstan_chat.video import backends, limits as video_limits
from mugstan_chat.video.guard import Progress
from mugstan_chat.engine.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
       "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
FAST = ["--demo", "--frames", "4", "--max-new-tokens", "6"]
TIMEOUT_S = 120  # per subprocess: a hang fails the test instead of stalling the suite
X264 = {"preset": "medium", "g": "12", "threads": "1"}  # B-frames and a keyframe every 12 frames


@pytest.fixture(scope="module")
def chat_model(demo_chat_model):
    return demo_chat_model(8)  # the loader's default T


@pytest.fixture(scope="module")
def web(chat_model):
    """The web app's callbacks (app.py) on the demo model."""
    from mugstan_chat.entrypoints import web as app_module

    return app_module.ChatApp(Engine(chat_model), app_module.AppSettings(examples_dir=None))


def _run(argv: list[str], timeout: float = TIMEOUT_S, env: dict | None = None, prefix: tuple = ()):
    return subprocess.run([*prefix, sys.executable, *argv], cwd=ROOT, env=env or ENV, capture_output=True,
                          text=True, timeout=timeout)


def _assert_one_line_error(done, *needles: str) -> str:
    """Exit 1, nothing on stdout, exactly one line on stderr containing every needle, no traceback."""
    assert done.returncode == 1, done.stderr
    assert done.stdout == "" and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1, done.stderr
    for needle in needles:
        assert needle in done.stderr, (needle, done.stderr)
    return done.stderr


def _quadrants(n: int, height: int, width: int) -> np.ndarray:
    """(N, H, W, 3) frames whose eight orientations all differ: red top-left, blue bottom-right,
    a green top band; a grey level that changes per frame."""
    frames = np.zeros((n, height, width, 3), np.uint8)
    for i in range(n):
        frames[i] = 40 + (4 * i) % 160
        frames[i, : height // 2, : width // 3] = (230, 20, 20)
        frames[i, height // 2 :, 2 * width // 3 :] = (20, 20, 230)
        frames[i, : height // 8, :, 1] = 220
    return frames


# --------------------------------------------------------------------------- #
# 1. Rotated videos: upright frames, the displayed size, both backends alike
# --------------------------------------------------------------------------- #
# (display rotation written, stored height, stored width); PyAV reads rotation back counter-clockwise
ROTATIONS = [(90, 48, 96), (-90, 48, 96), (180, 48, 96), (90, 64, 64), (-90, 64, 64)]


@pytest.fixture(scope="module")
def rotated(tmp_path_factory):
    out = tmp_path_factory.mktemp("rotated")
    made = {}
    for degrees, height, width in ROTATIONS:
        path = out / f"rot{degrees}_{width}x{height}.mp4"
        V.write_video(path, _quadrants(24, height, width), fps=24, options=X264, display_rotation=degrees)
        made[(degrees, height, width)] = path
    return made


@pytest.mark.parametrize("case", ROTATIONS, ids=lambda c: f"{c[0]}deg-{c[2]}x{c[1]}")
def test_rotated_video_reads_upright_at_its_displayed_size(rotated, case):
    degrees, height, width = case
    path = rotated[case]
    info = V.probe_video(path)
    quarters = (degrees // 90) % 4
    assert info.rotation == quarters * 90
    assert (info.width, info.height) == ((height, width) if quarters % 2 else (width, height))
    frames = V.read_frames(path, [0, 11, 23])
    assert frames.shape == (3, info.height, info.width, 3)
    source = _quadrants(24, height, width)[[0, 11, 23]]
    expected = np.rot90(source, quarters, axes=(1, 2))  # turned counter-clockwise, as players show it
    # H.264 in yuv420p blurs colour edges over 2 px: a few grey levels on average (measured 1.5);
    # any other orientation of these frames is off by tens of levels
    error = np.abs(frames.astype(np.int16) - expected).mean()
    assert error < 6, error
    for wrong in range(4):
        candidate = np.rot90(source, wrong, axes=(1, 2))
        if wrong != quarters and candidate.shape == frames.shape:
            assert np.abs(frames.astype(np.int16) - candidate).mean() > 30


@pytest.mark.parametrize("case", ROTATIONS, ids=lambda c: f"{c[0]}deg-{c[2]}x{c[1]}")
def test_rotated_video_is_the_same_through_both_backends(rotated, case):
    if not V.decord_available():
        pytest.skip("decord is not installed")
    path = rotated[case]
    info = V.probe_video(path)
    pyav = V.read_frames(path, [0, 5, 23], backend="pyav")
    if info.rotation % 180 == 90 and info.width != info.height:
        # decord 0.6 turns the frame but copies it into a buffer of the stored size, and fails
        with pytest.raises(V.VideoDecodeError, match=f"rotated by {info.rotation} degrees"):
            V.read_frames(path, [0], backend="decord")
    else:
        assert np.array_equal(V.read_frames(path, [0, 5, 23], backend="decord"), pyav)
    assert np.array_equal(V.read_frames(path, [0, 5, 23]), pyav)
    batches = np.concatenate(list(V.iter_frame_batches(path, batch_size=10, backend="pyav")))
    assert np.array_equal(batches[[0, 5, 23]], pyav)


@pytest.mark.requires("ffmpeg")
@pytest.mark.parametrize("case", ROTATIONS, ids=lambda c: f"{c[0]}deg-{c[2]}x{c[1]}")
def test_rotated_video_matches_ffmpeg(rotated, case):
    """The outside reference: ffprobe's rotation, and the frames the ffmpeg binary displays (autorotate)."""
    path = rotated[case]
    info = V.probe_video(path)
    probe = json.loads(subprocess.run(["ffprobe", "-v", "error", "-select_streams", "v:0", "-show_streams",
                                       "-of", "json", str(path)], capture_output=True, text=True,
                                      timeout=60, check=True).stdout)["streams"][0]
    matrix = [s for s in probe.get("side_data_list", []) if "rotation" in s]
    assert matrix and int(matrix[0]["rotation"]) % 360 == info.rotation
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-f", "rawvideo", "-pix_fmt", "rgb24", "-"],
                         capture_output=True, timeout=60, check=True).stdout
    shown = np.frombuffer(raw, np.uint8).reshape(-1, info.height, info.width, 3)
    ours = V.read_frames(path, list(range(info.num_frames)))
    assert shown.shape == ours.shape
    # the same decoder output through two swscale versions: at most a rounding step apart
    assert np.abs(shown.astype(np.int16) - ours).max() <= 2


def _rotate_tagged_mkv(path: Path) -> Path:
    """A Matroska file with a ROTATE tag of 90 and no display matrix (48x96 stored)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=24, options=X264)
        stream.height, stream.width, stream.pix_fmt = 48, 96, "yuv420p"
        stream.metadata["rotate"] = "90"
        for rgb in _quadrants(6, 48, 96):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")))
        container.mux(stream.encode(None))
    return path


def test_bare_rotate_tag_is_ignored_as_ffmpeg_ignores_it(tmp_path):
    """A Matroska ROTATE tag without a display matrix: PyAV's FFmpeg reports no rotation, so neither do we."""
    path = _rotate_tagged_mkv(tmp_path / "tagged.mkv")
    with av.open(str(path)) as container:
        assert "90" in container.streams.video[0].metadata.values()  # the tag is there
        assert next(container.decode(video=0)).rotation == 0  # and FFmpeg does not turn the frame for it
    info = V.probe_video(path)
    assert (info.width, info.height, info.rotation) == (96, 48, 0)


@pytest.mark.requires("ffmpeg")
def test_bare_rotate_tag_is_ignored_by_the_ffmpeg_binary(tmp_path):
    """The outside reference for the case above: the ffmpeg binary outputs the stored 96x48 frame, unturned."""
    path = _rotate_tagged_mkv(tmp_path / "tagged.mkv")
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(path), "-frames:v", "1", "-f", "rawvideo",
                          "-pix_fmt", "rgb24", "-"], capture_output=True, timeout=60, check=True).stdout
    assert len(raw) == 48 * 96 * 3 and np.frombuffer(raw, np.uint8).reshape(48, 96, 3)[0, 0, 0] > 150


def test_rotated_video_size_in_cli_and_app(rotated, web, capsys):
    path = rotated[(90, 48, 96)]
    assert main(["ask", str(path), "what happens?", *FAST, "--json"]) == 0
    video = json.loads(capsys.readouterr().out)["video"]
    assert (video["width"], video["height"], video["rotation"]) == (48, 96, 90)
    state, messages, status = web.load_video(str(path), 4, 1, "stan", None)
    assert state.chat is not None and "48x96" in status, (messages, status)


# --------------------------------------------------------------------------- #
# 2. MPEG-TS, also renamed to .mp4
# --------------------------------------------------------------------------- #
@pytest.fixture(scope="module")
def transport_streams(tmp_path_factory):
    out = tmp_path_factory.mktemp("ts")
    frames = _quadrants(120, 48, 64)
    frames[:, 20:28, :, 2] = np.arange(120, dtype=np.uint8)[:, None, None] * 2  # every frame differs
    ts = out / "clip.ts"
    V.write_video(ts, frames, fps=24, options=X264)
    renamed = out / "clip_ts.mp4"
    shutil.copy(ts, renamed)
    with av.open(str(ts)) as container:  # the reference: PyAV decoding every frame in order, no seeking
        reference = np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])
    return ts, renamed, reference


def test_mpeg_ts_reads_the_right_frames(transport_streams):
    ts, renamed, reference = transport_streams
    wanted = [0, 5, 13, 60, 61, 119]
    for path in (ts, renamed):
        info = V.probe_video(path)
        assert info.container == "mpegts" and info.num_frames == len(reference) == 120
        assert np.array_equal(V.read_frames(path, wanted), reference[wanted])
        assert np.array_equal(V.read_frames(path, wanted, backend="pyav"), reference[wanted])
        if V.decord_available():  # decord's seeking in TS returns other frames than asked: refused
            with pytest.raises(V.VideoDecodeError, match="mpegts"):
                V.read_frames(path, wanted, backend="decord")


def test_pyav_falls_back_to_sequential_decoding_when_a_seek_misses(transport_streams):
    ts, _, reference = transport_streams
    wanted = [0, 30, 119]
    with av.open(str(ts)) as container:  # what seeking alone gives on this file
        stream = container.streams.video[0]
        index = backends.PacketIndex(container, stream)
        with pytest.raises(backends._SeekMissed):
            backends._pyav_decode_wanted(container, stream, index, wanted, Progress())
    out = backends._pyav_read(str(ts), wanted, Progress(), None, rotation=0, seek=True)
    assert all(np.array_equal(out[i], reference[i]) for i in wanted)


def test_mpeg_ts_through_cli_and_app(transport_streams, web, capsys):
    ts, renamed, _ = transport_streams
    assert main(["ask", str(ts), "what happens?", *FAST]) == 0
    assert capsys.readouterr().out.strip()
    for path in (ts, renamed):
        state, messages, status = web.load_video(str(path), 4, 1, "stan", None)
        assert state.chat is not None and "visual tokens" in status, messages


# --------------------------------------------------------------------------- #
# 7. Paths that are not readable files: the message names the real cause
# --------------------------------------------------------------------------- #
def test_symlink_loop_and_broken_symlink(tmp_path):
    loop = tmp_path / "loop.mp4"
    os.symlink(tmp_path / "other.mp4", loop)
    os.symlink(loop, tmp_path / "other.mp4")
    with pytest.raises(V.VideoDecodeError, match="symlink loop"):
        V.probe_video(loop)
    dangling = tmp_path / "dangling.mp4"
    os.symlink(tmp_path / "gone.mp4", dangling)
    with pytest.raises(V.VideoDecodeError, match="broken symlink"):
        V.probe_video(dangling)
    done = _run(["-m", "mugstan_chat.entrypoints.cli", "ask", str(loop), "q", "--demo"])
    _assert_one_line_error(done, "loop.mp4", "symlink loop")


def test_unreadable_file_says_permission_denied(tmp_path, rotated):
    """A real EACCES: as root, the read runs with CAP_DAC_OVERRIDE dropped (util-linux setpriv),
    which is what makes root obey file modes; as another user chmod 000 is enough."""
    locked = tmp_path / "locked.mp4"
    shutil.copy(rotated[(180, 48, 96)], locked)
    locked.chmod(0)
    prefix: tuple = ()
    if os.geteuid() == 0:
        prefix = ("setpriv", "--bounding-set=-dac_override,-dac_read_search")
        if shutil.which("setpriv") is None or subprocess.run([*prefix, "true"], capture_output=True).returncode:
            pytest.skip("running as root without a working setpriv: cannot make a permission error")
    try:
        done = _run(["-m", "mugstan_chat.entrypoints.cli", "ask", str(locked), "q", "--demo"], prefix=prefix)
    finally:
        locked.chmod(0o644)
    _assert_one_line_error(done, "locked.mp4", "permission denied")


def test_permission_error_on_open_is_named(tmp_path, monkeypatch, rotated):
    """The same mapping at its seam (the open in check_file), independent of who runs the tests."""
    def refuse(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", path)

    monkeypatch.setattr(video_limits, "open", refuse, raising=False)
    with pytest.raises(V.VideoDecodeError, match="permission denied") as error:
        V.probe_video(rotated[(180, 48, 96)])
    assert "rot180" in str(error.value) and "pyav" not in str(error.value)


# --------------------------------------------------------------------------- #
# 5. A literal <image> in a question
# --------------------------------------------------------------------------- #
def test_literal_image_token_in_a_question_is_answered(rotated, chat_model, capsys):
    from mugstan_chat.engine.conversation import ChatSession

    session = ChatSession(Engine(chat_model), rotated[(180, 48, 96)], frames=4, clips=2)
    session.generation.max_new_tokens = 4
    question = "is there an <image> tag in <image>?"
    assert isinstance(session.ask(question), str)
    assert session.history[-1][0] == question  # the conversation keeps the user's words
    image_id = chat_model.processor.tokenizer.convert_tokens_to_ids(chat_model.processor.image_token)
    prompt = session.build_prompt("and <image>?")["input_ids"]  # two turns, three literal <image>
    assert int((prompt == image_id).sum()) == session.visual_tokens  # only the video's placeholders
    assert main(["ask", str(rotated[(180, 48, 96)]), "what is <image>?", *FAST]) == 0
    assert capsys.readouterr().out.strip()


# --------------------------------------------------------------------------- #
# 3 and 8. Settings out of range: refused by argparse (exit 2), before any model loads
# --------------------------------------------------------------------------- #
BAD_SETTINGS = [("--frames", "65"), ("--frames", "0"), ("--clips", "9"), ("--max-new-tokens", "4097"),
                ("--temperature", "-1"), ("--temperature", "nan"), ("--temperature", "inf"), ("--top-p", "0"),
                ("--top-p", "1.5"), ("--repetition-penalty", "inf"), ("--repetition-penalty", "0"),
                ("--frames", "eight")]


@pytest.fixture
def no_loading(monkeypatch):
    """Any model load or video probe during a usage error is a failure."""
    import mugstan_chat.llava.loader
    import mugstan_chat.video

    def forbidden(*args, **kwargs):
        raise AssertionError("usage errors must be caught before any model loads or video is read")

    monkeypatch.setattr(mugstan_chat.llava.loader, "load_chat_model", forbidden)
    monkeypatch.setattr(mugstan_chat.video, "probe_video", forbidden)


@pytest.mark.parametrize("flag,value", BAD_SETTINGS)
def test_out_of_range_settings_are_usage_errors(flag, value, no_loading, capsys):
    for argv in (["ask", "absent.mp4", "q", "--demo", flag, value], ["chat", "absent.mp4", "--demo", flag, value]):
        with pytest.raises(SystemExit) as done:
            main(argv)
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {flag}:" in err.splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("flag,value", [("--max-new-tokens", "4097"), ("--frames", "65"), ("--clips", "9"),
                                        ("--temperature", "nan"), ("--port", "70000")])
def test_app_refuses_what_its_page_would_refuse(flag, value, no_loading, capsys):
    from mugstan_chat.entrypoints import web as app_module

    with pytest.raises(SystemExit) as done:
        app_module.main(["--demo", flag, value])
    assert done.value.code == 2 and f"argument {flag}:" in capsys.readouterr().err


def test_sliders_take_their_ranges_from_the_same_bounds(chat_model):
    """Whatever argparse accepts, the page accepts: each slider spans exactly its option's range."""
    import gradio as gr

    from mugstan_chat import options
    from mugstan_chat.entrypoints import web as app_module

    settings = app_module.AppSettings(examples_dir=None, frames=options.FRAMES.high, clips=options.CLIPS.high,
                                      max_new_tokens=options.MAX_NEW_TOKENS.high, temperature=options.TEMPERATURE.high,
                                      top_p=options.TOP_P.low)
    demo = app_module.build_demo(Engine(chat_model), settings)
    sliders = {b.label: b for b in demo.blocks.values() if isinstance(b, gr.Slider)}
    expected = {"Frames per clip (T)": options.FRAMES, "Clips (C)": options.CLIPS,
                "Max new tokens": options.MAX_NEW_TOKENS, "Temperature (0 = greedy)": options.TEMPERATURE,
                "Top-p": options.TOP_P, "Candidate clips (M) to rank": options.CANDIDATES}
    select = sliders.pop("Select K clips per question (0 = uniform clips)")  # K of SELECT, or 0: no selection
    assert (select.minimum, select.maximum) == (0, options.SELECT.high)
    assert set(sliders) == set(expected)
    for label, allowed in expected.items():
        slider = sliders[label]
        assert (slider.minimum, slider.maximum) == (allowed.low, allowed.high), label
        assert slider.preprocess(slider.value) == slider.value  # the extreme default passes the page's check
        with pytest.raises(gr.Error):
            slider.preprocess(allowed.high + 1)


# --------------------------------------------------------------------------- #
# 8. /help in chat
# --------------------------------------------------------------------------- #
def test_chat_help_lists_the_commands_instead_of_asking_the_model(rotated, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("/help\n/frobnicate\nwhat happens?\n/exit\n"))
    assert main(["chat", str(rotated[(180, 48, 96)]), *FAST]) == 0
    out, err = capsys.readouterr()
    answers = [line for line in out.splitlines() if line.startswith("assistant> ")]
    assert len(answers) == 1  # only the real question reached the model
    assert "/reset" in err and "/exit" in err and "unknown command /frobnicate" in err


# --------------------------------------------------------------------------- #
# 9. --help imports neither torch nor transformers
# --------------------------------------------------------------------------- #
def test_help_does_not_import_torch():
    code = ("import sys\n"
            "import mugstan_chat.entrypoints.cli as cli\n"
            "for args in ([], ['ask'], ['chat']):\n"
            "    parser = cli.build_parser()\n"
            "    text = parser.format_help() if not args else parser._subparsers._group_actions[0]"
            ".choices[args[0]].format_help()\n"
            "import mugstan_chat.entrypoints.web as web\n"
            "web.build_parser().format_help()\n"
            "heavy = sorted(m for m in ('torch', 'transformers', 'gradio', 'av', 'decord') if m in sys.modules)\n"
            "print(heavy)\n")
    done = _run(["-c", code])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    shown = _run(["-m", "mugstan_chat.entrypoints.cli", "ask", "--help"])
    assert shown.returncode == 0 and "--frames" in shown.stdout and "1..64" in shown.stdout


# --------------------------------------------------------------------------- #
# 4. Forgetting --demo without a network: seconds, one line naming --demo and HF_HUB_OFFLINE
# --------------------------------------------------------------------------- #
def test_offline_without_the_model_fails_in_one_line(rotated, tmp_path):
    env = {**ENV, "HF_HOME": str(tmp_path / "empty_hf_home")}  # nothing cached; offline mode: no network
    for argv in (["-m", "mugstan_chat.entrypoints.cli", "ask", str(rotated[(180, 48, 96)]), "what happens?"],
                 ["app.py", "--port", str(free_port())]):
        done = _run(argv, env=env, timeout=90)
        prog = "mugstan-chat" if "-m" in argv else "app.py"
        _assert_one_line_error(done, prog, "--demo", "HF_HUB_OFFLINE", "llava-hf/llava-1.5-7b-hf")


def test_unreachable_hub_without_the_model_fails_before_any_download(monkeypatch):
    """The probe is replaced (tests never touch the network): unreachable, nothing cached."""
    from mugstan_chat.model import hub
    from mugstan_chat.llava.loader import ModelLoadError, load_chat_model

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    probes = []
    monkeypatch.setattr(hub, "hub_reachable", lambda: probes.append(1) or False)
    monkeypatch.setattr(hub, "is_cached", lambda repo: False)
    with pytest.raises(ModelLoadError) as error:
        load_chat_model("someone/some-llava", device="cpu")
    message = str(error.value)
    assert probes == [1] and "\n" not in message
    assert "someone/some-llava" in message and "--demo" in message and "HF_HUB_OFFLINE" in message
    with pytest.raises(hub.HubUnavailable, match="no such directory"):  # a mistyped local path
        hub.resolve_hub_access("./runs/missing-llava")
    assert probes == [1]
    monkeypatch.setattr(hub, "is_cached", lambda repo: True)  # cached: load from the cache, no download
    assert hub.resolve_hub_access("someone/some-llava") is True
    monkeypatch.setattr(hub, "hub_reachable", lambda: True)
    assert hub.resolve_hub_access("someone/some-llava") is False


# --------------------------------------------------------------------------- #
# 6. A port in use
# --------------------------------------------------------------------------- #
@pytest.fixture
def busy_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        yield sock.getsockname()[1]


def test_port_taken_while_loading_is_one_line(busy_port, monkeypatch, capsys):
    """Gradio's own failure to bind (the port was free when checked) gives the same one line.

    (A port already busy at startup is a usage error before loading: tests/entrypoints/test_front_end_flags.py.)"""
    from mugstan_chat.entrypoints import network, serving_args
    from mugstan_chat.entrypoints import web as app_module

    assert network.port_in_use("127.0.0.1", busy_port)  # what the startup check sees
    monkeypatch.setattr(serving_args, "port_in_use", lambda host, port: None)
    assert app_module.main(["--demo", "--port", str(busy_port), "--no-examples"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("app.py: error: cannot listen on") and "--port" in err[-1]
    assert not any("Traceback" in line for line in err)
