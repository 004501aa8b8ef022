"""The server's logic in-process, on the demo model: request planning, the feature cache, stop
sequences, admission control, the ChatSession hooks it uses, and argument checks before loading."""

from __future__ import annotations

import time

import asyncio
import base64
import threading
from pathlib import Path

import pytest
import torch

import mugstan_chat.engine.conversation as chat_module
import mugstan_chat.llava.loader as loader_module
from mugstan_chat.engine.conversation import ChatSession, GenerationSettings, encode_image
from mugstan_chat.entrypoints.cli import main as cli_main
from mugstan_chat.engine.feature_cache import FeatureCache, FeatureKey, features_nbytes
from mugstan_chat.entrypoints.openai.media import MediaFetcher, MediaPolicy
from mugstan_chat.entrypoints.openai.protocol import APIError, ChatCompletionRequest
from mugstan_chat.entrypoints.openai.jobs import Gate
from mugstan_chat.entrypoints.openai.planning import ServiceConfig
from mugstan_chat.entrypoints.openai.worker import ChatService, TextAssembler
from mugstan_chat.video import VideoDecodeError
from mugstan_chat.engine.engine import Engine

ROOT = Path(__file__).resolve().parents[3]
EXAMPLES = ROOT / "examples"


def _service(chat_model, cache_bytes=1 << 20) -> ChatService:
    config = ServiceConfig(model_name="demo", frames=4, max_new_tokens=8)
    return ChatService(Engine(chat_model, feature_cache=FeatureCache(cache_bytes)), config,
                       MediaFetcher(MediaPolicy.create([EXAMPLES])))


def _request(video: str = "red_triangle_growing.mp4", question: str = "what happens?", **fields):
    messages = fields.pop("messages", None) or [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"file://{EXAMPLES / video}"}}, {"type": "text", "text": question}]}]
    return ChatCompletionRequest(messages=messages, **fields)


def _run(service: ChatService, request: ChatCompletionRequest, cancel_after: int | None = None):
    """Runs one request through a job on a fresh event loop; returns (events, outcome or error)."""
    async def go():
        loop = asyncio.get_running_loop()
        finished = asyncio.Event()
        job = service.start(service.plan(request), loop, finished.set)
        events = []
        while True:
            kind, value = await job.next()
            events.append((kind, value))
            if kind == "text" and cancel_after is not None and len(events) > cancel_after:
                job.cancel()
            if kind in ("done", "error"):
                await finished.wait()
                job.thread.join()
                return events, value
    return asyncio.run(go())


