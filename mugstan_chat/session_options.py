"""How a conversation reads its video: one frozen record, its defaults and its rules, for every front end.

The command line (:class:`~mugstan_chat.entrypoints.ModelArgs`), the server (a request's
``media_io_kwargs`` and ``mugstan`` fields), the web app (its Advanced panel), ``eval`` and ``batch``
each build a :class:`SessionOptions` and call :meth:`SessionOptions.validate` with their own names
for the fields (``--select`` on the command line, ``mugstan.select`` in the API), so the rules (the
ranges of :mod:`mugstan_chat.options`, "``select`` shows K clips: no ``clips`` with it", K <= M,
K <= S < M, what needs ``select``) and every default are written once, here. No torch: front ends
check their arguments with it before anything loads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from .options import (AUTO, CANDIDATES, CLIP_TIMES, CLIPS, DEFAULT_CANDIDATES, DEFAULT_SELECTION, FRAMES, SELECT,
                      SELECTIONS, SHORTLIST, Range)


class OptionError(ValueError):
    """A session option out of its rules; ``field`` names it (front ends map it to their flag or parameter)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def flag_name(field: str) -> str:
    """The command line's name of a field: ``--clip-times``."""
    return "--" + field.replace("_", "-")


@dataclass(frozen=True)
class SessionOptions:
    """Which frames of a video a conversation shows the language model, and how it picks them."""

    frames: int = 8  # T: frames per clip
    clips: int | str | None = 1  # C: uniform clips, one <image> each; "auto": as many as fit; None with select
    clip_times: str = "auto"  # each clip's time span before its <image>: auto (several clips or select), on, off
    select: int | None = None  # K: show the K candidates that best match the question (docs/design.md 4c)
    candidates: int | None = None  # M candidates ranked with select (None: options.DEFAULT_CANDIDATES)
    selection: str | None = None  # how select picks its K: topk or coverage (None: options.DEFAULT_SELECTION)
    shortlist: int | None = None  # S: a one-frame pass over the M first, S embedded in full (K <= S < M)

    def validate(self, name: Callable[[str], str] = flag_name) -> SessionOptions:
        """``self`` if every rule holds; else :class:`OptionError` whose message names fields with ``name``."""
        self._check("frames", FRAMES, self.frames, name)
        if self.clips not in (AUTO, None):  # None: with select, the K shown are the clips
            self._check("clips", CLIPS, self.clips, name)
        if self.clip_times not in CLIP_TIMES:
            raise OptionError("clip_times", f"{name('clip_times')} must be one of {', '.join(CLIP_TIMES)}, "
                                            f"got {self.clip_times!r}")
        for field, allowed in (("select", SELECT), ("candidates", CANDIDATES), ("shortlist", SHORTLIST)):
            if getattr(self, field) is not None:
                self._check(field, allowed, getattr(self, field), name)
        if self.selection is not None and self.selection not in SELECTIONS:
            raise OptionError("selection", f"{name('selection')} must be one of {', '.join(SELECTIONS)}, "
                                           f"got {self.selection!r}")
        if self.select is None:
            for field in ("candidates", "selection", "shortlist"):
                if getattr(self, field) is not None:
                    value = {"candidates": " M", "shortlist": " S"}.get(field, "")
                    raise OptionError(field, f"{name(field)}{value} needs {name('select')} K (the number of "
                                             "candidates to show)")
            return self
        if self.clips not in (1, None):
            raise OptionError("clips", f"{name('select')} K shows K clips: leave {name('clips')} out")
        if self.select > self.candidate_count:
            raise OptionError("candidates", f"{name('select')} {self.select} needs at least as many "
                                            f"{name('candidates')} (got {self.candidate_count})")
        if self.shortlist is not None and not self.select <= self.shortlist < self.candidate_count:
            raise OptionError("shortlist", f"{name('shortlist')} {self.shortlist} must lie between {name('select')} "
                                           f"{self.select} and {name('candidates')} {self.candidate_count} "
                                           "(K <= S < M)")
        return self

    @staticmethod
    def _check(field: str, allowed: Range, value, name) -> None:
        try:
            allowed.check(value)
        except (TypeError, ValueError) as error:
            raise OptionError(field, f"{name(field)}: {error}") from None

    @property
    def candidate_count(self) -> int | None:
        """M with select (the default when candidates is left out); None without selection."""
        if self.select is None:
            return None
        return self.candidates if self.candidates is not None else DEFAULT_CANDIDATES

    @property
    def strategy(self) -> str | None:
        """How the K are picked (the default when selection is left out); None without selection."""
        if self.select is None:
            return None
        return self.selection or DEFAULT_SELECTION

    def replace(self, **changes) -> SessionOptions:
        """A copy with ``changes`` (validate it again)."""
        return dataclasses.replace(self, **changes)

    def session_kwargs(self) -> dict:
        """The clip settings a :class:`mugstan_chat.engine.conversation.ChatSession` takes."""
        return {"frames": self.frames, "clips": self.clips if self.select is None else None,
                "clip_times": self.clip_times, "select": self.select, "candidates": self.candidate_count,
                "selection_strategy": self.selection, "shortlist": self.shortlist}

    def record(self) -> dict:
        """The fields as given (for run settings a resume compares)."""
        return dataclasses.asdict(self)


DEFAULTS = SessionOptions()  # the defaults every front end's flags and fields read
