"""Conversation KV reuse and the fail-before-work context check. CPU only, demo-sized models, no network.

Exactness is checked token for token: a session with reuse and one without answer the
same questions, and the generated ids (recorded from ``generate``) must be equal.
"""

import dataclasses

import pytest
import torch

import mugstan_chat.engine.conversation as chat_module
from mugstan_chat.engine.conversation import ChatSession, ConversationTooLong, GenerationSettings
from mugstan_chat.entrypoints.cli import main
from mugstan_chat.llava.loader import ChatModel, load_chat_model
from mugstan_chat.engine.prefix_cache import CacheBudget, cache_bytes, common_prefix_length, kv_bytes_per_token
from mugstan_chat.engine.engine import Engine

GREEDY = GenerationSettings(max_new_tokens=10)
SAMPLED = GenerationSettings(max_new_tokens=10, temperature=1.0, top_p=0.9)
QUESTIONS = ["what happens in the video?", "and after that?", "why?", "describe the colours"]
# A ChatML-style template (Qwen's layout): a different turn structure and end-of-answer marker
CHATML = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n{% else %}{{ item['text'] }}"
    "{% endif %}{% endfor %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="module")
def video(synthetic_videos):
    return str(synthetic_videos(2, seed=0, size=64, frames=16).videos[0][0])


# Exactness is compared in float64: reuse and no reuse sum the same products in different orders
# (a full prefill vs a cached prefix plus the rest), which moves fp32 logits by ~1e-6 and could flip a
# greedy choice between two near-tied tokens of a random model on some CPU; in float64 such a flip
# needs a tie within ~1e-14.
@pytest.fixture(scope="module")
def chat_model():
    chat_model = load_chat_model(demo=True, device="cpu", frames=4)
    chat_model.model.to(torch.float64)
    assert {p.dtype for p in chat_model.model.parameters()} == {torch.float64}
    return chat_model


@pytest.fixture(scope="module")
def chatml_model():
    chat_model = load_chat_model(demo=True, device="cpu", frames=4, seed=1)
    chat_model.model.to(torch.float64)
    chat_model.processor.chat_template = CHATML
    chat_model.processor.tokenizer.chat_template = CHATML
    return chat_model


class Recorder:
    """Wraps ``generate``: keeps each call's new token ids and the tokens its first forward prefilled."""

    def __init__(self, chat_model, monkeypatch):
        self.answers, self.prefilled = [], []
        model = chat_model.model
        real_generate = model.generate

        def generate(**kwargs):
            self._first = True
            output = real_generate(**kwargs)
            self.answers.append(output[0, kwargs["input_ids"].shape[1]:].tolist())
            return output

        def count_prefill(module, args, kwargs):
            if self._first:
                self.prefilled.append(kwargs["inputs_embeds"].shape[1])
                self._first = False

        monkeypatch.setattr(model, "generate", generate)
        handle = model.model.language_model.register_forward_pre_hook(count_prefill, with_kwargs=True)
        self._handle = handle

    def close(self):
        self._handle.remove()


def converse(session, questions, stream=False):
    for question in questions:
        if stream:
            "".join(session.ask_stream(question))
        else:
            session.ask(question)


def run_both(chat_model, video, monkeypatch, script, **session_kwargs):
    """Runs ``script(session)`` on a session with reuse and one without; returns both recorders."""
    recorders = []
    for reuse in (True, False):
        with monkeypatch.context() as patch:  # each recorder's wrapper undone before the next
            recorder = Recorder(chat_model, patch)
            session = ChatSession(Engine(chat_model), video, reuse_cache=reuse, cache_budget=CacheBudget(), **session_kwargs)
            script(session)
            recorder.close()
        recorders.append((recorder, session))
    return recorders


@pytest.mark.parametrize("template", ["llava", "chatml"])
@pytest.mark.parametrize("stream", [False, True])
def test_greedy_answers_with_reuse_equal_answers_without(chat_model, chatml_model, video, monkeypatch, template,
                                                         stream):
    model = chat_model if template == "llava" else chatml_model
    system = None if template == "llava" else "You describe videos."
    (reused, with_reuse), (full, without) = run_both(
        model, video, monkeypatch, lambda s: converse(s, QUESTIONS, stream=stream), generation=GREEDY, system=system)
    assert reused.answers == full.answers
    assert all(len(answer) > 0 for answer in full.answers)
    # without reuse every turn prefills its whole prompt; with reuse, turns 2.. only their new part
    assert full.prefilled == [t.prompt_tokens for t in without.turns]
    assert reused.prefilled == [t.prefill_tokens for t in with_reuse.turns]
    assert reused.prefilled[0] == with_reuse.turns[0].prompt_tokens
    for turn in with_reuse.turns[1:]:
        assert turn.reused_tokens > with_reuse.visual_tokens  # the system and video prefix came from the cache
        assert turn.prefill_tokens + turn.reused_tokens == turn.prompt_tokens
        assert turn.prefill_tokens < turn.prompt_tokens - with_reuse.visual_tokens


def test_seeded_sampling_with_reuse_equals_sampling_without(chat_model, video, monkeypatch):
    (reused, _), (full, _) = run_both(chat_model, video, monkeypatch, lambda s: converse(s, QUESTIONS),
                                      generation=dataclasses.replace(SAMPLED, seed=7))
    assert reused.answers == full.answers


