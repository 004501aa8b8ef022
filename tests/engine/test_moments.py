"""Moments an answer names (mugstan_chat.engine.moments): times, ranges and clip numbers read back as references."""

import numpy as np
import pytest

from mugstan_chat.engine.conversation import ChatSession, GenerationSettings
from mugstan_chat.engine.moments import find_references, parse_time
from mugstan_chat.timeline import ClipSpan, clip_label, format_time
from mugstan_chat.video import write_video
from mugstan_chat.engine.engine import Engine

SPANS = [ClipSpan(1, 2.0, 28.5), ClipSpan(2, 32.0, 58.5), ClipSpan(3, 62.0, 88.5)]


def test_times_ranges_and_clips_are_found_in_order():
    answer = "She opens the fridge at 00:41, drinks from 1:02-1:20, and in Clip 3 she leaves (01:25 to 01:28)."
    refs = find_references(answer, SPANS, duration=90.0)
    assert [(r.text, r.start, r.end, r.clip) for r in refs] == [
        ("00:41", 41.0, 41.0, 2), ("1:02-1:20", 62.0, 80.0, 3), ("Clip 3", 62.0, 88.5, 3),
        ("01:25 to 01:28", 85.0, 88.0, 3)]
    for ref in refs:
        assert answer[ref.offset:ref.offset + len(ref.text)] == ref.text
    assert refs[0].to_dict() == {"start": 41.0, "end": 41.0, "clip": 2, "text": "00:41", "offset": 24}


def test_what_is_not_a_moment_of_this_video_is_dropped():
    # past the end, a clip never shown, a backwards range, a clock time inside a longer number, a ratio
    answer = "At 12:00 nothing; Clip 7 is absent; 01:10-00:20 is backwards; version 1:2:33:4; 3:4 ratio"
    assert find_references(answer, SPANS, duration=90.0) == []
    # between two shown clips: a moment, but of no clip
    (between,) = find_references("at 00:30", SPANS, duration=90.0)
    assert between.clip is None and between.start == 30.0


def test_the_labels_own_format_reads_back():
    """Whatever timeline writes (H:MM:SS, tenths) parses to the time it floored."""
    for seconds, precise in ((83.7, False), (3725.0, False), (12.34, True)):
        text = format_time(seconds, precise)
        assert parse_time(text) == pytest.approx(int(seconds * (10 if precise else 1)) / (10 if precise else 1))
    label = clip_label(ClipSpan(2, 3.25, 5.75), precise=True)  # "Clip 2 (00:03.2-00:05.7): "
    refs = find_references(label, [ClipSpan(2, 3.25, 5.75)], duration=6.0)
    assert [(r.text, r.clip) for r in refs] == [("Clip 2", 2), ("00:03.2-00:05.7", 2)]
    assert refs[1].start == pytest.approx(3.2) and refs[1].end == pytest.approx(5.7)


@pytest.fixture(scope="module")
def video(tmp_path_factory):
    path = tmp_path_factory.mktemp("moments") / "grey.mp4"
    write_video(path, [np.full((32, 32, 3), 20 * (i // 8), dtype=np.uint8) for i in range(48)], fps=8)
    return str(path)


@pytest.fixture(scope="module")
def chat_model(demo_chat_model):
    return demo_chat_model(2)


def test_a_session_references_only_when_its_prompt_showed_times(chat_model, video):
    short = GenerationSettings(max_new_tokens=4)
    several = ChatSession(Engine(chat_model), video, frames=2, clips=3, generation=short)
    refs = several.references("look at 00:03 and Clip 1")
    assert [(r.text, r.clip) for r in refs] == [("00:03", 2), ("Clip 1", 1)]
    assert refs[1].start == several.clip_spans[0].start
    one = ChatSession(Engine(chat_model), video, frames=2, clips=1, generation=short)  # stock prompt: no times shown
    assert one.references("look at 00:03") == []
    forced = ChatSession(Engine(chat_model), video, frames=2, clips=1, clip_times="on", generation=short)
    assert [r.text for r in forced.references("look at 00:03")] == ["00:03"]
    off = ChatSession(Engine(chat_model), video, frames=2, clips=3, clip_times="off", generation=short)
    assert off.references("look at 00:03 and Clip 1") == []


def test_app_links_each_moment_to_its_start(app_module):
    answer = "at 00:41 and in Clip 3"
    refs = find_references(answer, SPANS, duration=90.0)
    linked = app_module.link_moments(answer, refs)
    assert linked == "at [00:41](#t=41.000) and in [Clip 3](#t=62.000)"
    assert app_module.link_moments("no time here", []) == "no time here"
