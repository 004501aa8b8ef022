"""Clip times (docs/design.md section 4c): spans from the sampled frames, the prompt template, --clips auto.

A video is written with known segments, one colour per segment, so where a clip comes from can
be read off its pixels as well as off its reported times.
"""

import numpy as np
import pytest

from mugstan_chat.engine.conversation import ChatSession, ConversationTooLong, GenerationSettings
from mugstan_chat.llava.loader import load_chat_model
from mugstan_chat.timeline import ClipSpan, clip_label, format_time, label_images
from mugstan_chat.video import read_frames, write_video
from mugstan_chat.engine.engine import Engine

FPS = 8
SEGMENT_FRAMES = 12  # 1.5 s per segment
COLOURS = [(220, 40, 40), (40, 190, 70), (50, 80, 230), (235, 215, 50)]
SHORT = GenerationSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def segmented(tmp_path_factory):
    """A 6 s video: four 1.5 s segments of one flat colour each."""
    path = tmp_path_factory.mktemp("times") / "segments.mp4"
    frames = [np.full((64, 64, 3), colour, dtype=np.uint8) for colour in COLOURS for _ in range(SEGMENT_FRAMES)]
    write_video(path, frames, fps=FPS, options={"crf": "10"})
    return str(path)


def _segment_of(seconds: float) -> int:
    return int(seconds * FPS) // SEGMENT_FRAMES


def test_spans_are_the_sampled_frames_times_and_the_prompt_carries_them(chat_model, segmented):
    session = ChatSession(Engine(chat_model), segmented, frames=4, clips=4, generation=SHORT)
    spans = session.clip_spans
    indices = session.frame_indices
    assert [(s.start, s.end) for s in spans] == [(min(c) / FPS, max(c) / FPS) for c in indices]
    assert [s.number for s in spans] == [1, 2, 3, 4]
    # four clips over four equal segments: clip k lies in segment k, and its pixels are segment k's colour
    for k, (span, clip) in enumerate(zip(spans, indices)):
        assert _segment_of(span.start) == _segment_of(span.end) == k
        pixels = read_frames(segmented, clip).reshape(-1, 3).mean(0)
        assert np.abs(pixels - np.array(COLOURS[k])).max() < 20
    # not the nominal grid: the first clip starts at its first sampled frame, not at 0
    assert spans[0].start > 0
    prompt = session.prompt_text("what colour comes after red?")
    labels = [clip_label(span, precise=True) for span in spans]
    for label in labels:
        assert label + "<image>" in prompt
    assert prompt.index(labels[0]) < prompt.index(labels[3]) < prompt.index("what colour")
    assert session.ask("what colour comes after red?") is not None
    assert session.summary()["clip_spans"][1] == spans[1].to_dict()


def test_a_window_reports_times_in_the_whole_video(chat_model, segmented):
    session = ChatSession(Engine(chat_model), segmented, frames=2, clips=2, start=3.0, end=6.0, generation=SHORT)
    assert all(3.0 <= s.start <= s.end < 6.0 for s in session.clip_spans)
    assert [_segment_of(s.start) for s in session.clip_spans] == [2, 3]


def test_one_clip_keeps_the_stock_prompt_unless_asked(chat_model, segmented):
    default = ChatSession(Engine(chat_model), segmented, frames=4, clips=1, generation=SHORT)
    off = ChatSession(Engine(chat_model), segmented, frames=4, clips=3, generation=SHORT, clip_times="off")
    on = ChatSession(Engine(chat_model), segmented, frames=4, clips=1, generation=SHORT, clip_times="on")
    assert "Clip" not in default.prompt_text("what happens?")
    assert "Clip" not in off.prompt_text("what happens?")
    assert on.prompt_text("what happens?").count("Clip 1 (") == 1
    with pytest.raises(ValueError, match="clip_times"):
        ChatSession(Engine(chat_model), segmented, clip_times="sometimes", prepare=False)


def test_time_format_and_labels():
    assert format_time(0) == "00:00" and format_time(59.99) == "00:59" and format_time(61) == "01:01"
    assert format_time(3725) == "1:02:05" and format_time(1.26, precise=True) == "00:01.2"
    spans = [ClipSpan(1, 0.0, 30.0), ClipSpan(2, 30.5, 60.0)]
    text = label_images("USER: <image>\n<image>\nq ASSISTANT:", "<image>", spans)
    assert text == "USER: Clip 1 (00:00-00:30): <image>\nClip 2 (00:30-01:00): <image>\nq ASSISTANT:"
    with pytest.raises(ValueError):
        label_images("<image>", "<image>", spans)


