"""Issue 30: a request's torch work runs on the server's threads per request, in every thread doing it.

On this torch the intra-op thread count is per thread (mugstan_chat.engine.threads), so the count set
in a job's thread must reach the thread that runs ``generate``. Observed inside ``generate`` (patched
on the demo model): the thread-local count the engine passed on, and torch's own count there.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from mugstan_chat.engine.engine import Engine
from mugstan_chat.engine.feature_cache import FeatureCache
from mugstan_chat.engine.threads import current_threads, default_threads
from mugstan_chat.entrypoints import web as web_module
from mugstan_chat.entrypoints.openai.app import create_app
from mugstan_chat.entrypoints.openai.jobs import Gate
from mugstan_chat.entrypoints.openai.media import MediaFetcher, MediaPolicy
from mugstan_chat.entrypoints.openai.planning import ServiceConfig
from mugstan_chat.entrypoints.openai.worker import ChatService

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
THREADS = 3  # neither torch's default here (OMP_NUM_THREADS=1 in tests) nor the machine's core count


@pytest.fixture
def seen_in_generate(chat_model, monkeypatch):
    """Records (thread name, engine's count, torch's count) in each ``generate`` call."""
    seen = []
    original = chat_model.model.generate

    def generate(*args, **kwargs):
        seen.append((threading.current_thread().name, current_threads(), torch.get_num_threads()))
        return original(*args, **kwargs)

    monkeypatch.setattr(chat_model.model, "generate", generate)
    before = torch.get_num_threads()
    yield seen
    torch.set_num_threads(before)


def test_a_served_request_generates_with_the_configured_threads(chat_model, seen_in_generate):
    config = ServiceConfig(model_name="demo", frames=4, max_new_tokens=3)
    service = ChatService(Engine(chat_model, feature_cache=FeatureCache(16 << 20)), config,
                          MediaFetcher(MediaPolicy.create([EXAMPLES])), threads_per_request=THREADS)
    body = {"model": "demo", "stream": True, "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"file://{EXAMPLES / 'red_triangle_growing.mp4'}"}},
        {"type": "text", "text": "what happens?"}]}]}
    with TestClient(create_app(service, Gate(1, 4))) as client:
        response = client.post("/v1/chat/completions", content=json.dumps(body),
                               headers={"Content-Type": "application/json"})
    assert response.status_code == 200, response.text
    assert seen_in_generate == [("mugstan-chat-generate", THREADS, THREADS)]  # the generate thread, not the job's


def test_the_web_app_generates_with_the_configured_threads(chat_model, seen_in_generate):
    settings = web_module.AppSettings(max_new_tokens=3, threads_per_request=THREADS)
    app = web_module.ChatApp(Engine(chat_model), settings)
    state, _, _ = app.load_video(str(EXAMPLES / "red_triangle_growing.mp4"), 4, 1, "mean", None)
    for _ in app.respond("what happens?", state, 3, 0.0, 1.0):
        pass
    assert seen_in_generate == [("mugstan-chat-generate", THREADS, THREADS)]


def test_default_threads_never_oversubscribe():
    assert [default_threads(users, cores=2) for users in (1, 2, 4, 16)] == [2, 1, 1, 1]
    assert default_threads(3, cores=16) == 5
