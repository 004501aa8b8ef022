"""The batch loop: videos read and decoded ahead in a thread pool while the model answers, one row each.

Why a pool ahead of the model: decoding is I/O and FFmpeg (it releases the GIL), the tower and the
language model are the model's; reading the next videos while one is answered keeps both busy.
Each video is its own conversation on the engine (opened from the same options and generation
settings ``ask`` uses, so a greedy answer equals ``ask``'s). With ``in_flight`` > 1 several videos are answered at once: for the
vLLM route (``--llm-url``), whose server batches the requests it has in flight; on the local engine
they share its cores. A video that cannot be read becomes a row with an ``error`` (reason and
message) and the run goes on.

With ``batch_size`` N > 1 on uniform clips, up to N decoded videos are answered together: their clips
go through the tower in one call (:meth:`~mugstan_chat.engine.engine.Engine.encode_many`) and their
first answers come from one padded ``generate`` (:meth:`~mugstan_chat.engine.engine.Engine.ask_many`;
on the vLLM route one request each). Padding changes fp32 rounding, so a greedy batch answer can differ
from ``ask``'s where two tokens nearly tie; N = 1 (the default) answers each video alone.
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
        engine: the :class:`~mugstan_chat.engine.engine.Engine` answering.
        options: the run's :class:`~mugstan_chat.session_options.SessionOptions`.
        generation: the run's :class:`~mugstan_chat.engine.turns.GenerationSettings`.
        prompt: the question for items without their own.
        results: an opened :class:`.results.ResultsFile`.
        workers: decoding threads (videos read ahead of the model).
        in_flight: videos (or batches) answered at once.
        batch_size: videos answered together in one tower call and one ``generate`` (uniform clips only).
        progress: a tqdm-like bar (``update``), or None.
    """

    def __init__(self, engine, options, generation, prompt: str | None, results, workers: int = 2,
                 in_flight: int = 1, progress=None, batch_size: int = 1):
        self.engine = engine
        self.options = options.validate()
        self.generation = generation
        self.prompt = prompt
        self.results = results
        self.workers = workers
        self.in_flight = in_flight
        self.progress = progress
        self.batch_size = batch_size
        self._lock = threading.Lock()

    def run(self, items: list[BatchItem], done: set[str]) -> BatchSummary:
        todo = [item for item in items if item.id not in done]
        summary = BatchSummary(total=len(items), skipped=len(items) - len(todo))
        started = time.perf_counter()
        with ThreadPoolExecutor(self.workers, thread_name_prefix="batch-decode") as decoders, \
                ThreadPoolExecutor(self.in_flight, thread_name_prefix="batch-answer") as answerers:
            # videos read before the model needs them: a bounded queue
            ahead = self.workers + self.in_flight * self.batch_size
            pending = iter(todo)
            decoding = {}
            answering = set()
            ready = []  # decoded uniform clips waiting to fill a batch
            exhausted = [False]

            def feed():
                while len(decoding) + len(ready) + len(answering) * self.batch_size < ahead:
                    item = next(pending, None)
                    if item is None:
                        exhausted[0] = True
                        return
                    decoding[decoders.submit(self._prepare, item)] = item

            def flush(everything: bool):
                while ready and (len(ready) >= self.batch_size or everything):
                    batch = ready[:self.batch_size]
                    del ready[:self.batch_size]
                    answering.add(answerers.submit(self._answer_batch, batch, summary))

            feed()
            while decoding or answering or ready:
                if decoding or answering:
                    finished, _ = wait(list(decoding) + list(answering), return_when=FIRST_COMPLETED)
                else:
                    finished = []
                for future in finished:
                    if future in decoding:
                        item = decoding.pop(future)
                        prepared = future.result()
                        if self.batch_size > 1 and prepared[2] is None and prepared[0][1] is not None:
                            ready.append((item, prepared))
                        else:  # one alone: selection, auto clips, or a video that could not be read
                            answering.add(answerers.submit(self._answer, item, prepared, summary))
                    else:
                        answering.discard(future)
                        future.result()  # _answer writes its own row; a failure here is a bug
                feed()
                # a short batch only when nothing more can join it: the input is read and no decode is pending
                flush(exhausted[0] and not decoding)
        summary.seconds = time.perf_counter() - started
        return summary

    def _prepare(self, item: BatchItem):
        """(its decoded clips or None, the temporary-file context, an error or None, decode ms): read ahead."""
        stack = contextlib.ExitStack()
        try:
            path = stack.enter_context(local_file(item))
            decoded, began = None, time.perf_counter()
            options = self.options
            if options.select is None and options.clips != "auto":  # uniform clips: decode here, off the model
                decoded = load_video_clips(path, frames_per_clip=options.frames, num_clips=options.clips, mode="eval",
                                           image_processor=self.engine.model.processor.image_processor)
            return (path, decoded), stack, None, (time.perf_counter() - began) * 1000
        except Exception as error:  # noqa: BLE001 - the row says what went wrong; the run goes on
            stack.close()
            return None, None, error, 0.0

    def _question(self, item: BatchItem) -> str:
        return item.question or self.prompt or ""

    def _row(self, item: BatchItem) -> dict:
        row = {"id": item.id, "video": os.path.abspath(item.video) if item.shard is None else item.video,
               "question": self._question(item)}
        if item.shard is not None:
            row["shard"] = item.shard
        return row

    @staticmethod
    def _answered(row: dict, conversation, answer: str, decode_ms: float | None) -> None:
        """Fills ``row`` from ``conversation``'s answered first turn (``decode_ms``: read ahead, or None)."""
        answer = answer.strip()
        stats = conversation.last_stats
        row.update(answer=answer, caption=answer, clip_spans=[s.to_dict() for s in conversation.clip_spans],
                   references=[r.to_dict() for r in conversation.references(answer)],
                   selection=None if conversation.selection is None else conversation.selection.to_dict(),
                   prompt_tokens=stats.prompt_tokens, new_tokens=stats.new_tokens,
                   timings_ms={"decode": round(decode_ms if decode_ms is not None else stats.decode_ms, 2),
                               "encode": round(stats.encode_ms, 2),
                               "first_token": None if stats.first_token_ms is None
                               else round(stats.first_token_ms, 2),
                               "total": round(stats.total_ms, 2)},
                   error=None)

    @staticmethod
    def _failed(row: dict, item: BatchItem, failure: BaseException) -> None:
        reason = failure_reason(failure)
        if reason == "internal":
            logger.exception("batch: %s", item.id, exc_info=failure)
        row.update(answer=None, error={"reason": reason,
                                       "message": " ".join(str(failure).split())[:500] or type(failure).__name__})

    def _answer(self, item: BatchItem, prepared, summary: BatchSummary) -> None:
        read, stack, error, decode_ms = prepared
        question = self._question(item)
        row = self._row(item)
        try:
            if error is not None:
                raise error
            with stack:
                path, decoded = read
                # selection or auto clips read the file inside the turn (its timings include it), as ask does
                conversation = self.engine.open(path, self.options, question=question, generation=self.generation,
                                                decoded=decoded, lazy=decoded is None)
                answer = conversation.ask(question)
                self._answered(row, conversation, answer, decode_ms if decoded is not None else None)
        except Exception as failure:  # noqa: BLE001 - one row per video, whatever happened to it
            self._failed(row, item, failure)
        self._write(row, summary)

    def _answer_batch(self, batch: list, summary: BatchSummary) -> None:
        """Answers decoded videos together: one tower call for all their clips, one padded ``generate``."""
        if len(batch) == 1:
            self._answer(*batch[0], summary)
            return
        rows = [self._row(item) for item, _ in batch]
        with contextlib.ExitStack() as stacks:
            for _, (_, stack, _, _) in batch:
                stacks.enter_context(stack)
            try:
                encoded = self.engine.encode_many([prepared[0][1] for _, prepared in batch], self.options)
            except Exception as failure:  # noqa: BLE001 - each video again alone: its row says what failed
                logger.warning("batch: encoding %d videos together failed (%s); one at a time", len(batch), failure)
                for item, (read, _, _, decode_ms) in batch:
                    self._answer(item, (read, contextlib.ExitStack(), None, decode_ms), summary)
                return
            opened, questions, places = [], [], []
            for place, ((item, (read, _, _, _)), features) in enumerate(zip(batch, encoded)):
                path, decoded = read
                try:
                    opened.append(self.engine.open(path, self.options, question=self._question(item),
                                                   generation=self.generation, decoded=decoded, encoded=features))
                    questions.append(self._question(item))
                    places.append(place)
                except Exception as failure:  # noqa: BLE001 - one row per video
                    self._failed(rows[place], item, failure)
            try:
                answers = self.engine.ask_many(opened, questions) if opened else []
            except Exception as failure:  # noqa: BLE001 - the whole generate failed: every row says so
                answers = [failure] * len(opened)
            for place, conversation, answer in zip(places, opened, answers):
                item, (_, _, _, decode_ms) = batch[place]
                try:
                    if isinstance(answer, Exception):
                        raise answer
                    self._answered(rows[place], conversation, answer, decode_ms)
                except Exception as failure:  # noqa: BLE001 - one row per video
                    self._failed(rows[place], item, failure)
        for row in rows:
            self._write(row, summary)

    def _write(self, row: dict, summary: BatchSummary) -> None:
        with self._lock:
            self.results.append(row)
            if row["error"] is None:
                summary.answered += 1
            else:
                summary.failed[row["error"]["reason"]] += 1
            if self.progress is not None:
                self.progress.update(1)
