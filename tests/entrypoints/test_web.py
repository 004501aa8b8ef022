"""Callbacks of the web app (app.py) on the demo model: no browser, no server."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mugstan_chat.entrypoints import web as app_module
from web_driver import ask as _ask, load as _load
from mugstan_chat.engine.conversation import ConversationTooLong
from mugstan_chat.llava.loader import load_chat_model
from mugstan_chat.engine.engine import Engine



@pytest.fixture(scope="module")
def chat_model(demo_chat_model):
    return demo_chat_model(8)  # the loader's default T


@pytest.fixture(scope="module")
def videos(synthetic_videos):
    return [str(path) for path, _ in synthetic_videos(2, seed=0, frames=16).videos]


@pytest.fixture()
def app(chat_model):
    settings = app_module.AppSettings(max_new_tokens=12, max_upload_mb=1.0, max_video_seconds=60.0)
    return app_module.ChatApp(Engine(chat_model), settings)


def test_upload_ask_stream_follow_up(app, videos):
    state, messages, status = _load(app, videos[0])
    assert messages == [] and state.chat is not None
    assert "visual tokens" in status and Path(videos[0]).name in status
    state, texts = _ask(app, state, "what happens in the video?")
    assert len(texts) > 3, "the answer must stream in pieces"
    assert len(texts[1]) <= len(texts[-2]), "pieces accumulate"
    first = texts[-1]
    assert "visual tokens" in first and "decode" in first and "first token" in first and "total" in first
    state, texts = _ask(app, state, "and then?")
    assert "video features cached" in texts[-1]  # follow-up reuses the encoded video
    assert [m["role"] for m in state.messages] == ["user", "assistant"] * 2
    assert [q for q, _ in state.chat.history] == ["what happens in the video?", "and then?"]
    assert state.chat.engine.model.tower.calls >= 1


def test_clear_keeps_video_and_regenerate_replaces_answer(app, videos):
    state, _, _ = _load(app, videos[0])
    state, _ = _ask(app, state, "what happens?")
    calls = app.engine.model.tower.calls
    state, messages = app.clear(state)
    assert messages == [] and state.chat.history == [] and state.chat is not None
    state, _ = _ask(app, state, "what moves?")
    *_, (messages, state, _) = app.regenerate(state, 12, 0.0, 1.0)
    assert [m["role"] for m in messages] == ["user", "assistant"]
    assert len(state.chat.history) == 1 and state.chat.history[0][0] == "what moves?"
    assert app.engine.model.tower.calls == calls, "clear and regenerate must not re-encode the video"


def test_ask_without_video_and_empty_question(app):
    state, texts = _ask(app, None, "hello?")
    assert "Upload a video first" in texts[-1]
    state, texts = _ask(app, state, "   ")
    assert len(state.messages) == 2  # the empty question added nothing


def test_bad_upload_reports_error_and_app_keeps_working(app, videos, tmp_path):
    fake = tmp_path / "notes.mp4"
    fake.write_text("this is a text file, not a video\n" * 20)
    state, messages, status = _load(app, str(fake))
    assert state.chat is None and "not loaded" in status
    assert messages[-1]["role"] == "assistant" and "Cannot use this video" in messages[-1]["content"]
    assert "notes.mp4" in messages[-1]["content"] and str(tmp_path) not in messages[-1]["content"]
    state, texts = _ask(app, state, "what happens?")
    assert "Upload a video first" in texts[-1]
    state, _, _ = _load(app, videos[1], state)
    state, texts = _ask(app, state, "what happens?")
    assert "visual tokens" in texts[-1]


def test_oversize_upload_refused_before_decoding(chat_model, videos, monkeypatch):
    import mugstan_chat.video as video

    def no_decoding(*args, **kwargs):
        raise AssertionError("an oversize upload must be refused before decoding")

    monkeypatch.setattr(video, "probe_video", no_decoding)
    monkeypatch.setattr(video, "load_video_clips", no_decoding)
    app = app_module.ChatApp(Engine(chat_model), app_module.AppSettings(max_upload_mb=0.001))  # ~1 KB
    state, messages, _ = _load(app, videos[0])
    assert state.chat is None and "limit is 0.001 MB" in messages[-1]["content"]


def test_too_long_video_and_unsupported_type(chat_model, videos, tmp_path):
    app = app_module.ChatApp(Engine(chat_model), app_module.AppSettings(max_video_seconds=0.5))
    state, messages, _ = _load(app, videos[0])
    assert state.chat is None and "exceeds the limit" in messages[-1]["content"]
    other = tmp_path / "clip.txt"
    other.write_bytes(Path(videos[0]).read_bytes())
    state, messages, _ = _load(app, str(other), state)
    assert "unsupported file type" in messages[-1]["content"]


def test_sessions_are_isolated(app, videos):
    a, _, _ = _load(app, videos[0])
    b, _, _ = _load(app, videos[1])
    a, _ = _ask(app, a, "what colour is it?")
    b, _ = _ask(app, b, "where does it move?")
    a, _ = _ask(app, a, "and then?")
    assert a.chat is not b.chat and a.messages is not b.messages
    assert a.chat.video_path == videos[0] and b.chat.video_path == videos[1]
    assert [q for q, _ in a.chat.history] == ["what colour is it?", "and then?"]
    assert [q for q, _ in b.chat.history] == ["where does it move?"]
    assert all("where does it move?" not in m["content"] for m in a.messages)
    app.clear(a)
    assert len(b.chat.history) == 1 and len(b.messages) == 2  # clearing one leaves the other alone


def test_new_video_starts_new_session(app, videos):
    state, _, _ = _load(app, videos[0])
    old = state.chat
    state, _ = _ask(app, state, "what happens?")
    state, messages, _ = _load(app, videos[1], state)
    assert state.chat is not old and messages == [] and state.chat.history == []
    state, messages, status = _load(app, None, state)
    assert state.chat is None and "No video" in status


def test_stop_keeps_partial_answer(app, videos):
    state, _, _ = _load(app, videos[0])
    texts = []
    for messages, state, _ in app.respond("describe the video", state, 40, 0.0, 1.0):
        texts.append(messages[-1]["content"])
        if len(texts) == 3:
            app.stop(state)
    assert "(stopped)" in texts[-1]
    assert state.chat.last_stats.new_tokens < 40
    state, texts = _ask(app, state, "and then?")  # the session is free again
    assert "visual tokens" in texts[-1]


def test_overlong_conversation_is_reported(app, videos, monkeypatch):
    state, _, _ = _load(app, videos[0])

    def too_long(question, generation=None):
        raise ConversationTooLong("2048 tokens")
        yield  # a generator, like ask_stream

    monkeypatch.setattr(state.chat, "ask_stream", too_long)
    state, texts = _ask(app, state, "and then?")
    assert "no longer fits" in texts[-1] and "Clear" in texts[-1]


def test_out_of_memory_is_reported_and_next_request_works(app, videos, monkeypatch):
    state, _, _ = _load(app, videos[0])
    real = state.chat.ask_stream

    def oom(question, generation=None):
        yield "partial"
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(state.chat, "ask_stream", oom)
    state, texts = _ask(app, state, "what happens?")
    assert "ran out of memory" in texts[-1]
    monkeypatch.setattr(state.chat, "ask_stream", real)
    state, texts = _ask(app, state, "what happens?")
    assert "visual tokens" in texts[-1]


def test_generation_error_is_reported(app, videos, monkeypatch):
    state, _, _ = _load(app, videos[0])

    def broken(question, generation=None):
        raise RuntimeError("device-side assert")
        yield

    monkeypatch.setattr(state.chat, "ask_stream", broken)
    state, texts = _ask(app, state, "what happens?")
    assert "Something went wrong" in texts[-1] and "device-side assert" in texts[-1]


def test_temporal_mode_is_per_session(app, videos):
    tower = app.engine.model.tower
    stan, _, _ = _load(app, videos[0], temporal="stan")
    mean, _, status = _load(app, videos[0], temporal="mean")
    assert tower.mode == "stan", "a session's mode never changes the shared tower"
    assert "temporal `mean`" in status
    assert not torch.allclose(stan.chat.features[0], mean.chat.features[0])


def test_notices_and_mean_only_model(app, videos):
    assert "demo model" in app.notice() and app.temporal_modes == ["stan", "mean"]
    mean_model = load_chat_model(demo=True, device="cpu", temporal="mean")
    mean_app = app_module.ChatApp(Engine(mean_model))
    assert mean_app.temporal_modes == ["mean"] and "no STAN branch" in mean_app.notice()
    state, messages, _ = _load(mean_app, None)
    state, messages, _ = mean_app.load_video(videos[0], 4, 1, "stan", state)
    assert "not available" in messages[-1]["content"]


def test_build_demo_and_parser(chat_model):
    import gradio as gr

    demo = app_module.build_demo(Engine(chat_model), app_module.AppSettings())
    assert isinstance(demo, gr.Blocks)
    args = app_module.build_parser().parse_args(
        ["--demo", "--stan", "branch", "--temporal", "mean", "--frames", "4", "--clips", "2", "--load-8bit",
         "--port", "7999", "--auth", "u:p", "--max-upload-mb", "5", "--concurrency", "2", "--queue-size", "3"])
    assert (args.demo, args.stan, args.temporal, args.frames, args.clips, args.load_8bit) == \
        (True, "branch", "mean", 4, 2, True)
    assert (args.host, args.port, args.share, args.max_upload_mb, args.concurrency, args.queue_size) == \
        ("127.0.0.1", 7999, False, 5.0, 2, 3)
    assert app_module.parse_auth("alice:se:cret") == ("alice", "se:cret")
    with pytest.raises(SystemExit):
        app_module.main(["--demo", "--auth", "nopassword"])
