"""Defaults and allowed ranges of the user-facing settings: one source for the CLI and the web app.

The command line (``mugstan-chat``, ``app.py``) checks its flags against these
ranges in argparse, before any model loads, and the web page builds its sliders
from the same numbers, so a value accepted at startup is never refused by the
page. Importing this module imports neither torch nor transformers, so
``--help`` stays instant.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass

DEFAULT_MODEL = "llava-hf/llava-1.5-7b-hf"
#: Container extensions the project accepts for upload/CLI (both backends are FFmpeg based, so other
#: containers FFmpeg understands usually work too); here, not in the video package, so listing videos needs no torch.
SUPPORTED_EXTENSIONS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".gif", ".ts")
#: Mug's scoring modes (:class:`mugstan_chat.model.mug.MugConfig`); here so commands list them without torch.
MUG_MODES = ("frame-token", "frame-token-simple", "frame-text", "video-token", "mean")


@dataclass(frozen=True)
class Range:
    """A closed interval [low, high] of an integer or float setting.

    ``step`` is the web slider's step; ``parse`` is an argparse ``type=``.
    """

    name: str
    low: float
    high: float
    integer: bool = False
    step: float = 1.0

    def check(self, value: float) -> float:
        """``value`` if it lies in the range (finite), else ValueError naming the setting."""
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{self.name} must be a finite number, got {value}")
        if not self.low <= value <= self.high:
            raise ValueError(f"{self.name} must lie in [{self.low:g}, {self.high:g}], got {value:g}")
        return value

    def parse_or_auto(self, text: str):
        """argparse type: ``auto``, or a number in range (``--clips auto``)."""
        if text.strip().lower() == AUTO:
            return AUTO
        try:
            return self.parse(text)
        except argparse.ArgumentTypeError as error:
            raise argparse.ArgumentTypeError(f"{AUTO!r} or {error}".replace("or must be", "or")) from None

    def parse(self, text: str) -> float:
        """argparse type: a number in range, else an ArgumentTypeError (usage error, exit 2)."""
        try:
            value = int(text) if self.integer else float(text)
        except ValueError:
            kind = "an integer" if self.integer else "a number"
            raise argparse.ArgumentTypeError(f"must be {kind} in [{self.low:g}, {self.high:g}], got {text!r}") from None
        try:
            return self.check(value)
        except ValueError as error:
            raise argparse.ArgumentTypeError(str(error).replace(f"{self.name} must", "must", 1)) from None


# STAN's temporal position table has 64 rows (stan.py, StanConfig.max_frames).
FRAMES = Range("frames", 1, 64, integer=True)
# Each clip fills one <image> of the prompt (576 tokens at 336 px): 8 already exceed LLaVA-1.5's 4096.
CLIPS = Range("clips", 1, 8, integer=True)
# --clips auto: as many clips as the context leaves room for (at most clip_planning.AUTO_MAX_CLIPS and what the video holds)
AUTO = "auto"
# Clip selection (--select K of --candidates M): K is shown like --clips; M candidates are only ranked, never shown.
SELECT = Range("select", 1, 8, integer=True)
CANDIDATES = Range("candidates", 2, 256, integer=True)
# --shortlist S: a coarse pass (one frame per candidate) first, then only S candidates with all T frames; K <= S < M
SHORTLIST = Range("shortlist", 1, 255, integer=True)
DEFAULT_CANDIDATES = 32
# how --select picks its K from the ranked candidates (mugstan_chat.engine.selection.STRATEGIES): the top K, or
# relevance balanced with coverage of the video
SELECTIONS = ("topk", "coverage")
DEFAULT_SELECTION = "coverage"  # measured: docs/performance.md, "Which clips: topk or coverage"
CLIP_TIMES = ("auto", "on", "off")  # the clip time template (mugstan_chat.timeline): auto = on for C > 1 or --select
# LLaVA-1.5's whole context; the session clips it further to what the prompt leaves.
DEFAULT_MAX_NEW_TOKENS = 512  # an answer's length limit when none is asked for
MAX_NEW_TOKENS = Range("max_new_tokens", 1, 4096, integer=True)
TEMPERATURE = Range("temperature", 0.0, 2.0, step=0.05)  # 0 = greedy
TOP_P = Range("top_p", 0.01, 1.0, step=0.01)  # 0 would keep no token
REPETITION_PENALTY = Range("repetition_penalty", 0.1, 10.0, step=0.05)  # 1 = off
