"""The multiple-choice set on the plain synthetic videos: one order-dependent question per video."""

from __future__ import annotations

import csv
import json

import pytest

from mugstan_chat.synthetic.plain import MOTIONS
from mugstan_chat.synthetic.questions import QUESTIONS, make_synthetic_mc, question_for_caption


@pytest.mark.parametrize("caption, expected", [
    ("a red circle moving left", ("horizontal", "In which direction does the red circle move?",
                                  ["left", "right"], "left")),
    ("a blue square moving down", ("vertical", "In which direction does the blue square move?", ["down", "up"],
                                   "down")),
    ("a green triangle shrinking", ("scale", "Does the green triangle grow or shrink?", ["growing", "shrinking"],
                                    "shrinking")),
    ("a yellow circle appearing", ("fade", "Does the yellow circle appear or disappear?",
                                   ["appearing", "disappearing"], "appearing")),
])
def test_question_for_caption(caption, expected):
    assert question_for_caption(caption) == expected


def test_every_motion_has_a_question_and_other_captions_are_refused():
    assert set(QUESTIONS) == set(MOTIONS)
    with pytest.raises(ValueError, match="not a synthetic caption"):
        question_for_caption("a red bar rotating clockwise")


def test_questions_follow_the_videos_and_both_answers_occur(tmp_path):
    target = make_synthetic_mc(tmp_path, num=8, seed=0, size=32, frames=8)
    assert target == tmp_path / "questions.jsonl"
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    rows = list(csv.DictReader(open(tmp_path / "annotations.csv")))
    assert [line["video"] for line in lines] == [row["video"] for row in rows]
    for line, row in zip(lines, rows):
        assert set(line) == {"id", "video", "question", "options", "answer", "task"}
        assert (tmp_path / line["video"]).is_file() and line["id"] == line["video"][:-4]
        motion, question, options, answer = question_for_caption(row["caption"])
        assert (line["task"], line["question"]) == (motion, question) and sorted(line["options"]) == options
        assert line["options"]["AB".index(line["answer"])] == answer
    assert {line["answer"] for line in lines} == {"A", "B"}  # the seed shuffles the options
    again = make_synthetic_mc(tmp_path / "again", num=8, seed=0, size=32, frames=8)
    assert again.read_bytes() == target.read_bytes()
