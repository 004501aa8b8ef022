"""Synthetic time-order videos for tests, demos, evaluation and the temporal probe.

Outside the model core: it imports :mod:`mugstan_chat.video` to write files, and nothing in
the model library imports it. Every clip comes with its exact time reversal and the
opposite caption, so only frame order tells the two apart. Its modules:

* :mod:`.render`: the one renderer (palette, shape masks, :class:`.render.Canvas`);
* :mod:`.pairs`: writing a clip and its reversal as mp4, and ``annotations.csv``;
* :mod:`.plain`: one shape on a flat background, four motions
  (:func:`.plain.make_synthetic_videos`): small, fast test and demo inputs;
* :mod:`.families`: eleven motion families on noisy textures
  (:func:`.families.make_time_reversal_dataset`): the temporal probe's data;
* :mod:`.questions`: a multiple-choice set on the plain videos (:func:`.questions.make_synthetic_mc`);
* :mod:`.cli`: ``python -m mugstan_chat.synthetic {videos,questions,reversal} OUT_DIR ...``.
"""

from .families import FAMILIES, make_time_reversal_dataset, render_pair
from .plain import MOTIONS, make_synthetic_videos
from .questions import make_synthetic_mc, question_for_caption

__all__ = ["FAMILIES", "MOTIONS", "make_synthetic_mc", "make_synthetic_videos", "make_time_reversal_dataset",
           "question_for_caption", "render_pair"]
