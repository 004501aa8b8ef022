"""The chat engine on the demo model: caching, streaming, prompts, context limits. CPU only, no network."""

import threading

import numpy as np
import pytest
import torch

import mugstan_chat.engine.conversation as chat_module
from mugstan_chat.engine.conversation import ChatSession, ConversationTooLong, GenerationSettings
from mugstan_chat.engine.turns import SeededSampler
from mugstan_chat.video import VideoDecodeError, read_frames
from mugstan_chat.engine.engine import Engine

SHORT = GenerationSettings(max_new_tokens=12)


@pytest.fixture(scope="module")
def videos(synthetic_videos):
    return [str(path) for path, _ in synthetic_videos(2, seed=0, size=64, frames=16).videos]


def test_follow_up_reuses_cached_features(chat_model, videos, monkeypatch):
    reads = []
    real_reader = chat_module.load_video_clips

    def counting_reader(*args, **kwargs):
        reads.append(args)
        return real_reader(*args, **kwargs)

    monkeypatch.setattr(chat_module, "load_video_clips", counting_reader)
    tower = chat_model.tower
    calls_before = tower.calls
    session = ChatSession(Engine(chat_model), videos[0], generation=SHORT, prepare=False)
    first = session.ask("what happens in the video?")
    assert len(reads) == 1 and tower.calls == calls_before + 1
    second = "".join(session.ask_stream("why?"))
    session.reset()
    third = session.ask("what happens in the video?")
    assert len(reads) == 1 and tower.calls == calls_before + 1  # never decoded or encoded again
    assert first and second and third == first
    stats = session.turns
    assert stats[0].decode_ms > 0 and stats[0].encode_ms > 0 and not stats[0].cached_features
    assert all(s.decode_ms == 0 and s.encode_ms == 0 and s.cached_features for s in stats[1:])
    assert stats[1].first_token_ms is not None and 0 < stats[1].first_token_ms <= stats[1].total_ms
    assert stats[0].visual_tokens == 16 and stats[0].prompt_tokens > 16


def test_greedy_streaming_equals_whole_answer(chat_model, videos):
    whole = ChatSession(Engine(chat_model), videos[0], generation=SHORT).ask("describe the video")
    session = ChatSession(Engine(chat_model), videos[0], generation=SHORT)
    pieces = list(session.ask_stream("describe the video"))
    assert len(pieces) > 1  # streamed in several pieces
    assert "".join(pieces).strip() == whole
    assert session.history == [("describe the video", whole)]
    assert session.last_stats.new_tokens == SHORT.max_new_tokens


