"""`mugstan-chat serve` end to end: a live server on 127.0.0.1 (demo model, CPU) in a subprocess,
driven by the real `openai` client. One server per module; it is always terminated."""

from __future__ import annotations

import base64
import json
import shutil
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

from live_process import serve_demo
from mugstan_chat.engine.conversation import ChatSession, GenerationSettings
from mugstan_chat.engine.engine import Engine

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"
KEY = "test-key-123"
FRAMES = 4  # the server's T; conftest's chat_model (the same demo model, T = 4, in this process) is the reference
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """The allowed folder (two videos, a text file posing as a video, two symlinks out) and a video outside it."""
    allowed = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("outside")
    for name in ("red_triangle_growing.mp4", "blue_triangle_left.mp4", "blue_triangle_right.mp4"):
        shutil.copy(EXAMPLES / name, allowed / name)
    shutil.copy(EXAMPLES / "red_triangle_shrinking.mp4", outside / "secret.mp4")
    (allowed / "escape.mp4").symlink_to(outside / "secret.mp4")
    (allowed / "passwd.mp4").symlink_to("/etc/passwd")
    (allowed / "notes.mp4").write_text("not a video\n")
    return {"allowed": allowed, "outside": outside}


@pytest.fixture(scope="module")
def server(media, tmp_path_factory):
    """Base URL of a live server: --concurrency 1 --queue-size 0 (a second request while one runs gets 429)."""
    yield from serve_demo(tmp_path_factory.mktemp("log") / "server.log", "--api-key", KEY,
                          "--allowed-local-media-path", str(media["allowed"]), "--frames", str(FRAMES),
                          "--max-new-tokens", str(MAX_TOKENS), "--concurrency", "1", "--queue-size", "0",
                          "--max-body-mb", "1")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key=KEY, max_retries=0, timeout=60)


def _file_url(path: Path) -> str:
    return "file://" + str(path)


def _data_url(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


def _messages(url: str, question: str, kind: str = "video_url") -> list[dict]:
    return [{"role": "user", "content": [{"type": kind, kind: {"url": url}}, {"type": "text", "text": question}]}]


def _health(server) -> dict:
    return httpx.get(f"{server}/health", timeout=10).json()


def _await_running(server, busy: bool, timeout_s: float = 30) -> None:
    """Polls /health until a request runs (``busy``) or none does, or ``timeout_s`` passed: the caller asserts."""
    deadline = time.monotonic() + timeout_s
    while bool(_health(server)["running"]) != busy and time.monotonic() < deadline:
        time.sleep(0.02)


def _reference(chat_model, video: Path, question: str) -> tuple[str, object]:
    session = ChatSession(Engine(chat_model), video, frames=FRAMES, generation=GenerationSettings(max_new_tokens=MAX_TOKENS))
    return session.ask(question), session.last_stats


def test_models_health_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == ["demo"]
    health = _health(server)  # open without a key, for probes
    assert health["status"] == "ok" and health["concurrency"] == 1 and health["queue_size"] == 0
    wrong = openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.models.list()
    assert caught.value.status_code == 401 and caught.value.code == "invalid_api_key"
    bare = httpx.post(f"{server}/v1/chat/completions", json={"messages": []}, timeout=10)  # no header at all
    assert bare.status_code == 401 and set(bare.json()["error"]) == {"message", "type", "param", "code"}


def test_answer_equals_chat_session_and_usage(media, client, chat_model):
    video = media["allowed"] / "red_triangle_growing.mp4"
    question = "what happens in the video?"
    expected, stats = _reference(chat_model, video, question)
    response = client.chat.completions.create(model="demo", messages=_messages(_file_url(video), question),
                                              temperature=0, max_tokens=MAX_TOKENS)
    choice = response.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == expected
    usage = response.usage
    assert usage.prompt_tokens == stats.prompt_tokens and usage.completion_tokens == stats.new_tokens
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert choice.finish_reason == ("length" if stats.new_tokens == MAX_TOKENS else "stop")
    info = response.model_extra["mugstan"]
    assert info["visual_tokens"] == stats.visual_tokens and info["frames"] == FRAMES and info["clips"] == 1
    assert set(info["timings_ms"]) == {"fetch", "decode", "encode", "first_token", "total"}


def test_streaming_data_url_equals_whole_answer(media, client, chat_model):
    video = media["allowed"] / "red_triangle_growing.mp4"
    question = "describe the scene"
    expected, stats = _reference(chat_model, video, question)
    client.chat.completions.create(model="demo", messages=_messages(_file_url(video), question))  # cached now
    stream = client.chat.completions.create(model="demo", messages=_messages(_data_url(video), question),
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([d for d in deltas if d]) > 1  # really streamed
    assert "".join(deltas) == expected
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].model_extra["mugstan"]["cached_features"] is True  # same bytes, other URL
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == stats.new_tokens
    assert chunks[-1].usage.prompt_tokens == stats.prompt_tokens


def test_stream_wire_format_ends_with_done(server, media):
    body = {"model": "demo", "stream": True, "max_tokens": 3,
            "messages": _messages(_file_url(media["allowed"] / "red_triangle_growing.mp4"), "what?")}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=30,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events) and events[-1] == "data: [DONE]"
    objects = [json.loads(line[6:]) for line in events[:-1]]
    assert {o["object"] for o in objects} == {"chat.completion.chunk"} and len({o["id"] for o in objects}) == 1


