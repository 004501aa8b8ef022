"""The moments an answer names: ``01:23``, ``1:23-1:40``, ``Clip 3`` read back as times in the video.

Why: with clip times on, the prompt labels every clip (``Clip 2 (00:30-00:58): <image>``,
:mod:`mugstan_chat.timeline`), so the language model can answer "at 00:41 she opens the
fridge" or "in Clip 2". A front end turns each such mention into a link that seeks the player
(the web app) or a structured reference (the API's ``mugstan.references``, ``ask --json``),
so a user can check the answer against the video. Only what the answer itself says is read:
a time that lies outside the video is not a moment of it and is dropped, and a clip number the
prompt never showed is not a reference.

A reference is ``{start, end, clip, text, offset}``: seconds in the whole video (a single time
has ``start == end``), the clip shown to the model that holds it (1-based; None when the time
falls between the clips shown), the text matched and its character offset in the answer.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from ..timeline import ClipSpan

# H:MM:SS or MM:SS (one or two digits of minutes), with optional tenths: the forms timeline.format_time writes
_TIME = r"(?:\d{1,2}:)?\d{1,2}:[0-5]\d(?:\.\d+)?"
_RANGE_SEPARATOR = r"\s*(?:-|–|—|to|until)\s*"
PATTERN = re.compile(
    rf"(?P<range>(?<![\d:.])(?P<first>{_TIME}){_RANGE_SEPARATOR}(?P<second>{_TIME})(?![\d:]))"
    rf"|(?P<time>(?<![\d:.]){_TIME}(?![\d:]))"
    r"|(?P<clip>\b[Cc]lip\s+#?(?P<number>\d{1,3})\b)")


@dataclass(frozen=True)
class Reference:
    """One moment an answer names."""

    start: float  # seconds in the whole video
    end: float  # seconds; == start for a single time
    clip: int | None  # the shown clip holding it (1-based), None between clips
    text: str  # as written in the answer
    offset: int  # character offset of ``text`` in the answer

    def to_dict(self) -> dict:
        return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def parse_time(text: str) -> float:
    """Seconds of ``MM:SS``, ``H:MM:SS`` or either with a fraction (``00:41.5``)."""
    parts = text.split(":")
    seconds = float(parts[-1])
    minutes = int(parts[-2])
    hours = int(parts[-3]) if len(parts) == 3 else 0
    return hours * 3600 + minutes * 60 + seconds


def clip_holding(seconds: float, spans: list[ClipSpan], slack: float = 0.0) -> int | None:
    """The number of the span that holds ``seconds`` (within ``slack``), else None."""
    for span in spans:
        if span.start - slack <= seconds <= span.end + slack:
            return span.number
    return None


def find_references(answer: str, spans: list[ClipSpan], duration: float) -> list[Reference]:
    """Every moment ``answer`` names, in the order it names them.

    Args:
        answer: the model's text.
        spans: the clips shown to the model (their numbers and times).
        duration: the video's length in seconds: a time past it is not a moment of this video.

    The labels floor times to whole seconds (or tenths), so a time is matched to a clip with a
    slack of one second (the labels' resolution).
    """
    found = []
    for match in PATTERN.finditer(answer):
        if match.group("clip"):
            number = int(match.group("number"))
            span = next((s for s in spans if s.number == number), None)
            if span is not None:
                found.append(Reference(span.start, span.end, number, match.group(0), match.start()))
            continue
        if match.group("range"):
            start, end = parse_time(match.group("first")), parse_time(match.group("second"))
            if end < start:
                continue  # "10:00-09:00" is no span
        else:
            start = end = parse_time(match.group("time"))
        if end > duration + 1.0:  # past the video (with the labels' one-second flooring)
            continue
        found.append(Reference(start, end, clip_holding(start, spans, slack=1.0), match.group(0), match.start()))
    return found
