"""The --llm-url client without vLLM: a fake OpenAI-compatible server on loopback that breaks off mid-answer,
and one that is not there. The answer ends with an OpenAI-shaped error and the service keeps serving.
(The real vLLM route is tests/test_vllm_route.py.)"""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from pathlib import Path

import pytest

import fake_llm as fake

from mugstan_chat.entrypoints import ModelArgs
from mugstan_chat.engine.feature_cache import FeatureCache
from mugstan_chat.llava.loader import load_chat_model
from mugstan_chat.engine.remote_llm import RemoteLLM, RemoteLLMError, normalise_llm_url, openai_messages
from mugstan_chat.entrypoints.openai.media import MediaFetcher, MediaPolicy
from mugstan_chat.entrypoints.openai.planning import ServiceConfig
from mugstan_chat.entrypoints.openai.protocol import ChatCompletionRequest
from mugstan_chat.entrypoints.openai.worker import ChatService
from mugstan_chat.engine.engine import Engine

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.fixture
def fake_llm():
    with fake.running("breaks_off") as server:
        yield server


@pytest.fixture(scope="module")
def chat_model():
    return load_chat_model(demo=True, device="cpu", frames=4)


def _service(chat_model, llm: RemoteLLM) -> ChatService:
    return ChatService(Engine(chat_model, llm=llm, feature_cache=FeatureCache(1 << 20)),
                       ServiceConfig(model_name="demo", frames=4, max_new_tokens=8),
                       MediaFetcher(MediaPolicy.create([EXAMPLES])))


def _ask(service: ChatService, on_start=None, bound_s: float = 60, mugstan: dict | None = None):
    """(events, the last event) of one video request through a job; ``on_start(job)`` runs once it started
    (e.g. a client that will leave). The wait for the job to end is bounded (a hang fails the test)."""
    request = ChatCompletionRequest(messages=[{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"file://{EXAMPLES / 'red_triangle_growing.mp4'}"}},
        {"type": "text", "text": "what happens?"}]}], mugstan=mugstan)

    async def run():
        finished = asyncio.Event()
        job = service.start(service.plan(request), asyncio.get_running_loop(), finished.set)
        if on_start is not None:
            on_start(job)
        events = []
        while not events or events[-1][0] not in ("done", "error"):
            events.append(await job.next())
        await finished.wait()
        return events

    events = asyncio.run(asyncio.wait_for(run(), bound_s))
    return events, events[-1]


def test_urls_and_flags_are_checked_before_loading():
    assert normalise_llm_url("http://127.0.0.1:8001") == "http://127.0.0.1:8001/v1"
    assert normalise_llm_url("http://127.0.0.1:8001/v1/") == "http://127.0.0.1:8001/v1"
    for bad in ("127.0.0.1:8001", "ftp://x/v1", "http:///v1"):
        with pytest.raises(ValueError, match="--llm-url"):
            normalise_llm_url(bad)
    with pytest.raises(ValueError, match="vLLM server"):
        ModelArgs(demo=True, llm_url="http://127.0.0.1:1", load_8bit=True).validate()
    with pytest.raises(ValueError, match="need --llm-url"):
        ModelArgs(demo=True, llm_timeout=5).validate()
    with pytest.raises(ValueError, match="--llm-timeout: must be a finite number above 0"):
        ModelArgs(demo=True, llm_url="http://127.0.0.1:1", llm_timeout=float("inf")).validate()
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


def _as_vllm_renders(messages: list[dict]) -> list[dict]:
    """What vLLM hands its chat template with --chat-template-content-format openai: the parts in order,
    each ``image_embeds`` part as ``{"type": "image"}`` (vllm/renderers/chat_utils.py, wrap_dicts)."""
    return [{"role": m["role"], "content": [{"type": "image"} if p["type"] == "image_embeds" else p
                                            for p in m["content"]]} for m in messages]


