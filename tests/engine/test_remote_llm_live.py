"""`mugstan-chat serve --llm-url` against a faulty language model server (issue 27): a live server in a
subprocess (demo model, CPU) in front of a fake OpenAI-compatible server on loopback (tests/fake_llm.py),
driven by the `openai` client. Every fault is an OpenAI-shaped error with a documented code, and the
server keeps serving: /health answers, and so does the next request (--concurrency 1: the slot is free).
Start-up faults of the fake's /v1/models are one line and exit 1 in every front end that takes --llm-url."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import httpx
import openai
import pytest

import fake_llm as fake
from live_process import free_port, serve_demo
from mugstan_chat.entrypoints import cli

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
STARTUP_TIMEOUT_S = 90
SHORT_TIMEOUT_S = 1.0  # --llm-timeout of the server the stalls are tried on
LONG_TIMEOUT_S = 60.0  # --llm-timeout of the server clients leave: freeing the slot must not wait for it
FOLLOW_UP_S = 5.0  # the next request's own bound: far below LONG_TIMEOUT_S, far above its usual 0.1 s
MESSAGES = [{"role": "user", "content": [
    {"type": "video_url", "video_url": {"url": f"file://{EXAMPLES / 'red_triangle_growing.mp4'}"}},
    {"type": "text", "text": "what happens?"}]}]


@pytest.fixture(scope="module")
def upstream():
    with fake.running() as server:
        yield server


def _serve(upstream, llm_timeout: float, log_path: Path):
    """A live `serve --demo --llm-url` in front of ``upstream``, --concurrency 1 (the generator yields its URL)."""
    yield from serve_demo(log_path, "--allowed-local-media-path", str(EXAMPLES), "--frames", "4",
                          "--max-new-tokens", "8", "--concurrency", "1", "--queue-size", "4", "--llm-url", upstream.url,
                          "--llm-timeout", f"{llm_timeout:g}", timeout_s=STARTUP_TIMEOUT_S)


@pytest.fixture(scope="module")
def server(upstream, tmp_path_factory):
    yield from _serve(upstream, SHORT_TIMEOUT_S, tmp_path_factory.mktemp("log") / "server.log")


@pytest.fixture(scope="module")
def patient_server(upstream, tmp_path_factory):
    yield from _serve(upstream, LONG_TIMEOUT_S, tmp_path_factory.mktemp("log") / "patient.log")


def _client(base: str, timeout: float = 60) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base}/v1", api_key="none", max_retries=0, timeout=timeout)


def _still_serving(base: str, upstream) -> None:
    """/health answers, nothing runs, and the next request is answered in full within FOLLOW_UP_S."""
    health = httpx.get(f"{base}/health", timeout=1).json()
    assert health["status"] == "ok" and health["running"] == 0, health
    upstream.behaviour = "answer"
    answer = _client(base, FOLLOW_UP_S).chat.completions.create(model="demo", messages=MESSAGES)
    assert answer.choices[0].message.content == "hello world"


def _stream(client: openai.OpenAI) -> tuple[list[str], float | None, openai.APIError]:
    """(the text pieces, when the last one came, the error) of a streamed answer that must fail."""
    pieces, last = [], None
    with pytest.raises(openai.APIError) as caught:
        for chunk in client.chat.completions.create(model="demo", messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
                last = time.monotonic()
    return pieces, last, caught.value


def _error_body(error: openai.APIError) -> dict:
    body = error.body if isinstance(error.body, dict) else {}
    assert set(body) == {"message", "type", "param", "code"}, body  # OpenAI's shape (inside "error")
    return body


# ----------------------------------------------------------------------------- a stalled server


def test_a_stalled_stream_ends_within_the_timeout_and_the_next_request_is_served(server, upstream):
    upstream.behaviour = "stalls"  # two words, then nothing
    pieces, last, error = _stream(_client(server))
    ended = time.monotonic()
    assert "".join(pieces) == "hello world"
    assert _error_body(error)["code"] == "llm_timeout" and "--llm-timeout" in error.message
    assert ended - last < SHORT_TIMEOUT_S + 1  # issue 27: within --llm-timeout + 1 s of the last chunk
    _still_serving(server, upstream)


def test_a_server_that_never_answers_is_504(server, upstream):
    upstream.behaviour = "stalls_at_once"
    with pytest.raises(openai.APIStatusError) as caught:
        _client(server).chat.completions.create(model="demo", messages=MESSAGES)
    assert caught.value.status_code == 504 and caught.value.code == "llm_timeout"
    _still_serving(server, upstream)


# ----------------------------------------------------------------------------- what the server sends


@pytest.mark.parametrize("behaviour", ["not_json", "list_chunk", "choices_not_a_list", "content_not_text"])
def test_a_malformed_chunk_is_502_llm_bad_response(server, upstream, behaviour):
    upstream.behaviour = behaviour
    with pytest.raises(openai.APIStatusError) as caught:  # whole answers: an HTTP 502
        _client(server).chat.completions.create(model="demo", messages=MESSAGES)
    assert caught.value.status_code == 502 and caught.value.code == "llm_bad_response"
    assert caught.value.type == "server_error"
    pieces, _, error = _stream(_client(server))  # streamed: the text so far, then the error event
    assert "".join(pieces) == "hello" and _error_body(error)["code"] == "llm_bad_response"
    _still_serving(server, upstream)


def test_a_5xx_is_502_llm_server_error(server, upstream):
    upstream.behaviour = "server_error"
    with pytest.raises(openai.APIStatusError) as caught:
        _client(server).chat.completions.create(model="demo", messages=MESSAGES)
    assert caught.value.status_code == 502 and caught.value.code == "llm_server_error"
    assert "HTTP 500: EngineCore died" in caught.value.message
    pieces, _, error = _stream(_client(server))  # streamed: the role chunk went out first, then the error event
    assert pieces == [] and _error_body(error)["code"] == "llm_server_error"
    _still_serving(server, upstream)


def test_tokens_without_text_still_report_the_first_token(server, upstream):
    """Issue 30: a streamed answer whose tokens decode to nothing has timings_ms.first_token."""
    upstream.behaviour = "empty_tokens"
    chunks = list(_client(server).chat.completions.create(model="demo", messages=MESSAGES, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    info = next(c.model_extra["mugstan"] for c in chunks if (c.model_extra or {}).get("mugstan"))
    assert info["timings_ms"]["first_token"] is not None
    assert 0 < info["timings_ms"]["first_token"] <= info["timings_ms"]["total"]
    _still_serving(server, upstream)


# ----------------------------------------------------------------------------- clients that leave


def test_a_streaming_client_leaving_a_stalled_answer_frees_the_slot_at_once(patient_server, upstream):
    upstream.behaviour = "stalls"
    upstream.hung_up.clear()
    stream = _client(patient_server).chat.completions.create(model="demo", messages=MESSAGES, stream=True)
    pieces = (c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content)
    assert next(pieces) == "hello"
    stream.close()  # the client goes away while vLLM sends nothing
    assert upstream.hung_up.wait(FOLLOW_UP_S)  # the request to vLLM is cancelled (not after --llm-timeout)
    deadline = time.monotonic() + FOLLOW_UP_S
    while httpx.get(f"{patient_server}/health", timeout=1).json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    _still_serving(patient_server, upstream)


def test_a_non_streaming_client_leaving_a_stalled_answer_frees_the_slot_at_once(patient_server, upstream):
    upstream.behaviour = "stalls_at_once"
    upstream.hung_up.clear()
    requests_before = len(upstream.requests)
    body = json.dumps({"model": "demo", "messages": MESSAGES}).encode()
    host, port = patient_server.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    try:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        deadline = time.monotonic() + 30
        while len(upstream.requests) == requests_before and time.monotonic() < deadline:
            time.sleep(0.02)  # until our server has asked the fake (and waits for it)
        assert len(upstream.requests) == requests_before + 1
    finally:
        sock.close()
    assert upstream.hung_up.wait(FOLLOW_UP_S)
    deadline = time.monotonic() + FOLLOW_UP_S
    while httpx.get(f"{patient_server}/health", timeout=1).json()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    _still_serving(patient_server, upstream)


# ----------------------------------------------------------------------------- start-up


@pytest.mark.parametrize("models", ["not_json", "no_ids", "not_a_list"])
@pytest.mark.parametrize("front_end", ["serve", "ask", "chat", "app"])
def test_a_broken_model_list_at_start_up_is_one_line_and_exit_1(front_end, models, app_module, capsys, tmp_path):
    with fake.running(models=models) as bad:
        flags = ["--demo", "--llm-url", bad.url]
        argv = {"serve": ["serve", *flags, "--port", str(free_port())], "app": [*flags, "--port", str(free_port())],
                "ask": ["ask", str(EXAMPLES / "red_triangle_growing.mp4"), "what happens?", *flags],
                "chat": ["chat", str(EXAMPLES / "red_triangle_growing.mp4"), *flags]}[front_end]
        code = (app_module.main if front_end == "app" else cli.main)(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1 and len(lines) == 1, err
    assert "error: " in lines[0] and f"{bad.url}/models did not answer" in lines[0]
    assert "Traceback" not in err and "language model: None" not in err