@pytest.fixture(scope="module")
def small_context():
    """A demo model of its own with a 400-token context, so the context (not the video) bounds --clips auto."""
    chat_model = load_chat_model(demo=True, device="cpu", frames=4)
    chat_model.model.config.text_config.max_position_embeddings = 400
    return chat_model


@pytest.mark.parametrize("question, answer_budget", [("what happens?", 8), ("what happens " * 30, 8),
                                                     ("what happens?", 120)])
def test_auto_clips_fill_the_context_and_no_more(small_context, segmented, question, answer_budget):
    """Counted with the tokenizer: C clips fit with the answer budget, C + 1 do not (or exceed the video)."""
    generation = GenerationSettings(max_new_tokens=answer_budget)
    session = ChatSession(Engine(small_context), segmented, frames=2, clips="auto", generation=generation, prepare=False)
    chosen = session.resolve_clips(question)
    context = small_context.context_length
    assert session.check_fits(question) + answer_budget <= context
    more = ChatSession(Engine(small_context), segmented, frames=2, clips=chosen + 1, generation=generation, prepare=False)
    try:
        assert more.check_fits(question) + answer_budget > context
    except ConversationTooLong:
        pass
    answer = session.ask(question)
    stats = session.last_stats
    assert answer is not None and len(session.clip_spans) == chosen and not stats.clipped
    assert stats.prompt_tokens + answer_budget <= context


def test_auto_clips_never_exceed_what_the_video_holds(chat_model, segmented):
    """48 frames at T = 8 hold 6 distinct clips, however much context is left."""
    session = ChatSession(Engine(chat_model), segmented, frames=8, clips="auto", generation=SHORT, prepare=False)
    assert session.resolve_clips("what happens?") == 6
    session.ask("what happens?")
    indices = [i for clip in session.frame_indices for i in clip]
    assert len(set(indices)) == len(indices) == 48


def test_auto_clips_never_exceed_the_given_limit(chat_model, segmented):
    """A server passes its --max-clips: auto stops there even when the video and the context hold more."""
    session = ChatSession(Engine(chat_model), segmented, frames=8, clips="auto", generation=SHORT, prepare=False,
                          max_auto_clips=4)
    assert session.resolve_clips("what happens?") == 4


@pytest.mark.parametrize("clip_times, history", [("on", []), ("off", []), ("on", [("what is red?", "a square")])])
def test_auto_clip_counting_equals_the_full_prompt_for_every_count(chat_model, segmented, clip_times, history,
                                                                   monkeypatch):
    """The counter behind --clips auto templates the conversation three times and counts any C as the full prompt."""
    import mugstan_chat.engine.conversation as conversation_module

    session = ChatSession(Engine(chat_model), segmented, frames=2, clips="auto", clip_times=clip_times,
                          generation=SHORT, prepare=False, history=history)
    renders = []
    real = conversation_module.render_prompt
    monkeypatch.setattr(conversation_module, "render_prompt", lambda *a, **k: renders.append(1) or real(*a, **k))
    counter = session._counter("what happens next?")
    counts = [counter(c) for c in range(1, 13)]
    assert len(renders) == 3 and counter.renders == 3  # the template ran for one, two and three images, never again
    monkeypatch.setattr(conversation_module, "render_prompt", real)
    assert counts == [session._prompt_tokens("what happens next?", c) for c in range(1, 13)]
    assert all(b > a for a, b in zip(counts, counts[1:]))  # each clip adds its tokens (and label)


def test_a_template_that_is_not_linear_in_images_is_rendered_for_every_count():
    from mugstan_chat.engine.planning import PromptCounter

    def numbered(images: int) -> str:  # a template that numbers its images: the copy rule does not hold
        return "USER: " + "".join(f"<image>#{i} " for i in range(images)) + "hi ASSISTANT:"

    counter = PromptCounter(numbered, lambda text, images: text, len, "<image>")
    assert [counter(c) for c in (1, 2, 3, 10)] == [len(numbered(c)) for c in (1, 2, 3, 10)]
    assert counter.renders > 3
