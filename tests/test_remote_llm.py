"""The --llm-url client without vLLM: a fake OpenAI-compatible server on loopback that breaks off mid-answer,
and one that is not there. The answer ends with an OpenAI-shaped error and the service keeps serving.
(The real vLLM route is tests/test_vllm_route.py.)"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from mugstan_chat.entrypoints import ModelArgs
from mugstan_chat.feature_cache import FeatureCache
from mugstan_chat.loader import load_chat_model
from mugstan_chat.remote_llm import RemoteLLM, RemoteLLMError, normalise_llm_url, openai_messages
from mugstan_chat.server.media import MediaFetcher, MediaPolicy
from mugstan_chat.server.planning import ServiceConfig
from mugstan_chat.server.protocol import ChatCompletionRequest
from mugstan_chat.server.worker import ChatService

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


class BreaksOff(BaseHTTPRequestHandler):
    """Serves one model; streams two words of every answer, then drops the connection mid-body."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = json.dumps({"object": "list", "data": [{"id": "fake", "object": "model", "created": 0,
                                                       "owned_by": "test", "max_model_len": 2048}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        self.server.requests.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for word in ("hello", " world"):
            event = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "fake",
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            data = f"data: {json.dumps(event)}\n\n".encode()
            self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)  # no last chunk: the body is incomplete


@pytest.fixture
def fake_llm():
    server = ThreadingHTTPServer(("127.0.0.1", 0), BreaksOff)
    server.requests = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_urls_and_flags_are_checked_before_loading():
    assert normalise_llm_url("http://127.0.0.1:8001") == "http://127.0.0.1:8001/v1"
    assert normalise_llm_url("http://127.0.0.1:8001/v1/") == "http://127.0.0.1:8001/v1"
    for bad in ("127.0.0.1:8001", "ftp://x/v1", "http:///v1"):
        with pytest.raises(ValueError, match="--llm-url"):
            normalise_llm_url(bad)
    with pytest.raises(ValueError, match="vLLM server"):
        ModelArgs(demo=True, llm_url="http://127.0.0.1:1", load_8bit=True).validate()
    with pytest.raises(ValueError, match="need --llm-url"):
        ModelArgs(demo=True, llm_model="x").validate()


def test_embeddings_replace_each_image_entry_in_order():
    import base64, io, torch

    clips = [torch.full((3, 2), float(i)) for i in range(2)]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "q"}]}]
    parts = openai_messages(messages, clips)[0]["content"]
    assert [p["type"] for p in parts] == ["image_embeds", "image_embeds", "text"]
    for i, part in enumerate(parts[:2]):
        torch.testing.assert_close(torch.load(io.BytesIO(base64.b64decode(part["image_embeds"]))), clips[i])


def test_unreachable_server_is_one_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(RemoteLLMError) as caught:
        RemoteLLM(f"http://127.0.0.1:{port}/v1").connect()
    assert caught.value.status == 503 and "cannot reach" in caught.value.message


def test_server_going_away_mid_answer_ends_the_stream_with_an_error(fake_llm):
    import asyncio

    chat_model = load_chat_model(demo=True, device="cpu", frames=4)
    chat_model.llm = RemoteLLM(f"http://127.0.0.1:{fake_llm.server_address[1]}/v1").connect()
    assert chat_model.llm.model == "fake"
    service = ChatService(chat_model, ServiceConfig(model_name="demo", frames=4, max_new_tokens=8),
                          MediaFetcher(MediaPolicy.create([EXAMPLES])), FeatureCache(1 << 20))
    request = ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"file://{EXAMPLES / 'red_triangle_growing.mp4'}"}},
        {"type": "text", "text": "what happens?"}]}])

    async def run():
        finished = asyncio.Event()
        job = service.start(service.plan(request), asyncio.get_running_loop(), finished.set)
        events = []
        while not events or events[-1][0] not in ("done", "error"):
            events.append(await job.next())
        await finished.wait()
        return events

    for _ in range(2):  # the service survives and answers (here: fails the same way) again
        events = asyncio.run(run())
        assert "".join(v for k, v in events if k == "text") == "hello world"
        kind, error = events[-1]
        assert kind == "error" and error.status == 502 and error.code == "llm_stream_broken"
        assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    sent = fake_llm.requests[0]
    assert [p["type"] for p in sent["messages"][0]["content"]] == ["image_embeds", "text"]
    assert sent["max_tokens"] == 8 and sent["temperature"] == 0 and sent["add_special_tokens"] is True
    assert service.counters["failed"] == 2
