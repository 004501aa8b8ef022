"""The engine API: what Engine.open settles, what conversations share, and the model that never changes."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from mugstan_chat.engine.engine import Engine
from mugstan_chat.engine.feature_cache import FeatureCache
from mugstan_chat.engine.language_models import LocalLanguageModel, RemoteLanguageModel
from mugstan_chat.engine.remote_llm import RemoteLLM
from mugstan_chat.engine.turns import GenerationSettings
from mugstan_chat.session_options import SessionOptions
from mugstan_chat.video import VideoDecodeError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
VIDEO = str(EXAMPLES / "red_triangle_growing.mp4")
SHORT = GenerationSettings(max_new_tokens=4)


@pytest.fixture(scope="module")
def model(demo_chat_model):
    return demo_chat_model(4)


def test_open_settles_the_video_and_a_second_open_takes_it_from_the_cache(model):
    engine = Engine(model, feature_cache=FeatureCache(64 << 20))
    calls = model.tower.calls
    first = engine.open(VIDEO, SessionOptions(frames=4, clips=2), generation=SHORT)
    assert not first.cached and model.tower.calls == calls + 1 and first.visual_tokens > 0
    second = engine.open(VIDEO, SessionOptions(frames=4, clips=2), generation=SHORT)
    assert second.cached and model.tower.calls == calls + 1  # the same bytes and settings: no tower work
    assert first.ask("what happens?") == second.ask("what happens?")  # greedy on the same features
    assert [q for q, _ in second.history] == ["what happens?"] and second.turn_count == 1
    assert second.undo()[0] == "what happens?" and second.history == []


def test_lazy_leaves_the_video_to_the_first_question_whose_timings_include_it(model):
    conversation = Engine(model).open(VIDEO, SessionOptions(frames=4, clips=1), generation=SHORT, lazy=True)
    assert conversation.visual_tokens == 0  # nothing decoded yet
    conversation.ask("what happens?")
    stats = conversation.last_stats
    assert stats.decode_ms > 0 and stats.encode_ms > 0 and not stats.cached_features


def test_errors_name_the_video_as_the_caller_calls_it(model, tmp_path):
    broken = tmp_path / "upload-1234.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(VideoDecodeError) as caught:
        Engine(model).open(broken, SessionOptions(frames=4, clips=1), name="https://example.org/v.mp4")
    assert "https://example.org/v.mp4" in str(caught.value) and str(broken) not in str(caught.value)


def test_conversations_of_one_engine_share_its_budget_and_history_is_theirs(model):
    engine = Engine(model)
    a = engine.open(VIDEO, SessionOptions(frames=4, clips=1), generation=SHORT, history=[("hi", "hello")])
    b = engine.open(VIDEO, SessionOptions(frames=4, clips=1), generation=SHORT)
    a.ask("and now?")
    b.ask("what moves?")
    assert a.history[0] == ("hi", "hello") and len(a.history) == 2 and len(b.history) == 1
    assert engine.kv_budget.used_bytes > 0  # both caches count against the engine's one budget
    a.history.append(("x", "y"))  # a copy: the conversation is unchanged
    assert len(a.history) == 2


def test_the_language_model_is_chosen_when_the_engine_is_built(model):
    assert isinstance(Engine(model).llm, LocalLanguageModel) and Engine(model).notice == model.notice
    remote = Engine(model, llm=RemoteLLM("http://127.0.0.1:9/v1", model="served"))
    assert isinstance(remote.llm, RemoteLanguageModel) and "served on http://127.0.0.1:9/v1" in remote.notice


def test_the_loaded_model_never_changes(model):
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.llm = object()
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.settings.frames = 2


def test_the_retriever_loads_once_per_engine(model):
    engine = Engine(model)
    assert engine.retriever() is engine.retriever()
    selecting = engine.open(VIDEO, SessionOptions(frames=2, select=1, candidates=4), question="what grows?",
                            generation=SHORT)
    assert selecting.selection is not None and len(selecting.clip_spans) == 1
    assert engine.retriever().encodes == 4  # the four candidates, embedded once with this engine's retriever
