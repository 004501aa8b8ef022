"""The API's numbers (issue 27 part 5): infinities and huge times, strings and booleans where integers
belong, and more candidates than a short video holds. In-process app on the demo model: each bad request
is a 400 in OpenAI's shape naming the parameter, and the server keeps serving; the candidate cap lives in
the session (clip_planning), so the terminal front ends get it too."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from mugstan_chat.engine.conversation import ChatSession, GenerationSettings
from mugstan_chat.engine.feature_cache import FeatureCache
from mugstan_chat.entrypoints.openai.app import create_app
from mugstan_chat.entrypoints.openai.jobs import Gate
from mugstan_chat.entrypoints.openai.media import MediaFetcher, MediaPolicy
from mugstan_chat.entrypoints.openai.planning import ServiceConfig
from mugstan_chat.entrypoints.openai.worker import ChatService
from mugstan_chat.video import write_video
from mugstan_chat.engine.engine import Engine

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
FRAMES = 4  # T, as conftest's chat_model


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """A folder the server may read: a 1 s video of 2 frames (1 distinct clip of 4 frames), one of 12 frames
    at 12 fps (3 distinct clips) and a normal example."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    for name, count, fps in (("two_frames.mp4", 2, 2), ("twelve_frames.mp4", 12, 12)):
        write_video(root / name, [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(count)], fps=fps)
    shutil.copy(EXAMPLES / "red_triangle_growing.mp4", root / "example.mp4")
    return root


@pytest.fixture(scope="module")
def client(chat_model, videos):
    config = ServiceConfig(model_name="demo", frames=FRAMES, max_new_tokens=4)
    service = ChatService(Engine(chat_model, feature_cache=FeatureCache(16 << 20)), config,
                          MediaFetcher(MediaPolicy.create([videos])))
    with TestClient(create_app(service, Gate(1, 4))) as test_client:
        yield test_client


def _body(videos, video: str = "example.mp4", **mugstan) -> dict:
    body = {"model": "demo", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": f"file://{videos / video}"}},
        {"type": "text", "text": "what happens?"}]}]}
    if mugstan:
        body["mugstan"] = mugstan
    return body


def _post(client, body: dict | str):
    content = body if isinstance(body, str) else json.dumps(body)
    return client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})


def _still_serving(client, videos) -> None:
    deadline = time.monotonic() + 10  # the slot is released on the loop just after the response went out
    while client.get("/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert client.get("/health").json()["running"] == 0
    answer = _post(client, _body(videos))
    assert answer.status_code == 200 and answer.json()["choices"][0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("field", ["start", "end"])
def test_an_infinite_time_is_a_400_naming_it(client, videos, field):
    text = json.dumps(_body(videos, **{field: 12345})).replace("12345", "1e999")  # valid JSON: infinity
    response = _post(client, text)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == f"mugstan.{field}" and "finite" in error["message"]
    _still_serving(client, videos)


def test_a_huge_finite_start_is_an_empty_window_not_an_overflow(client, videos):
    response = _post(client, _body(videos, start=1e308))  # x fps overflows to inf
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "mugstan" and "empty time window" in error["message"]
    _still_serving(client, videos)


@pytest.mark.parametrize("where, value", [
    ("mugstan.select", "2"), ("mugstan.select", True), ("mugstan.select", 2.5), ("mugstan.select", 2.0),
    ("mugstan.candidates", "8"), ("mugstan.candidates", True), ("mugstan.clips", True), ("mugstan.clips", "2"),
    ("media_io_kwargs.video.num_frames", "4"), ("media_io_kwargs.video.num_frames", True),
    ("max_tokens", True), ("max_tokens", "4"), ("seed", "1"), ("n", True),
    ("temperature", "0.5"), ("temperature", True), ("top_p", False), ("mugstan.start", "1"), ("mugstan.end", True),
])
def test_a_non_number_is_refused_like_every_other_field(client, videos, where, value):
    body = _body(videos)
    *parents, name = where.split(".")
    node = body
    for parent in parents:
        node = node.setdefault(parent, {})
    node[name] = value
    if where.startswith("mugstan.candidates"):
        body["mugstan"]["select"] = 2
    response = _post(client, body)
    assert response.status_code == 400, (where, value, response.text)
    error = response.json()["error"]
    assert error["param"].startswith(where) and error["type"] == "invalid_request_error", error
    _still_serving(client, videos)


@pytest.mark.parametrize("video, asked, shown", [("two_frames.mp4", (32, 2), (1, 1)),
                                                 ("twelve_frames.mp4", (8, 2), (3, 2))])
def test_candidates_are_capped_at_the_clips_the_video_holds(client, videos, video, asked, shown):
    candidates, select = asked
    response = _post(client, _body(videos, video, select=select, candidates=candidates))
    assert response.status_code == 200, response.text
    info = response.json()["mugstan"]
    distinct = shown[0]
    assert info["selection"]["capped"] == {"candidates": candidates, "select": select, "distinct_clips": distinct}
    assert info["selection"]["candidates"] == distinct and len(info["selection"]["scores"]) == distinct
    assert info["clips"] == shown[1] == len(info["clip_spans"]) == len(info["selection"]["chosen"])
    spans = [(s["start"], s["end"]) for s in info["clip_spans"]]
    assert len(set(spans)) == len(spans)  # no clip shown twice
    full = _post(client, _body(videos, select=2, candidates=4))  # a video long enough: nothing capped
    assert full.status_code == 200 and full.json()["mugstan"]["selection"]["capped"] is None
    _still_serving(client, videos)


def test_the_cap_is_the_sessions_so_every_front_end_has_it(chat_model, videos):
    session = ChatSession(Engine(chat_model), videos / "two_frames.mp4", frames=FRAMES, select=2, candidates=8,
                          generation=GenerationSettings(max_new_tokens=2))
    session.ask("what happens?")
    assert session.clips == 1 and len(session.clip_spans) == 1 and session.candidates == 1
    assert session.summary()["selection"]["capped"] == {"candidates": 8, "select": 2, "distinct_clips": 1}
    assert session.distinct_clips() == 1


def test_a_shortlist_that_no_longer_fits_the_capped_candidates_is_dropped(chat_model, videos):
    """Twelve frames hold 3 clips of 4: M = 8 becomes 3; a shortlist of 4 would not be a shortlist, one of 2 is."""
    kept = ChatSession(Engine(chat_model), videos / "twelve_frames.mp4", frames=FRAMES, select=1, candidates=8, shortlist=2,
                       generation=GenerationSettings(max_new_tokens=2))
    kept.ask("what happens?")
    assert kept.candidates == 3 and kept.selection.shortlist is not None and len(kept.selection.shortlist) == 2
    dropped = ChatSession(Engine(chat_model), videos / "twelve_frames.mp4", frames=FRAMES, select=1, candidates=8,
                          shortlist=4, generation=GenerationSettings(max_new_tokens=2))
    dropped.ask("what happens?")
    assert dropped.selection.shortlist is None and dropped.candidates == 3
    assert dropped.selection.capped == {"candidates": 8, "select": 1, "distinct_clips": 3, "shortlist": 4}


def test_verbose_says_the_candidates_were_capped(chat_model, videos):
    from mugstan_chat.entrypoints.terminal import describe_clips

    session = ChatSession(Engine(chat_model), videos / "twelve_frames.mp4", frames=FRAMES, select=2, candidates=8,
                          generation=GenerationSettings(max_new_tokens=2))
    session.ask("what happens?")
    line = describe_clips(session)
    assert "holds 3 distinct clip(s) of 4 frames: --candidates 8 and --select 2 capped to it" in line
    assert "\n" not in line
