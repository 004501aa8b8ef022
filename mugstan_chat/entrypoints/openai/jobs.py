"""Admission control and the job one admitted request runs as (no model code here).

* :class:`Gate` admits at most ``concurrency`` jobs at once and lets at most
  ``queue_size`` more wait; beyond that, 429.
* :class:`Job` is one request running in a worker thread; it reports to the event loop
  through a queue, and cancelling it (the client went away) stops generation after the
  current token.
"""

from __future__ import annotations

import asyncio
import threading

from .protocol import APIError


class Gate:
    """Admission control on the event loop: ``concurrency`` running jobs, ``queue_size`` waiting ones.

    :meth:`acquire` raises 429 when all slots are busy and the queue is full.
    :meth:`release` must run on the loop (a worker thread uses ``loop.call_soon_threadsafe``).
    """

    def __init__(self, concurrency: int, queue_size: int):
        if concurrency < 1 or queue_size < 0:
            raise ValueError(f"concurrency must be >= 1 and queue_size >= 0 (got {concurrency}, {queue_size})")
        self.concurrency = concurrency
        self.queue_size = queue_size
        self.running = 0
        self.waiting = 0
        self._semaphore: asyncio.Semaphore | None = None

    async def acquire(self) -> None:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.concurrency)
        if self.running + self.waiting >= self.concurrency + self.queue_size:
            raise APIError(429, f"the server is busy: {self.running} requests running and {self.waiting} waiting "
                           f"(--concurrency {self.concurrency}, --queue-size {self.queue_size}); retry later",
                           type="rate_limit_error", code="rate_limit_exceeded")
        self.waiting += 1
        try:
            await self._semaphore.acquire()
        finally:
            self.waiting -= 1
        self.running += 1

    def release(self) -> None:
        self.running -= 1
        self._semaphore.release()


class Job:
    """One admitted request running in a worker thread; events go to the loop through a queue.

    Events: ("ready", info), ("text", str), ("done", Outcome), ("error", APIError).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.stop = threading.Event()  # ends generation after the current token
        self.cancelled = False  # the client went away
        self.finished = threading.Event()  # the worker thread has ended (its slot is free)
        self.thread: threading.Thread | None = None

    def emit(self, kind: str, value=None) -> None:
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: the server is shutting down, nobody is listening
            self.stop.set()

    async def next(self):
        return await self.events.get()

    def cancel(self) -> None:
        self.cancelled = True
        self.stop.set()