def test_reset_undo_and_overflow_keep_answers_exact(chat_model, video, monkeypatch):
    def script(session):
        converse(session, QUESTIONS[:2])
        session.reset()
        converse(session, QUESTIONS[2:3])
        session.undo_last()
        converse(session, QUESTIONS[1:3])  # a different question where the undone turn was
        session.undo_last()
        converse(session, QUESTIONS[2:3])  # regenerate the same question
        # outgrow the context: the turn that does not fit is refused, the cache stays usable
        limit = session.turns[-1].prompt_tokens + session.turns[-1].new_tokens + 12
        with monkeypatch.context() as patch:
            patch.setattr(ChatModel, "context_length", property(lambda self: limit))
            converse(session, QUESTIONS[:1])  # fits, answer clipped
            with pytest.raises(ConversationTooLong):
                session.ask(QUESTIONS[3] * 8)
        session.reset()
        converse(session, QUESTIONS[3:])

    (reused, with_reuse), (full, _) = run_both(chat_model, video, monkeypatch, script, generation=GREEDY)
    assert reused.answers == full.answers
    assert len(reused.answers) == 8
    assert any(turn.clipped for turn in with_reuse.turns)  # the overflow turn ran with a clipped limit
    assert with_reuse.turns[-1].reused_tokens > with_reuse.visual_tokens  # after reset: the video prefix is reused


def test_new_features_drop_the_cache(chat_model, video, monkeypatch):
    other = ChatSession(Engine(chat_model), video, generation=GREEDY, temporal="mean", cache_budget=CacheBudget())
    session = ChatSession(Engine(chat_model), video, generation=GREEDY, cache_budget=CacheBudget())
    session.ask(QUESTIONS[0])
    assert session.cached_tokens > 0
    session.attach_features(other.video_features)  # same placeholder ids, different features
    assert session.cached_tokens == 0
    session.reset()
    assert session.ask(QUESTIONS[0]) == other.ask(QUESTIONS[0])
    assert session.last_stats.reused_tokens == 0


def test_budget_drops_the_least_recently_used_cache(chat_model, video):
    config, dtype = chat_model.model.config.text_config, chat_model.model.dtype
    first = ChatSession(Engine(chat_model), video, generation=GREEDY, cache_budget=CacheBudget())
    first.ask(QUESTIONS[0])
    per_token = kv_bytes_per_token(config, dtype)
    assert cache_bytes(first.kv.cache) == per_token * first.cached_tokens
    budget = CacheBudget(max_bytes=per_token * (first.cached_tokens + 4))  # room for one such cache
    a = ChatSession(Engine(chat_model), video, generation=GREEDY, cache_budget=budget)
    b = ChatSession(Engine(chat_model), video, generation=GREEDY, cache_budget=budget)
    a.ask(QUESTIONS[0])
    assert a.cached_tokens > 0 and budget.used_bytes == per_token * a.cached_tokens
    b.ask(QUESTIONS[0])
    assert a.cached_tokens == 0 and b.cached_tokens > 0  # a was least recently used
    assert budget.used_bytes == per_token * b.cached_tokens
    a.reset()
    a.ask(QUESTIONS[0])  # a prefills its whole prompt again, and b's cache goes
    assert a.last_stats.reused_tokens == 0 and a.cached_tokens > 0 and b.cached_tokens == 0
    tiny = CacheBudget(max_bytes=per_token)  # no cache fits: none is kept
    c = ChatSession(Engine(chat_model), video, generation=GREEDY, cache_budget=tiny)
    c.ask(QUESTIONS[0])
    assert c.cached_tokens == 0 and tiny.used_bytes == 0


def test_common_prefix_length():
    assert common_prefix_length(torch.tensor([1, 2, 3]), torch.tensor([1, 2, 4, 5])) == 2
    assert common_prefix_length(torch.tensor([1, 2]), torch.tensor([1, 2, 4])) == 2
    assert common_prefix_length(torch.tensor([9]), torch.tensor([1])) == 0
    assert common_prefix_length(torch.tensor([], dtype=torch.long), torch.tensor([1])) == 0


def failing_reader(*args, **kwargs):
    raise AssertionError("the video was decoded")


def test_prompt_size_is_known_before_decoding(chat_model, video):
    for frames_as_images in (False, True):
        session = ChatSession(Engine(chat_model), video, clips=2, frames_as_images=frames_as_images, prepare=False)
        predicted = session.check_fits(QUESTIONS[0])
        assert not session.prepared
        session.prepare()
        assert session.build_prompt(QUESTIONS[0])["input_ids"].shape[1] == predicted


def test_a_prompt_that_cannot_fit_is_refused_before_decoding(chat_model, video, monkeypatch):
    monkeypatch.setattr(chat_module, "load_video_clips", failing_reader)
    session = ChatSession(Engine(chat_model), video, frames=64, clips=8, frames_as_images=True, prepare=False)
    with pytest.raises(ConversationTooLong, match=r"largest --clips that fits is (\d+)") as error:
        session.ask(QUESTIONS[0])
    largest = int(str(error.value).split("fits is ")[1].split()[0])
    assert largest >= 1
    context = chat_model.context_length
    assert session._prompt_tokens(QUESTIONS[0], largest) < context <= session._prompt_tokens(QUESTIONS[0], largest + 1)
    with pytest.raises(ConversationTooLong, match="largest --clips"):
        ChatSession(Engine(chat_model), video, frames=64, clips=8, frames_as_images=True)  # prepare=True: same refusal


def test_cli_refuses_too_many_clips_without_decoding(video, monkeypatch, capsys):
    monkeypatch.setattr(chat_module, "load_video_clips", failing_reader)
    monkeypatch.setattr(ChatModel, "context_length", property(lambda self: 80))  # demo: 16 tokens per clip
    for command in (["ask", video, "what happens?"], ["chat", video]):
        assert main([*command, "--demo", "--frames", "4", "--clips", "8"]) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert "error:" in last and "largest --clips that fits is" in last and "context is 80" in last
