"""The timeout guard: every read runs in an abandonable daemon thread that must keep making progress."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable


class Progress:
    """Heartbeat the worker calls after each unit of work (frame/chunk)."""

    def __init__(self) -> None:
        self.last = time.monotonic()

    def tick(self) -> None:
        self.last = time.monotonic()


class _ReadTimeout(Exception):
    """A backend made no progress for ``timeout_s``."""


def run_guarded(fn: Callable[[Progress], Any], timeout_s: float, what: str) -> Any:
    """Run ``fn(progress)`` in a daemon thread; abandon it after ``timeout_s`` without a tick.

    Why a thread: decord can spin forever inside C code (with the GIL
    released) on files whose header claims more frames than decode. A daemon
    thread can be abandoned while the caller keeps working; it is reaped at
    process exit. (It may keep one core busy until then.)
    """
    progress = Progress()
    box: dict[str, Any] = {}
    done = threading.Event()

    def target() -> None:
        try:
            box["value"] = fn(progress)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc
        finally:
            done.set()

    thread = threading.Thread(target=target, name=f"video-read:{what}", daemon=True)
    thread.start()
    poll = max(0.01, min(0.25, timeout_s / 4))
    while not done.wait(poll):
        if time.monotonic() - progress.last > timeout_s:
            raise _ReadTimeout(f"{what}: no progress for {timeout_s:g} s (read abandoned)")
    if "error" in box:
        raise box["error"]
    return box["value"]