def test_prompt_matches_the_processor_on_images(chat_model, videos):
    """With clip times off, the session's tokens are exactly what LLaVA's processor makes for C images."""
    processor = chat_model.processor
    session = ChatSession(Engine(chat_model), videos[0], clips=3, generation=SHORT, clip_times="off")
    ids = session.build_prompt("what happens?")["input_ids"]
    frames = read_frames(videos[0], [0, 1, 2])
    content = [{"type": "image"}] * 3 + [{"type": "text", "text": "what happens?"}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    expected = processor(text=text, images=list(np.asarray(frames)), return_tensors="pt").input_ids
    assert torch.equal(ids, expected)
    assert session.visual_tokens == 3 * 16
    assert session.ask("what happens?")


def test_history_enters_the_prompt_and_reset_clears_it(chat_model, videos):
    session = ChatSession(Engine(chat_model), videos[0], generation=SHORT)
    answer = session.ask("what happens?")
    messages = session.messages("and then?")
    assert [m["role"] for m in messages] == ["user", "assistant", "user"]
    assert messages[1]["content"][0]["text"] == answer
    assert sum(c["type"] == "image" for m in messages for c in m["content"]) == 1  # images in turn one only
    longer = session.build_prompt("and then?")["input_ids"].shape[1]
    session.reset()
    assert session.history == [] and session.visual_tokens == 16
    assert session.build_prompt("and then?")["input_ids"].shape[1] < longer


def test_max_new_tokens_is_clipped_to_the_context_and_overflow_is_an_error(chat_model, videos, monkeypatch):
    session = ChatSession(Engine(chat_model), videos[0], generation=GenerationSettings(max_new_tokens=50))
    prompt = session.build_prompt("what happens?")["input_ids"].shape[1]
    monkeypatch.setattr(type(chat_model), "context_length", property(lambda self: prompt + 3))
    session.ask("what happens?")
    assert session.last_stats.clipped and session.last_stats.max_new_tokens == 3
    assert session.last_stats.new_tokens <= 3
    with pytest.raises(ConversationTooLong, match="reset"):
        session.ask("and then what happens?")
    with pytest.raises(ConversationTooLong):
        next(session.ask_stream("and then what happens?"))
    assert len(session.history) == 1  # the overlong question was not recorded


def test_sessions_are_independent(chat_model, videos):
    first = ChatSession(Engine(chat_model), videos[0], generation=SHORT)
    second = ChatSession(Engine(chat_model), videos[1], generation=SHORT)
    first.ask("what happens?")
    assert second.history == [] and len(first.history) == 1
    assert first.frame_indices == second.frame_indices and len(first.frame_indices[0]) == 4
    assert not torch.equal(first.features[0], second.features[0])


def test_closing_a_stream_stops_generation(chat_model, videos):
    session = ChatSession(Engine(chat_model), videos[0], generation=GenerationSettings(max_new_tokens=400))
    stream = session.ask_stream("what happens?")
    next(stream)
    stream.close()
    assert session.last_stats.new_tokens < 400
    assert len(session.history) == 1
    assert not any(t.name == "mugstan-chat-generate" for t in threading.enumerate())


def test_missing_video_names_the_file(chat_model, tmp_path):
    missing = tmp_path / "nowhere.mp4"
    with pytest.raises(VideoDecodeError, match="nowhere.mp4"):
        ChatSession(Engine(chat_model), missing)


def test_generation_settings_are_validated():
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    greedy = GenerationSettings().generate_kwargs()
    assert greedy["do_sample"] is False and "logits_processor" not in greedy
    sampled = GenerationSettings(temperature=0.7, top_p=0.9, seed=5).generate_kwargs()
    # sampling = transformers' own warpers, then a draw from the turn's own generator (never the global one)
    warpers = list(sampled["logits_processor"])
    assert isinstance(warpers[0], TemperatureLogitsWarper) and warpers[0].temperature == 0.7
    assert isinstance(warpers[1], TopPLogitsWarper) and warpers[1].top_p == 0.9
    assert isinstance(warpers[2], SeededSampler) and warpers[2].seed == 5
    for bad in (dict(max_new_tokens=0), dict(top_p=0), dict(temperature=float("nan")), dict(seed=-1)):
        with pytest.raises(ValueError):
            GenerationSettings(**bad).generate_kwargs()


def test_seeded_sampler_draws_from_the_softmax_with_its_own_generator():
    """argmax(scores + Gumbel noise) is a draw from softmax(scores). n = 20000 draws: each frequency's
    standard error is <= sqrt(0.25 / n) = 0.0035; 0.02 is more than 5 of them."""
    scores = torch.tensor([[2.0, 1.0, 0.0, float("-inf"), -1.0]])  # (1, V); -inf: masked by top-p
    expected = torch.softmax(scores, dim=-1)[0]
    sampler = SeededSampler(seed=11)
    torch.manual_seed(0)
    draws = torch.stack([sampler(None, scores).argmax(dim=-1)[0] for _ in range(20000)])
    frequencies = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert torch.allclose(frequencies, expected.double(), atol=0.02)
    assert frequencies[3] == 0  # a masked token is never drawn
    # repeatable from its seed, whatever the global generator does in between; another seed differs
    def draw(seed: int) -> list[int]:
        sampler = SeededSampler(seed=seed)
        picks = []
        for step in range(50):
            torch.manual_seed(step)  # the global generator moves; the sampler must not care
            picks.append(sampler(None, scores).argmax().item())
        return picks

    assert draw(3) == draw(3) and draw(3) != draw(4)


def test_sessions_choose_their_temporal_mode_without_touching_the_shared_tower(chat_model, videos):
    tower = chat_model.tower
    assert tower.mode == "stan" and tower.available_modes == ["stan", "mean"]
    fused = ChatSession(Engine(chat_model), videos[0], generation=SHORT)
    plain = ChatSession(Engine(chat_model), videos[0], generation=SHORT, temporal="mean")
    assert tower.mode == "stan" and (fused.temporal, plain.temporal) == ("stan", "mean")
    assert not torch.allclose(fused.features[0], plain.features[0])
    with pytest.raises(ValueError, match="not available"):
        ChatSession(Engine(chat_model), videos[0], temporal="max")


def test_undo_last_forgets_one_turn_so_the_question_can_be_asked_again(chat_model, videos):
    session = ChatSession(Engine(chat_model), videos[0], generation=SHORT)
    first = session.ask("what happens?")
    session.ask("and then?")
    assert session.undo_last()[0] == "and then?"
    assert len(session.history) == 1 and len(session.turns) == 1
    session.undo_last()
    assert session.undo_last() is None and session.history == []
    assert session.ask("what happens?") == first  # greedy: the same prompt gives the same answer


def test_session_decodes_under_the_limits_it_is_given(chat_model, videos):
    from mugstan_chat.video import VideoLimits

    with pytest.raises(VideoDecodeError, match="pair"):  # the synthetic file names start with "pair"
        ChatSession(Engine(chat_model), videos[0], limits=VideoLimits(max_seconds=0.5))
    assert ChatSession(Engine(chat_model), videos[0], limits=VideoLimits(max_seconds=60)).prepared