@pytest.mark.parametrize("clip_times", ["on", "auto"])
def test_clip_labels_go_upstream_as_text_parts_before_each_image(chat_model, clip_times):
    """Three clips with times (``auto`` means on for several clips, on this route too): each label is a text part
    right before its clip's embeddings, and the exported template renders what was sent as our engine's prompt."""
    from mugstan_chat.engine.conversation import ChatSession, GenerationSettings
    from mugstan_chat.llava.chat_template import in_order_template

    with fake.running("answer") as server:
        service = _service(chat_model, RemoteLLM(server.url).connect())
        events, (kind, outcome) = _ask(service, mugstan={"clips": 3, "clip_times": clip_times})
        sent = server.requests[-1]["messages"]
    assert kind == "done" and outcome.text == "hello world"
    parts = sent[0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_embeds"] * 3 + ["text"]
    labels = [p["text"] for p in parts[0:6:2]]
    assert [label.split(" (")[0] for label in labels] == ["Clip 1", "Clip 2", "Clip 3"]
    assert parts[-1] == {"type": "text", "text": "what happens?"}
    local = ChatSession(Engine(chat_model), EXAMPLES / "red_triangle_growing.mp4", frames=4, clips=3, clip_times=clip_times,
                        generation=GenerationSettings(max_new_tokens=8))
    ours = local.prompt_text("what happens?")
    assert [label + "<image>" in ours for label in labels] == [True] * 3  # the very labels our engine writes
    processor = chat_model.processor
    template = in_order_template(processor.chat_template, processor.image_token)
    rendered = processor.tokenizer.apply_chat_template(_as_vllm_renders(sent), chat_template=template,
                                                       add_generation_prompt=True, tokenize=False)
    assert rendered.replace("<image>", "<image>" * local.tokens_per_image) == ours


def test_one_clip_sends_no_labels_unless_asked(chat_model):
    with fake.running("answer") as server:
        service = _service(chat_model, RemoteLLM(server.url).connect())
        _ask(service)
        _ask(service, mugstan={"clip_times": "on"})
        auto, on = (r["messages"][0]["content"] for r in server.requests)
    assert [p["type"] for p in auto] == ["image_embeds", "text"]  # one uniform clip: stock LLaVA's prompt
    assert [p["type"] for p in on] == ["text", "image_embeds", "text"] and on[0]["text"].startswith("Clip 1 (")


def test_unreachable_server_is_one_clear_error():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    with pytest.raises(RemoteLLMError) as caught:
        RemoteLLM(f"http://127.0.0.1:{port}/v1").connect()
    assert caught.value.status == 503 and "cannot reach" in caught.value.message


def test_server_going_away_mid_answer_ends_the_stream_with_an_error(fake_llm, chat_model):
    service = _service(chat_model, RemoteLLM(fake_llm.url).connect())
    assert service.engine.llm.client.model == "fake"
    for _ in range(2):  # the service survives and answers (here: fails the same way) again
        events, (kind, error) = _ask(service)
        assert "".join(v for k, v in events if k == "text") == "hello world"
        assert kind == "error" and error.status == 502 and error.code == "llm_stream_broken"
        assert set(error.body()["error"]) == {"message", "type", "param", "code"}
    sent = fake_llm.requests[0]
    assert [p["type"] for p in sent["messages"][0]["content"]] == ["image_embeds", "text"]
    assert sent["max_tokens"] == 8 and sent["temperature"] == 0 and sent["add_special_tokens"] is True
    assert sent["stream_options"] == {"include_usage": True, "continuous_usage_stats": True}
    assert service.counters["failed"] == 2


# ----------------------------------------------------------------------------- faults of the server (issue 27)


def _answered_again(service, server) -> None:
    """After a fault the same service answers the next request in full."""
    server.behaviour = "answer"
    events, (kind, outcome) = _ask(service)
    assert kind == "done" and outcome.text == "hello world", outcome
    assert outcome.completion_tokens == 2


@pytest.mark.parametrize("models", ["not_json", "no_ids", "not_a_list"])
def test_a_model_list_that_is_not_one_is_a_one_line_error(models):
    with fake.running(models=models) as server:
        with pytest.raises(RemoteLLMError) as caught:
            RemoteLLM(server.url).connect()
    error = caught.value
    assert error.status == 502 and error.code == "llm_bad_response"
    assert "\n" not in error.message and f"{server.url}/models did not answer" in error.message


@pytest.mark.parametrize("behaviour", ["not_json", "list_chunk", "choices_not_a_list", "content_not_text"])
def test_a_malformed_chunk_is_502_llm_bad_response(behaviour, chat_model):
    with fake.running(behaviour) as server:
        service = _service(chat_model, RemoteLLM(server.url).connect())
        events, (kind, error) = _ask(service)
        assert "".join(v for k, v in events if k == "text") == "hello"  # what came before the bad chunk
        assert kind == "error" and (error.status, error.type, error.code) == (502, "server_error", "llm_bad_response")
        assert "malformed chunk" in error.message and "\n" not in error.message
        _answered_again(service, server)
    assert service.counters["failed"] == 1 and service.counters["completed"] == 1


def test_a_5xx_from_the_server_is_502_with_a_code(chat_model):
    with fake.running("server_error") as server:
        service = _service(chat_model, RemoteLLM(server.url).connect())
        _, (kind, error) = _ask(service)
        assert kind == "error" and (error.status, error.code) == (502, "llm_server_error")
        assert "HTTP 500" in error.message and "EngineCore died" in error.message
        _answered_again(service, server)


@pytest.mark.parametrize("behaviour", ["stalls", "stalls_at_once"])
def test_a_stalled_server_ends_the_answer_after_the_timeout(behaviour, chat_model):
    timeout = 0.5
    with fake.running(behaviour) as server:
        service = _service(chat_model, RemoteLLM(server.url, timeout=timeout).connect())
        events, (kind, error) = _ask(service, bound_s=timeout + 30)
        assert "".join(v for k, v in events if k == "text") == ("hello world" if behaviour == "stalls" else "")
        assert kind == "error" and (error.status, error.code) == (504, "llm_timeout")
        assert f"sent nothing for {timeout:g} s (--llm-timeout)" in error.message
        _answered_again(service, server)


def test_a_client_leaving_shuts_a_stalled_stream_at_once(chat_model):
    """The job is cancelled while vLLM sends nothing: the stream to it is shut (it sees us hang up) and the
    worker ends long before --llm-timeout (here 60 s; the wait for the job is bounded at 15 s)."""
    def leave_once_waiting(job):
        def leave():
            deadline = time.monotonic() + 30
            while not server.requests and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.2)  # our worker now blocks reading a stream that sends nothing
            job.cancel()

        threading.Thread(target=leave, daemon=True).start()

    with fake.running("stalls_at_once") as server:
        service = _service(chat_model, RemoteLLM(server.url, timeout=60).connect())
        events, (kind, outcome) = _ask(service, on_start=leave_once_waiting, bound_s=15)
        assert server.hung_up.wait(5)  # vLLM sees its client go away: it aborts the request
        assert kind == "done" and outcome.text == "" and service.counters["cancelled"] == 1
        _answered_again(service, server)


@pytest.mark.parametrize("behaviour", ["empty_tokens", "empty_tokens_counted"])
def test_tokens_that_decode_to_no_text_still_time_the_first_token(behaviour, chat_model):
    """Issue 30: the demo model's greedy tokens decode to nothing; first_token counts tokens, not text."""
    with fake.running(behaviour) as server:
        service = _service(chat_model, RemoteLLM(server.url).connect())
        events, (kind, outcome) = _ask(service)
    assert kind == "done" and outcome.text == "" and not [v for k, v in events if k == "text"]
    assert outcome.completion_tokens == 3
    timings = outcome.info["timings_ms"]
    assert timings["first_token"] is not None and 0 < timings["first_token"] <= timings["total"]
