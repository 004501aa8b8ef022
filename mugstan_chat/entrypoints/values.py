"""argparse types for the numbers every front end takes: one rule and one message per kind of value.

Every front end parses ``--port``, ``--concurrency``, ``--feature-cache-mb`` ... with these, so a
bad value (nan, inf, negative, out of range, not a number) gets the same usage error (exit 2)
from ``mugstan-chat ask|chat|eval|serve`` and ``app.py``, before any model loads. Ranges of
the chat settings themselves (frames, clips, temperature ...) live in :mod:`mugstan_chat.options`.
"""

from __future__ import annotations

import argparse
import math


def _number(text: str, integer: bool) -> float:
    try:
        return int(text) if integer else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {'an integer' if integer else 'a number'}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(text, integer=True)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(text, integer=True)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer, 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (refuses nan and inf)."""
    value = _number(text, integer=False)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number above 0, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (refuses nan and inf)."""
    value = _number(text, integer=False)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def port(text: str) -> int:
    """A TCP port, 1..65535."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a TCP port 1..65535, got {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 1..65535, got {value}")
    return value


def megabytes_to_bytes(megabytes: float) -> int:
    """MiB (as the flags take them) to whole bytes."""
    return int(megabytes * 2**20)


def llm_url(text: str) -> str:
    """An http(s) URL of an OpenAI-compatible server, as its API base ending in /v1."""
    from ..engine.remote_llm import normalise_llm_url

    try:
        return normalise_llm_url(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error).replace("--llm-url must be", "must be", 1)) from None


def non_empty(text: str) -> str:
    """A string with something in it besides whitespace (a name or a key)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text
