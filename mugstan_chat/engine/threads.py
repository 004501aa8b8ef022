"""Intra-op threads per request: how many cores one request's torch work may use.

On this project's torch (OpenMP backend), ``torch.set_num_threads(n)`` called in a thread sets
the OpenMP team size of *that thread's* parallel regions only: other threads keep theirs, and a
thread started later begins from the process default (``OMP_NUM_THREADS`` / the core count),
not from its parent's value, although ``torch.get_num_threads()`` reports the last value any
thread set (``mugstan-chat bench threads`` shows both). So a request's count is applied
in every thread that does its work: :func:`use_threads` in the request's own thread records it
(thread-locally) and :func:`inherit_threads` applies the recorded value in a thread that
thread starts (the language model's generate thread,
:meth:`mugstan_chat.engine.language_models.LocalLanguageModel.stream`).
"""

from __future__ import annotations

import os
import threading

_local = threading.local()


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_threads(concurrency: int, cores: int | None = None) -> int:
    """Threads per request so ``concurrency`` requests at once never ask for more threads than cores."""
    return max(1, (cores or usable_cores()) // max(1, concurrency))


def use_threads(count: int | None) -> None:
    """The calling thread's torch work runs on ``count`` intra-op threads (None: leave torch's setting)."""
    _local.count = count
    if count is not None:
        import torch

        torch.set_num_threads(count)


def current_threads() -> int | None:
    """The count :func:`use_threads` set in this thread (None: never set here)."""
    return getattr(_local, "count", None)


def inherit_threads(count: int | None) -> None:
    """In a thread started for a request: the same count as the thread that started it."""
    use_threads(count)
