"""The batch loop: videos read and decoded ahead in a thread pool while the model answers, one row each.

Why a pool ahead of the model: decoding is I/O and FFmpeg (it releases the GIL), the tower and the
language model are the model's; reading the next videos while one is answered keeps both busy.
Each video is its own conversation (the same session ``ask`` builds from the same flags, so a greedy
answer equals ``ask``'s). With ``in_flight`` > 1 several videos are answered at once: for the
vLLM route (``--llm-url``), whose server batches the requests it has in flight; on the local engine
they share its cores. A video that cannot be read becomes a row with an ``error`` (reason and
message) and the run goes on.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from ..engine.turns import ConversationTooLong
from ..video import VideoDecodeError, load_video_clips
from .inputs import BatchItem, InputError

logger = logging.getLogger(__name__)


@dataclass
class BatchSummary:
    """What a run did: rows written now, answered, failed by reason, and the rate."""

    total: int  # items this shard takes
    skipped: int  # already in the output (a resumed run)
    answered: int = 0
    failed: Counter = field(default_factory=Counter)
    seconds: float = 0.0

    @property
    def videos_per_second(self) -> float:
        done = self.answered + sum(self.failed.values())
        return done / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        failed = ", ".join(f"{reason} {count}" for reason, count in sorted(self.failed.items())) or "none"
        return (f"{self.answered} answered, {sum(self.failed.values())} failed ({failed}), {self.skipped} already "
                f"done, of {self.total}; {self.videos_per_second:.2f} videos/s")

    def to_dict(self) -> dict:
        return {"total": self.total, "skipped": self.skipped, "answered": self.answered,
                "failed": dict(self.failed), "seconds": round(self.seconds, 3),
                "videos_per_second": round(self.videos_per_second, 4)}


def failure_reason(error: BaseException) -> str:
    """The ``error.reason`` of a row: what kind of problem the video had."""
    if isinstance(error, VideoDecodeError):
        return "decode_error"
    if isinstance(error, (InputError, OSError)):
        return "unreadable"
    if isinstance(error, ConversationTooLong):
        return "too_long"
    return "internal"


@contextlib.contextmanager
def local_file(item: BatchItem):
    """A path the session can read: the item's own file, or a shard member written to a temporary file."""
    if item.shard is None:
        yield item.video
        return
    source = item.source()
    suffix = os.path.splitext(item.member)[1]
    fd, path = tempfile.mkstemp(suffix=suffix, prefix="mugstan-batch-")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(source.data)
        yield path
    finally:
        os.unlink(path)


class BatchRunner:
    """Answers ``items`` one row each into ``results``.

    Args:
        open_session: ``(video path) -> ChatSession`` with the run's settings (``ModelArgs.open_session``).
        prompt: the question for items without their own.
        results: an opened :class:`.results.ResultsFile`.
        workers: decoding threads (videos read ahead of the model).
        in_flight: videos answered at once.
        progress: a tqdm-like bar (``update``), or None.
    """

    def __init__(self, open_session, prompt: str | None, results, workers: int = 2, in_flight: int = 1,
                 progress=None):
        self.open_session = open_session
        self.prompt = prompt
        self.results = results
        self.workers = workers
        self.in_flight = in_flight
        self.progress = progress
        self._lock = threading.Lock()

    def run(self, items: list[BatchItem], done: set[str]) -> BatchSummary:
        todo = [item for item in items if item.id not in done]
        summary = BatchSummary(total=len(items), skipped=len(items) - len(todo))
        started = time.perf_counter()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="batch-decode") as decoders, \
                ThreadPoolExecutor(self.in_flight, thread_name_prefix="batch-answer") as answerers:
            ahead = self.workers + self.in_flight  # videos read before the model needs them: a bounded queue
            pending = iter(todo)
            decoding = {}
            answering = set()

            def feed():
                while len(decoding) + len(answering) < ahead:
                    item = next(pending, None)
                    if item is None:
                        return
                    decoding[decoders.submit(self._prepare, item)] = item

            feed()
            while decoding or answering:
                finished, _ = wait(list(decoding) + list(answering), return_when=FIRST_COMPLETED)
                for future in finished:
                    if future in decoding:
                        item = decoding.pop(future)
                        prepared = future.result()
                        answering.add(answerers.submit(self._answer, item, prepared, summary))
                    else:
                        answering.discard(future)
                        future.result()  # _answer writes its own row; a failure here is a bug
                feed()
        summary.seconds = time.perf_counter() - started
        return summary

    def _prepare(self, item: BatchItem):
        """(session, its decoded clips or None, the temporary-file context, an error or None, decode ms): read ahead."""
        stack = contextlib.ExitStack()
        try:
            path = stack.enter_context(local_file(item))
            session = self.open_session(path)
            decoded, began = None, time.perf_counter()
            if session.select is None and not session.auto_clips:  # uniform clips: decode here, off the model
                session.check_fits(self._question(item))
                start, end = session.window
                decoded = load_video_clips(path, frames_per_clip=session.frames, num_clips=session.clips,
                                           mode="eval", start=start, end=end, limits=session.limits,
                                           image_processor=session.chat_model.processor.image_processor)
            return session, decoded, stack, None, (time.perf_counter() - began) * 1000
        except Exception as error:  # noqa: BLE001 - the row says what went wrong; the run goes on
            stack.close()
            return None, None, None, error, 0.0

    def _question(self, item: BatchItem) -> str:
        return item.question or self.prompt or ""

    def _answer(self, item: BatchItem, prepared, summary: BatchSummary) -> None:
        session, decoded, stack, error, decode_ms = prepared
        question = self._question(item)
        row = {"id": item.id, "video": os.path.abspath(item.video) if item.shard is None else item.video,
               "question": question}
        if item.shard is not None:
            row["shard"] = item.shard
        try:
            if error is not None:
                raise error
            with stack:
                if decoded is not None:
                    session.prepare(decoded)
                answer = session.ask(question).strip()
                stats = session.last_stats
                row.update(answer=answer, caption=answer, clip_spans=[s.to_dict() for s in session.clip_spans],
                           references=[r.to_dict() for r in session.references(answer)],
                           selection=None if session.selection is None else session.selection.to_dict(),
                           prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens,
                           timings_ms={"decode": round(decode_ms if decoded is not None else stats.decode_ms, 2),
                                       "encode": round(stats.encode_ms, 2),
                                       "first_token": None if stats.first_token_ms is None
                                       else round(stats.first_token_ms, 2),
                                       "total": round(stats.total_ms, 2)},
                           error=None)
        except Exception as failure:  # noqa: BLE001 - one row per video, whatever happened to it
            reason = failure_reason(failure)
            if reason == "internal":
                logger.exception("batch: %s", item.id)
            row.update(answer=None, error={"reason": reason,
                                           "message": " ".join(str(failure).split())[:500] or type(failure).__name__})
        with self._lock:
            self.results.append(row)
            if row["error"] is None:
                summary.answered += 1
            else:
                summary.failed[row["error"]["reason"]] += 1
            if self.progress is not None:
                self.progress.update(1)
