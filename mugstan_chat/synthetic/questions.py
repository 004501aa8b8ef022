"""A small multiple-choice set on the plain synthetic videos, so the whole eval path runs in CI.

Each video of :func:`.plain.make_synthetic_videos` (forward/reverse pairs of a
moving shape) gets one TempCompass-style question whose answer depends only on frame order::

    In which direction does the red circle move?   A. left   B. right
    Does the green square grow or shrink?          A. growing   B. shrinking
    Does the blue triangle appear or disappear?    A. appearing   B. disappearing

Both videos of a pair hold the same frames in opposite orders, so a model that ignores order is
at chance (50%). The option order is shuffled by the seed. Written in the plain layout
(``questions.jsonl`` beside the videos; fields ``id``, ``video``, ``question``, ``options``,
``answer`` (a letter) and ``task`` (the motion))::

    python -m mugstan_chat.synthetic questions OUT_DIR --num 8 --seed 0
    mugstan-chat eval OUT_DIR/questions.jsonl --video-root OUT_DIR --demo --answer-format text --out runs/eval/syn
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from .plain import MOTIONS, make_synthetic_videos

# motion -> (question template, the two answers as the synthetic captions' verbs -> option words)
QUESTIONS = {
    "horizontal": ("In which direction does the {thing} move?", {"moving right": "right", "moving left": "left"}),
    "vertical": ("In which direction does the {thing} move?", {"moving down": "down", "moving up": "up"}),
    "scale": ("Does the {thing} grow or shrink?", {"growing": "growing", "shrinking": "shrinking"}),
    "fade": ("Does the {thing} appear or disappear?", {"appearing": "appearing", "disappearing": "disappearing"}),
}
QUESTIONS_FILE = "questions.jsonl"


def question_for_caption(caption: str) -> tuple[str, str, list[str], str]:
    """(motion, question, options, answer) for a synthetic caption such as 'a red circle moving left'."""
    for motion, (template, answers) in QUESTIONS.items():
        for verb, word in answers.items():
            if caption.endswith(" " + verb):
                thing = caption[len("a "): -len(verb) - 1]
                return motion, template.format(thing=thing), sorted(answers.values()), word
    raise ValueError(f"not a synthetic caption: {caption!r}")


def make_synthetic_mc(out_dir: str | os.PathLike, num: int = 8, seed: int = 0, size: int = 64,
                      frames: int = 24, progress: bool = False) -> Path:
    """Writes ``num`` synthetic videos and ``questions.jsonl`` (plain layout); returns the questions file.

    ``progress``: the videos' tqdm bar (see :func:`mugstan_chat.synthetic.plain.make_synthetic_videos`).
    """
    assert set(QUESTIONS) == set(MOTIONS), "a question for every synthetic motion"
    out = Path(out_dir)
    videos = make_synthetic_videos(out, num, seed, size=size, frames=frames, progress=progress)
    rng = np.random.default_rng(seed)
    lines = []
    for path, caption in videos:
        motion, question, options, answer = question_for_caption(caption)
        options = [options[i] for i in rng.permutation(len(options))]
        lines.append({"id": Path(path).stem, "video": Path(path).name, "question": question, "options": options,
                      "answer": "AB"[options.index(answer)], "task": motion})
    target = out / QUESTIONS_FILE
    target.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return target