def test_second_question_does_not_decode_or_encode_again(server, media, client):
    video = media["allowed"] / "blue_triangle_left.mp4"  # not asked about before
    before = _health(server)["counters"]["video_encodes"]
    first = client.chat.completions.create(model="demo", messages=_messages(_file_url(video), "what moves?"))
    assert first.model_extra["mugstan"]["cached_features"] is False
    assert _health(server)["counters"]["video_encodes"] == before + 1
    follow_up = _messages(_file_url(video), "what moves?") + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "and then?"}]
    second = client.chat.completions.create(model="demo", messages=follow_up)
    timings = second.model_extra["mugstan"]["timings_ms"]
    assert second.model_extra["mugstan"]["cached_features"] is True and timings["decode"] == timings["encode"] == 0
    assert second.usage.prompt_tokens > first.usage.prompt_tokens  # the history is in the prompt
    third = client.chat.completions.create(model="demo", messages=_messages(_data_url(video), "what moves?"))
    assert third.model_extra["mugstan"]["cached_features"] is True  # same bytes, other URL: same features
    assert third.choices[0].message.content == first.choices[0].message.content
    assert _health(server)["counters"]["video_encodes"] == before + 1
    other_frames = client.chat.completions.create(model="demo", messages=_messages(_file_url(video), "what moves?"),
                                                  extra_body={"media_io_kwargs": {"video": {"num_frames": 2}}})
    assert other_frames.model_extra["mugstan"]["cached_features"] is False
    assert other_frames.model_extra["mugstan"]["frames"] == 2
    assert _health(server)["counters"]["video_encodes"] == before + 2


def test_image_url_is_answered(client):
    from PIL import Image
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    response = client.chat.completions.create(model="demo", messages=_messages(url, "what colour?", "image_url"))
    info = response.model_extra["mugstan"]
    assert response.choices[0].message.content and info["temporal"] == "image" and info["visual_tokens"] == 16
    assert not info["cached_features"] and info["timings_ms"]["encode"] > 0
    again = client.chat.completions.create(model="demo", messages=_messages(url, "what shape?", "image_url"))
    assert again.model_extra["mugstan"]["cached_features"] and again.model_extra["mugstan"]["timings_ms"]["encode"] == 0


def test_text_only_requests_are_answered_by_the_language_model(client, chat_model):
    """A chat front end's title request, or a question before the video is attached: no media, no 400."""
    reference = ChatSession(Engine(chat_model), "text", text_only=True, generation=GenerationSettings(max_new_tokens=MAX_TOKENS))
    first = reference.ask("what is a video ?")
    second = reference.ask("and a frame ?")
    messages = [{"role": "user", "content": "what is a video ?"}, {"role": "assistant", "content": first},
                {"role": "user", "content": [{"type": "text", "text": "and a frame ?"}]}]
    response = client.chat.completions.create(model="demo", messages=messages, max_tokens=MAX_TOKENS)
    info = response.model_extra["mugstan"]
    assert response.choices[0].message.content == second and response.usage.prompt_tokens == reference.last_stats.prompt_tokens
    assert info["temporal"] == "text" and info["visual_tokens"] == 0 and info["cached_features"] is False
    stream = client.chat.completions.create(model="demo", messages=messages[:1], max_tokens=MAX_TOKENS, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == first


def _bad(client, messages, **kwargs) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=kwargs.pop("model", "demo"), messages=messages, **kwargs)
    return caught.value


