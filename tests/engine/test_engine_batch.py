"""Several videos at once on the engine: one tower call (Engine.encode_many), one padded generate (Engine.ask_many).

The features of a video encoded with others equal its features encoded alone within fp32 rounding, in
both temporal modes; greedy answers from one padded ``generate`` equal each conversation's own ``ask``
on the demo model (whose smallest top-two logit margin on these prompts is far above the padding's
rounding: docs/batch.md has the figures), and a prompt that does not fit is that conversation's error.
"""

from __future__ import annotations

import pytest
import torch

from mugstan_chat.engine.engine import Engine
from mugstan_chat.engine.feature_cache import FeatureCache
from mugstan_chat.engine.turns import ConversationTooLong, GenerationSettings
from mugstan_chat.session_options import SessionOptions
from mugstan_chat.video import load_video_clips

FRAMES, CLIPS = 2, 2
OPTIONS = SessionOptions(frames=FRAMES, clips=CLIPS)
GREEDY = GenerationSettings(max_new_tokens=12)


@pytest.fixture(scope="module")
def model(demo_chat_model):
    return demo_chat_model(FRAMES)


@pytest.fixture(scope="module")
def videos(synthetic_videos):
    return [str(path) for path, _ in synthetic_videos(6, seed=11, size=32, frames=8).videos][:5]


@pytest.fixture(scope="module")
def decoded(model, videos):
    return [load_video_clips(v, frames_per_clip=FRAMES, num_clips=CLIPS, mode="eval",
                             image_processor=model.processor.image_processor) for v in videos]


def _tolerance(model, features: list[torch.Tensor]) -> float:
    """fp32 rounding of a dot product of n terms is at most about n * eps relative to its magnitude; the widest
    reduction in the tower + projector is the MLP's inner width, taken twice for the layers it passes."""
    vision = model.model.config.vision_config
    n = max(vision.intermediate_size, model.model.config.text_config.hidden_size)
    scale = max(float(f.abs().max()) for f in features)
    return 2 * n * torch.finfo(torch.float32).eps * scale


@pytest.mark.parametrize("temporal", ["stan", "mean"])
def test_features_encoded_together_equal_each_video_alone(model, videos, decoded, temporal):
    engine = Engine(model, feature_cache=FeatureCache(1 << 20))
    calls = model.tower.calls
    together = engine.encode_many(decoded, OPTIONS, temporal=temporal)
    assert model.tower.calls == calls + 1  # one tower call for every clip of the five videos
    assert [len(e.features) for e in together] == [CLIPS] * len(videos)
    for video, clips, encoded in zip(videos, decoded, together):
        alone = engine.open(video, OPTIONS, decoded=clips, temporal=temporal).features
        tolerance = _tolerance(model, alone)
        for a, b in zip(alone, encoded.features):
            assert a.shape == b.shape
            assert float((a - b).abs().max()) <= tolerance
        opened = engine.open(video, OPTIONS, decoded=clips, encoded=encoded, temporal=temporal)
        assert all(torch.equal(a, b) for a, b in zip(opened.features, encoded.features))


def test_encoded_features_must_match_the_conversation(model, videos, decoded):
    engine = Engine(model, feature_cache=FeatureCache(1 << 20))
    encoded = engine.encode_many(decoded[:1], OPTIONS, temporal="mean")
    with pytest.raises(ValueError, match="mean"):
        engine.open(videos[0], OPTIONS, decoded=decoded[0], encoded=encoded[0], temporal="stan")
    with pytest.raises(ValueError, match="uniform clips"):
        engine.encode_many(decoded[:1], SessionOptions(frames=FRAMES, clips=None, select=1, candidates=2))


def test_one_padded_generate_answers_as_each_ask(model, videos, decoded):
    engine = Engine(model, feature_cache=FeatureCache(1 << 20))
    questions = [f"what moves in video {i}?" + " and then?" * i for i in range(len(videos))]  # unequal lengths
    alone = [engine.open(v, OPTIONS, decoded=d, generation=GREEDY).ask(q)
             for v, d, q in zip(videos, decoded, questions)]
    encoded = engine.encode_many(decoded, OPTIONS)
    opened = [engine.open(v, OPTIONS, decoded=d, encoded=e, generation=GREEDY)
              for v, d, e in zip(videos, decoded, encoded)]
    answers = engine.ask_many(opened, questions)
    assert answers == alone
    for conversation, question, answer in zip(opened, questions, answers):
        assert conversation.history == [(question, answer)]
        stats = conversation.last_stats
        assert stats.new_tokens >= 1 and stats.prefill_tokens == stats.prompt_tokens
    follow = opened[1].ask("and after that?")  # a conversation answered in a batch goes on alone
    assert follow == engine.open(videos[1], OPTIONS, decoded=decoded[1], generation=GREEDY,
                                 history=[(questions[1], answers[1])]).ask("and after that?")


def test_a_turn_that_does_not_fit_is_its_own_error(model, videos, decoded):
    engine = Engine(model, feature_cache=FeatureCache(1 << 20))
    opened = [engine.open(v, OPTIONS, decoded=d, generation=GREEDY) for v, d in zip(videos[:3], decoded[:3])]
    long = "why " * (model.context_length + 10)
    answers = engine.ask_many(opened, ["what moves?", long, "what moves?"])
    assert isinstance(answers[1], ConversationTooLong) and opened[1].history == []
    assert answers[0] == opened[0].history[0][1] and isinstance(answers[2], str)


def test_sampling_or_a_repetition_penalty_answers_each_turn_alone(model, videos, decoded):
    engine = Engine(model, feature_cache=FeatureCache(1 << 20))
    for settings in (GenerationSettings(max_new_tokens=8, repetition_penalty=1.3),
                     GenerationSettings(max_new_tokens=8, temperature=0.8, seed=5)):
        alone = [engine.open(v, OPTIONS, decoded=d, generation=settings).ask("what moves?")
                 for v, d in zip(videos[:3], decoded[:3])]
        opened = [engine.open(v, OPTIONS, decoded=d, generation=settings) for v, d in zip(videos[:3], decoded[:3])]
        assert engine.ask_many(opened, ["what moves?"] * 3) == alone