def _together(ask, count: int) -> None:
    """Runs ``ask(0)`` ... ``ask(count - 1)`` in threads at once; returns when they ended (60 s each at most)."""
    threads = [threading.Thread(target=ask, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)


# ----------------------------------------------------------------------------- the feature cache


def _features(nbytes_per_clip: int, clips: int = 1):
    return chat_module.VideoFeatures([torch.zeros(nbytes_per_clip // 4) for _ in range(clips)], [[0]], None, 1.0, 1.0)


def _key(name: str, frames: int = 8) -> FeatureKey:
    return FeatureKey(name, frames, 1, "stan", None, None, "model")


def test_feature_cache_is_lru_bounded_in_bytes():
    cache = FeatureCache(max_bytes=1000)
    a, b, c = _features(400), _features(400), _features(400)
    assert features_nbytes(a) == 400
    assert cache.put(_key("a"), a) and cache.put(_key("b"), b)
    assert cache.get(_key("a")) is a  # a is now the most recent
    assert cache.put(_key("c"), c)  # 1200 > 1000: evicts b, the least recently used
    assert _key("b") not in cache and cache.get(_key("a")) is a and cache.get(_key("c")) is c
    assert cache.bytes == 800 and cache.evictions == 1
    assert cache.get(_key("a", frames=16)) is None  # every field of the key matters
    assert not cache.put(_key("huge"), _features(2000)) and len(cache) == 2  # larger than the budget: not kept
    assert cache.stats() == {"entries": 2, "bytes": 800, "max_bytes": 1000, "hits": 3, "misses": 1, "shared": 0, "evictions": 1}
    assert not FeatureCache(0).put(_key("a"), a)  # 0 disables it


def test_same_video_is_decoded_and_encoded_once(chat_model, monkeypatch):
    reads = []
    real_reader = chat_module.load_video_clips

    def counting_reader(*args, **kwargs):
        reads.append(args[0])
        return real_reader(*args, **kwargs)

    monkeypatch.setattr(chat_module, "load_video_clips", counting_reader)
    service, tower = _service(chat_model), chat_model.tower
    calls = tower.calls
    _, first = _run(service, _request(question="what happens?"))
    _, second = _run(service, _request(question="and what colour is it?"))
    _, again = _run(service, _request(question="what happens?"))
    assert len(reads) == 1 and tower.calls == calls + 1  # ten questions, one decode and one encode
    assert not first.info["cached_features"] and second.info["cached_features"] and again.text == first.text
    _run(service, _request(question="what happens?", mugstan={"temporal": "mean"}))
    _run(service, _request(question="what happens?", mugstan={"start": 0.5, "end": 1.5}))
    assert len(reads) == 3 and tower.calls == calls + 3  # other features: encoded again
    assert service.health()["counters"]["video_encodes"] == 3


def test_concurrent_requests_for_a_new_video_share_one_decode_and_encode(chat_model, monkeypatch):
    reads = []
    real_reader = chat_module.load_video_clips
    started = threading.Barrier(4, timeout=30)

    def slow_counting_reader(*args, **kwargs):
        reads.append(args[0])
        time.sleep(0.3)  # the others arrive while this one decodes
        return real_reader(*args, **kwargs)

    monkeypatch.setattr(chat_module, "load_video_clips", slow_counting_reader)
    service, tower = _service(chat_model), chat_model.tower
    calls = tower.calls
    outcomes = [None] * 4

    def ask(i):
        started.wait()  # all four requests at the same moment
        outcomes[i] = _run(service, _request("blue_triangle_left.mp4"))[1]

    _together(ask, 4)
    assert len(reads) == 1 and tower.calls == calls + 1 and service.health()["counters"]["video_encodes"] == 1
    assert sorted(o.info["cached_features"] for o in outcomes) == [False, True, True, True]
    assert len({o.text for o in outcomes}) == 1  # greedy: the same answer from the same features
    assert service.engine.features.stats()["shared"] + service.engine.features.stats()["hits"] == 3


def test_a_failed_encode_is_each_requests_own_error(chat_model, monkeypatch):
    """The first request's decode fails: the waiting request tries again itself (and fails the same way)."""
    def broken_reader(*args, **kwargs):
        time.sleep(0.2)
        raise VideoDecodeError(f"{args[0]}: broken on purpose")

    monkeypatch.setattr(chat_module, "load_video_clips", broken_reader)
    service = _service(chat_model)
    errors = [None, None]

    def ask(i):
        errors[i] = _run(service, _request("red_triangle_shrinking.mp4"))[1]

    _together(ask, 2)
    assert all(isinstance(e, APIError) and e.status == 400 and "broken on purpose" in e.message for e in errors)
    assert len(service.engine.features) == 0


def test_cache_eviction_means_decoding_again(chat_model, monkeypatch):
    reads = []
    real_reader = chat_module.load_video_clips
    monkeypatch.setattr(chat_module, "load_video_clips", lambda *a, **k: reads.append(a[0]) or real_reader(*a, **k))
    one_video = 16 * 64 * 4  # visual tokens x text width x fp32
    service = _service(chat_model, cache_bytes=one_video)
    for video in ("red_triangle_growing.mp4", "blue_triangle_left.mp4", "red_triangle_growing.mp4"):
        _run(service, _request(video))
    assert len(reads) == 3 and service.engine.features.evictions == 2


# ----------------------------------------------------------------------------- answers


def test_answers_equal_chat_session_with_history(chat_model):
    service = _service(chat_model)
    video = EXAMPLES / "red_triangle_growing.mp4"
    reference = ChatSession(Engine(chat_model), video, frames=4, generation=GenerationSettings(max_new_tokens=8))
    first = reference.ask("what happens?")
    second = reference.ask("why?")
    messages = _request(question="what happens?").model_dump(exclude_none=True)["messages"] + [
        {"role": "assistant", "content": first}, {"role": "user", "content": "why?"}]
    events, outcome = _run(service, _request(messages=messages))
    assert outcome.text == second and outcome.prompt_tokens == reference.last_stats.prompt_tokens
    assert "".join(v for k, v in events if k == "text") == second


def test_cancel_stops_generation(chat_model):
    service = _service(chat_model)
    events, outcome = _run(service, _request(max_tokens=1500), cancel_after=3)
    assert outcome.completion_tokens < 1500 and service.counters["cancelled"] == 1


def test_stop_sequences_end_the_answer(chat_model):
    service = _service(chat_model)
    _, whole = _run(service, _request(max_tokens=12))
    words = whole.text.split(" ")
    stop = " ".join(words[2:4])  # two words from the middle of the greedy answer
    _, stopped = _run(service, _request(max_tokens=12, stop=[stop, "never-there"]))
    assert stopped.text == whole.text[: whole.text.index(stop)].rstrip() and stopped.finish_reason == "stop"
    assert stopped.completion_tokens < 12


@pytest.mark.parametrize("pieces,stops,expected", [
    ([" hello", " wor", "ld", " \n"], [], ["hello", " wor", "ld"]),
    (["a b", " ST", "OP c"], ["STOP"], ["a b"]),  # " ST" waits (it may begin "STOP"), then is cut
    (["a S", "x b"], ["ST"], ["a", " Sx b"]),  # a partial match that does not complete is released
    (["ab", "cd"], ["bc"], ["a"]),
])
def test_text_assembler(pieces, stops, expected):
    assembler = TextAssembler(stops)
    out = [assembler.feed(p) for p in pieces] + [assembler.finish()]
    assert [o for o in out if o] == expected
    if not stops:
        assert "".join(out) == "".join(pieces).strip()


def test_plan_refusals(chat_model):
    service = _service(chat_model)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    video = {"type": "video_url", "video_url": {"url": "file:///x.mp4"}}
    cases = {
        "n": _request(n=3),
        "frequency_penalty": _request(frequency_penalty=0.5),
        "media_io_kwargs.video.num_frames": _request(media_io_kwargs={"video": {"num_frames": 65}}),
        "mugstan.clips": _request(mugstan={"clips": 17}),
        "mugstan.end": _request(mugstan={"start": 2.0, "end": 1.0}),
        "mugstan.shortlist": _request(mugstan={"select": 3, "candidates": 8, "shortlist": 2}),
        "mugstan.selection": _request(mugstan={"selection": "coverage"}),  # no select, and none by default
        "mugstan": ChatCompletionRequest(messages=[{"role": "user", "content": [image, {"type": "text", "text": "q"}]}],
                                         mugstan={"clips": 2}),
        "messages": ChatCompletionRequest(messages=[{"role": "user", "content": [video, image, {"type": "text",
                                                                                             "text": "q"}]}]),
        "messages[1].content[0].video_url": ChatCompletionRequest(messages=[
            {"role": "user", "content": "hi"}, {"role": "user", "content": [video]}]),
        "messages[0].content[0]": ChatCompletionRequest(messages=[
            {"role": "assistant", "content": [video]}, {"role": "user", "content": "q"}]),
    }
    for param, request in cases.items():
        with pytest.raises(APIError) as caught:
            service.plan(request)
        assert caught.value.status == 400 and caught.value.param == param, (param, caught.value.message)
    with pytest.raises(APIError) as caught:
        service.plan(_request(messages=[{"role": "user", "content": [video]}, {"role": "assistant", "content": "a"}]))
    assert "end with a user message" in caught.value.message
    plan = service.plan(_request(max_tokens=5, max_completion_tokens=7, temperature=0.5, seed=3,
                                 messages=[{"role": "system", "content": "be brief"},
                                           {"role": "user", "content": [video, {"type": "text", "text": "q1"}]},
                                           {"role": "assistant", "content": "a1"},
                                           {"role": "user", "content": "q2"}, {"role": "user", "content": "q3"}]))
    assert plan.system == "be brief" and plan.history == [("q1", "a1")] and plan.question == "q2\nq3"
    assert plan.generation.max_new_tokens == 7 and plan.generation.temperature == 0.5 and plan.generation.seed == 3
    plan = service.plan(_request(mugstan={"select": 2, "candidates": 8, "shortlist": 4, "selection": "topk"}))
    assert (plan.select, plan.candidates, plan.shortlist, plan.selection) == (2, 8, 4, "topk")
    plan = service.plan(_request(mugstan={"select": 2}))  # the server's defaults
    assert (plan.candidates, plan.shortlist, plan.selection) == (32, None, "coverage")


def test_seed_makes_sampling_repeatable(chat_model):
    service = _service(chat_model)
    answers = [_run(service, _request(temperature=1.5, seed=seed, max_tokens=12))[1].text for seed in (7, 7, 8)]
    greedy = _run(service, _request(max_tokens=12))[1].text
    assert answers[0] == answers[1] and len({answers[0], answers[2], greedy}) > 1


def test_concurrent_seeded_requests_equal_the_same_requests_alone(chat_model, monkeypatch):
    """Each request samples from its own generator: running beside another seeded request changes nothing."""
    service = _service(chat_model)
    requests = [_request(temperature=1.0, seed=seed, max_tokens=16) for seed in (1, 2)]
    _run(service, _request())  # the video's features are cached: both requests go straight to sampling
    alone = [_run(service, r)[1].text for r in requests]
    from mugstan_chat.engine import turns

    real_call = turns.SeededSampler.__call__
    together = threading.Barrier(2, timeout=30)

    def in_step(self, input_ids, scores):  # both requests draw their first token at the same moment
        if getattr(self, "steps", 0) == 0:
            together.wait()
        self.steps = getattr(self, "steps", 0) + 1
        return real_call(self, input_ids, scores)

    monkeypatch.setattr(turns.SeededSampler, "__call__", in_step)
    for _ in range(3):
        together.reset()
        texts = [None, None]
        _together(lambda i: texts.__setitem__(i, _run(service, requests[i])[1].text), 2)
        assert texts == alone


# ----------------------------------------------------------------------------- admission control


def test_gate_runs_queues_and_refuses():
    async def go():
        gate = Gate(concurrency=1, queue_size=1)
        await gate.acquire()  # runs
        waiting = asyncio.create_task(gate.acquire())
        await asyncio.sleep(0)
        assert gate.running == 1 and gate.waiting == 1
        with pytest.raises(APIError) as caught:
            await gate.acquire()  # one running, one waiting: full
        assert caught.value.status == 429 and caught.value.code == "rate_limit_exceeded"
        gate.release()
        await asyncio.wait_for(waiting, 5)
        assert gate.running == 1 and gate.waiting == 0
        gate.release()
        assert gate.running == 0

    asyncio.run(go())


# ----------------------------------------------------------------------------- ChatSession hooks


def test_image_answers_equal_stock_llava(chat_model):
    """An image_url is stock LLaVA image chat: same answer as LLaVA with its own CLIP tower and processor."""
    from PIL import Image

    from mugstan_chat.llava.demo import build_demo_llava

    image = Image.new("RGB", (48, 40), (30, 160, 220))
    image.paste((250, 250, 0), (5, 5, 20, 30))
    session = ChatSession(Engine(chat_model), "image.png", frames=1, clips=1, generation=GenerationSettings(max_new_tokens=10),
                          prepare=False)
    session.attach_features(encode_image(chat_model, image), cached=False)
    answer = session.ask("what is in the picture?")
    fresh = session.last_stats
    assert not fresh.cached_features and fresh.encode_ms > 0 and fresh.visual_tokens == 16
    stock, processor = build_demo_llava(0)  # the same seed as the loaded demo model, without the video tower
    content = [{"type": "image"}, {"type": "text", "text": "what is in the picture?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    inputs = processor(text=text, images=[image], return_tensors="pt")
    with torch.inference_mode():
        output = stock.generate(**inputs, max_new_tokens=10, do_sample=False)
    expected = processor.tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer == expected
    session.ask("and then?")
    assert session.last_stats.cached_features and session.last_stats.encode_ms == 0


def test_attach_features_checks_clips_and_stop_event_ends_generation(chat_model):
    video = EXAMPLES / "red_triangle_growing.mp4"
    source = ChatSession(Engine(chat_model), video, frames=4, generation=GenerationSettings(max_new_tokens=300))
    other = ChatSession(Engine(chat_model), video, frames=4, clips=2, prepare=False)
    with pytest.raises(ValueError, match="1 clips, this session expects 2"):
        other.attach_features(source.video_features)
    stop = threading.Event()
    pieces = []
    for piece in source.ask_stream("tell me everything", stop=stop):
        pieces.append(piece)
        stop.set()  # from the first piece on: generation ends after the current token
    assert source.last_stats.new_tokens < 300 and pieces


# ----------------------------------------------------------------------------- arguments, before any model loads


@pytest.mark.parametrize("argv,message", [
    (["--host", "0.0.0.0"], "--api-key"),
    (["--allowed-local-media-path", "/no/such/folder"], "not a directory"),
    (["--concurrency", "0"], "--concurrency"),
    (["--queue-size", "-1"], "--queue-size"),
    (["--max-body-mb", "0"], "--max-body-mb"),
    (["--temperature", "-1"], "--temperature"),
    (["--frames", "9", "--max-frames", "8"], "--max-frames"),
])
def test_bad_arguments_fail_before_the_model_loads(argv, message, monkeypatch, capsys):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loader_module, "load_chat_model", refuse)
    monkeypatch.delenv("MUGSTAN_API_KEY", raising=False)
    with pytest.raises(SystemExit) as caught:
        cli_main(["serve", "--demo", *argv])
    assert caught.value.code == 2 and message in capsys.readouterr().err


def test_data_url_of_an_image_is_refused_as_a_video(chat_model):
    service = _service(chat_model)
    url = "data:image/png;base64," + base64.b64encode(b"x").decode()
    request = _request(messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                              {"type": "text", "text": "q"}]}])
    _, error = _run(service, request)
    assert isinstance(error, APIError) and error.code == "invalid_media_url"


def test_a_failure_mid_answer_is_an_openai_error_and_frees_the_slot(chat_model, monkeypatch):
    """In-process app: a generation that breaks after the stream began ends with an error event and [DONE];
    unstreamed, it is a 500 in OpenAI's shape; either way the server keeps serving."""
    import json

    from fastapi.testclient import TestClient

    from mugstan_chat.entrypoints.openai.app import create_app

    def broken(self, question, stop=None, generation=None):
        yield "partial"
        raise RuntimeError("boom")

    gate = Gate(1, 0)
    app = create_app(_service(chat_model), gate)
    body = _request().model_dump(exclude_none=True)
    monkeypatch.setattr(ChatSession, "ask_stream", broken)
    with TestClient(app) as client:
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            events = [line for line in response.iter_lines() if line]
        assert json.loads(events[1][6:])["choices"][0]["delta"]["content"] == "partial"
        assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["error"]["type"] == "server_error"
        whole = client.post("/v1/chat/completions", json=body)
        assert whole.status_code == 500 and "RuntimeError" in whole.json()["error"]["message"]
        monkeypatch.undo()
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        # the slot is released on the event loop once the worker thread has ended, which can be just
        # after the response went out: wait for it, boundedly
        deadline = time.monotonic() + 10
        while client.get("/health").json()["running"] and time.monotonic() < deadline:
            time.sleep(0.02)
        assert client.get("/health").json()["running"] == 0


# ----------------------------------------------------------------------------- clip times and selection


def test_the_api_reports_clip_spans_and_a_selection_reranks_from_the_cache(chat_model):
    service = _service(chat_model, cache_bytes=16 << 20)
    _, outcome = _run(service, _request(mugstan={"clips": 3}))
    spans = outcome.info["clip_spans"]
    assert [s["number"] for s in spans] == [1, 2, 3] and all(s["start"] <= s["end"] for s in spans)
    assert outcome.info["selection"] is None and "rank" not in outcome.info["timings_ms"]
    selected = {"select": 2, "candidates": 6}
    _, first = _run(service, _request(question="what grows?", mugstan=selected))
    info = first.info
    assert info["clips"] == 2 and info["selection"]["candidates"] == 6 and not info["selection"]["cached"]
    assert [s["candidate"] for s in info["clip_spans"]] == info["selection"]["chosen"]
    assert info["timings_ms"]["candidates"] > 0 and info["timings_ms"]["rank"] > 0
    assert info["selection"]["tokens_saved"] == 4 * 16
    encodes = service.engine.retriever().encodes
    _, again = _run(service, _request(question="what is red?", mugstan=selected))  # stateless: a new session
    assert again.info["selection"]["cached"] and again.info["timings_ms"]["candidates"] == 0
    assert service.engine.retriever().encodes == encodes  # ranked on the cached candidate embeddings
    _, auto = _run(service, _request(mugstan={"clips": "auto"}))
    assert auto.info["clips"] == len(auto.info["clip_spans"]) >= 2


def test_selection_plan_refusals(chat_model):
    service = _service(chat_model)
    cases = {
        "mugstan.candidates": [{"candidates": 8}, {"select": 4, "candidates": 3}, {"select": 2, "candidates": 300}],
        "mugstan.clips": [{"select": 2, "clips": 2}],
        "mugstan.select": [{"select": 9}],
    }
    for param, options in cases.items():
        for mugstan in options:
            with pytest.raises(APIError) as caught:
                service.plan(_request(mugstan=mugstan))
            assert caught.value.status == 400 and caught.value.param == param, (mugstan, caught.value.message)
    plan = service.plan(_request(mugstan={"select": 3, "clip_times": "off"}))
    assert (plan.select, plan.candidates, plan.clips, plan.clip_times) == (3, 32, 3, "off")


def test_references_of_the_answer_reach_the_response(chat_model, monkeypatch):
    """The answer's moments come back in mugstan.references (the model's own tokens run; its text is replaced
    by one that names times, as the demo model's random text names none)."""
    real = ChatSession.ask_stream
    said = "It grows at 00:01, and in Clip 2 it is large; 59:00 is past the end."

    def naming_times(self, question, stop=None, generation=None):
        for _ in real(self, question, stop=stop):
            pass
        yield said

    monkeypatch.setattr(ChatSession, "ask_stream", naming_times)
    service = _service(chat_model)
    events, outcome = _run(service, _request(mugstan={"clips": 3}))
    info = outcome.info
    assert "".join(v for k, v in events if k == "text") == said
    spans = info["clip_spans"]
    assert [r["text"] for r in info["references"]] == ["00:01", "Clip 2"]
    assert info["references"][1]["start"] == spans[1]["start"] and info["references"][1]["clip"] == 2
    one_clip = _run(service, _request(mugstan={"clips": 1}))[1].info  # no times in the prompt: no references
    assert one_clip["references"] == []


def test_one_request_tokenises_its_prompt_once(chat_model, monkeypatch):
    """The context check and the answer share the turn's ids: the prompt goes through the tokenizer once."""
    tokenizer_class = type(chat_model.processor.tokenizer)
    real = tokenizer_class.__call__
    prompts = []

    def counting(self, text, *args, **kwargs):
        if isinstance(text, str) and "how many tokens?" in text:
            prompts.append(text)
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(tokenizer_class, "__call__", counting)
    service = _service(chat_model)
    for clips in (1, 2):
        prompts.clear()
        events, outcome = _run(service, _request(question="how many tokens?", mugstan={"clips": clips}))
        assert any(kind == "done" for kind, _ in events)
        assert len(prompts) == 1, f"{len(prompts)} tokenisations of the prompt with {clips} clip(s)"