def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, media, client):
    allowed = media["allowed"]
    video = _file_url(allowed / "red_triangle_growing.mp4")
    cases = [
        (_bad(client, _messages(video, "what?"), n=2), 400, "n", None),
        (_bad(client, _messages("ftp://example.com/a.mp4", "what?")), 400, None, "unsupported_url_scheme"),
        (_bad(client, _messages("file:///etc/passwd", "what?")), 400, None, "local_media_not_allowed"),
        (_bad(client, _messages(_file_url(allowed / "escape.mp4"), "what?")), 400, None, "local_media_not_allowed"),
        (_bad(client, _messages(_file_url(allowed / "passwd.mp4"), "what?")), 400, None, "local_media_not_allowed"),
        (_bad(client, _messages(_file_url(allowed / ".." / media["outside"].name / "secret.mp4"), "what?")),
         400, None, "local_media_not_allowed"),
        (_bad(client, _messages(_file_url(allowed / "missing.mp4"), "what?")), 400, None, "media_not_found"),
        (_bad(client, _messages(_file_url(allowed / "notes.mp4"), "what?")), 400, None, "invalid_video"),
        (_bad(client, _messages("http://example.com/a.mp4", "what?")), 400, None, "media_domain_not_allowed"),
        (_bad(client, _messages("data:video/mp4;base64,@@@", "what?")), 400, None, "invalid_media_url"),
        (_bad(client, [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": video}}] * 2}]),
         400, "messages", None),
        (_bad(client, _messages(video, "what?"), model="gpt-4o"), 404, "model", "model_not_found"),
        (_bad(client, _messages(video, "what?"), extra_body={"mugstan": {"temporal": "bogus"}}), 400, None, None),
        (_bad(client, _messages(video, "what?"), extra_body={"mugstan": {"clipz": 2}}), 400, None, None),
        (_bad(client, _messages(video, "what? " * 2100)), 400, "messages", "context_length_exceeded"),
    ]
    for error, status, param, code in cases:
        assert error.status_code == status, error
        body = error.body
        assert set(body) == {"message", "type", "param", "code"} and body["message"], body
        assert param is None or body["param"] == param, body
        assert code is None or body["code"] == code, body
    messages = [e.body["message"] for e, *_ in cases]
    assert "'ftp'" in messages[1]  # names the scheme
    assert "secret" not in json.dumps(messages[3:5])  # never says where a link points
    invalid_json = httpx.post(f"{server}/v1/chat/completions", content=b"{not json", timeout=10,
                              headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert invalid_json.status_code == 400 and invalid_json.json()["error"]["type"] == "invalid_request_error"
    unknown = httpx.get(f"{server}/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
    assert unknown.status_code == 404 and "error" in unknown.json()
    assert client.chat.completions.create(model="demo", messages=_messages(video, "still there?")).choices
    assert _health(server)["running"] == 0


def test_body_over_limit_gets_413(server, client):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model="demo", messages=_messages("data:video/mp4;base64," + "A" * (2 << 20),
                                                                          "what?"))
    assert caught.value.status_code == 413 and caught.value.code == "request_too_large"


def test_busy_server_answers_429_and_a_disconnect_frees_the_slot(server, media, client):
    video = _file_url(media["allowed"] / "red_triangle_growing.mp4")
    long_answer = 1500  # far more than can be generated before the client hangs up
    before = _health(server)["counters"]
    stream = client.chat.completions.create(model="demo", messages=_messages(video, "tell me everything"),
                                            max_tokens=long_answer, stream=True)
    pieces = iter(stream)
    next(pieces), next(pieces)  # generating now, holding the only slot
    assert _health(server)["running"] == 1
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model="demo", messages=_messages(video, "me too"))
    assert caught.value.status_code == 429 and caught.value.code == "rate_limit_exceeded"
    stream.close()  # the client goes away mid-answer
    _await_running(server, busy=False)
    after = _health(server)["counters"]
    assert _health(server)["running"] == 0
    assert after["cancelled"] == before["cancelled"] + 1
    assert after["completion_tokens"] - before["completion_tokens"] < long_answer  # generation really stopped
    assert client.chat.completions.create(model="demo", messages=_messages(video, "next")).choices  # slot is free


def test_non_streamed_request_whose_client_leaves_is_cancelled(server, media):
    """A client that hangs up before a whole answer is ready: generation stops and the slot is freed."""
    long_answer = 1500
    before = _health(server)["counters"]
    body = json.dumps({"model": "demo", "max_tokens": long_answer, "messages": _messages(
        _file_url(media["allowed"] / "red_triangle_growing.mp4"), "tell me everything")}).encode()
    host, port = server.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     + f"Authorization: Bearer {KEY}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        _await_running(server, busy=True)
        assert _health(server)["running"] == 1
    finally:
        sock.close()
    _await_running(server, busy=False)
    after = _health(server)["counters"]
    assert _health(server)["running"] == 0 and after["cancelled"] == before["cancelled"] + 1
    assert after["completion_tokens"] - before["completion_tokens"] < long_answer
