"""The work that answers a planned request, in a worker thread; no HTTP here.

:meth:`ChatService.start` runs one :class:`~mugstan_chat.entrypoints.openai.planning.Plan` as a :class:`~mugstan_chat.entrypoints.openai.jobs.Job`: fetch
the media, open a conversation on the engine (:meth:`mugstan_chat.engine.engine.Engine.open`: its
features come from the engine's cache, or are decoded and encoded once, however many requests ask
at the same moment), then stream the answer, applying OpenAI's stop sequences
(:class:`TextAssembler`). Seeded sampling draws from the request's own generator
(:class:`~mugstan_chat.engine.turns.GenerationSettings`), so concurrent requests never share
random state. The worker frees its slot only when generation has really ended. Each job's torch
work runs on ``threads_per_request`` intra-op threads, set in the job's thread and passed on to the
thread that generates (:mod:`mugstan_chat.engine.threads`: the setting is per thread on this torch).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass

from ...engine.engine import Conversation, Engine
from ...engine.remote_llm import RemoteLLMError
from ...engine.threads import use_threads
from ...engine.turns import ConversationTooLong
from ...video import VideoDecodeError
from .jobs import Job
from .media import MediaFetcher, describe_url, open_image
from .planning import Plan, ServiceConfig, plan_request
from .protocol import APIError, ChatCompletionRequest, bad_request

logger = logging.getLogger(__name__)


@dataclass
class Outcome:
    """A finished answer."""

    text: str
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    completion_tokens: int
    info: dict  # protocol.MugstanInfo fields


class TextAssembler:
    """Turns streamed pieces into the text a client sees, applying OpenAI's ``stop`` rule.

    The answer ends before the first stop sequence (which is not included). Text that
    might be the start of a stop sequence, and trailing whitespace, is held back until
    it is known, so the streamed pieces join to exactly the non-streamed answer
    (stripped, as :meth:`mugstan_chat.engine.engine.Conversation.ask` returns it).
    """

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""  # received, not yet emitted
        self.started = False  # emitted some non-whitespace
        self.stopped = False  # a stop sequence was found

    def feed(self, piece: str) -> str:
        """Adds a piece; returns the text that can be emitted now."""
        if self.stopped:
            return ""
        self.pending += piece
        if not self.started:
            self.pending = self.pending.lstrip()
        cut = min((i for i in (self.pending.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.pending = self.pending[:cut].rstrip(), ""
            return self._emit(out)
        hold = max((self._partial(s) for s in self.stops), default=0)
        body = self.pending[: len(self.pending) - hold]
        keep = len(body) - len(body.rstrip())  # trailing whitespace waits for what follows it
        out = body[: len(body) - keep]
        self.pending = self.pending[len(out):]
        return self._emit(out)

    def finish(self) -> str:
        """The end of the answer: whatever is held back, minus trailing whitespace."""
        out, self.pending = ("" if self.stopped else self.pending.rstrip()), ""
        return self._emit(out)

    def _partial(self, stop: str) -> int:
        """Length of the longest end of ``pending`` that begins ``stop``."""
        for n in range(min(len(stop) - 1, len(self.pending)), 0, -1):
            if stop.startswith(self.pending[-n:]):
                return n
        return 0

    def _emit(self, text: str) -> str:
        if text:
            self.started = True
        return text


class ChatService:
    """Answers chat completion requests with one loaded model.

    Args:
        engine: the :class:`~mugstan_chat.engine.engine.Engine` (its feature cache is every request's).
        config: :class:`ServiceConfig`.
        fetcher: :class:`media.MediaFetcher` (its policy decides which URLs are allowed).
        threads_per_request: torch intra-op threads of each job (None: torch's default in every thread).
    """

    def __init__(self, engine: Engine, config: ServiceConfig, fetcher: MediaFetcher,
                 threads_per_request: int | None = None):
        self.engine = engine
        self.threads_per_request = threads_per_request
        self.config = config
        self.fetcher = fetcher
        self._lock = threading.Lock()
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "video_encodes": 0,
                         "image_encodes": 0, "completion_tokens": 0}

    def plan(self, request: ChatCompletionRequest) -> Plan:
        """Checks a request and reads its conversation; raises APIError (400/404) before any work."""
        return plan_request(request, self.config, self.engine.model.tower)

    def count(self, name: str, value: int = 1) -> None:
        with self._lock:
            self.counters[name] += value

    def start(self, plan: Plan, loop: asyncio.AbstractEventLoop, on_finish) -> Job:
        """Runs ``plan`` in a new thread; ``on_finish`` is called on the loop once it has ended.

        The slot is freed before the last event ("done" or "error") is delivered (the loop runs
        callbacks in order), so a client that sends its next request as soon as it has the
        answer never finds its own previous request still holding the slot.
        """
        job = Job(loop)
        self.count("requests")

        def work():
            final = ("error", APIError(500, "internal error: the request ended without an answer", "server_error"))
            try:
                use_threads(self.threads_per_request)
                final = self._run(plan, job)
            finally:
                job.finished.set()
                try:
                    loop.call_soon_threadsafe(on_finish)
                except RuntimeError:  # the loop is closed (shutdown): there is no slot left to free
                    pass
                job.emit(*final)

        job.thread = threading.Thread(target=work, name="mugstan-serve-job", daemon=True)
        job.thread.start()
        return job

    def _run(self, plan: Plan, job: Job) -> tuple[str, object]:
        """Does the work of ``plan``, streaming "text" events; returns the final ("done" | "error", value)."""
        started = time.perf_counter()
        media = None
        try:
            if plan.media is None:
                session, cached = self._open_text(plan), False
            else:
                media = self.fetcher.fetch(plan.media.url, plan.media.kind, plan.media.param)
                session, cached = self._open(plan, media)
            prompt_tokens = self._check_context(session, plan.question)
            job.emit("ready", {"prompt_tokens": prompt_tokens})
            outcome = self._generate(plan, job, session, cached, 0.0 if media is None else media.fetch_ms, started)
        except APIError as error:
            self.count("failed")
            return "error", error
        except RemoteLLMError as error:  # the vLLM server refused or broke off: its error, in OpenAI's shape
            logger.warning("language model server: %s", error)
            self.count("failed")
            return "error", APIError(error.status, error.message, error.type, error.param, error.code)
        except Exception as error:  # noqa: BLE001 - the server survives whatever one request does
            logger.exception("request failed")
            self.count("failed")
            return "error", APIError(500, f"internal error: {type(error).__name__}: {error}", "server_error")
        finally:
            if media is not None:
                media.close()
        self.count("cancelled" if job.cancelled else "completed")
        self.count("completion_tokens", outcome.completion_tokens)
        return "done", outcome

    def _open_text(self, plan: Plan) -> Conversation:
        """A conversation without media: the language model alone answers (no fetch, no tower)."""
        return self.engine.open_text(generation=plan.generation, system=plan.system, history=plan.history,
                                     name="text-only request")

    def _open(self, plan: Plan, media) -> tuple[Conversation, bool]:
        """A conversation for this request; its features come from the engine's cache, or are made now.

        Concurrent requests for the same new media wait for one decode and encode
        (:meth:`~mugstan_chat.engine.feature_cache.FeatureCache.get_or_encode`); the others report theirs as cached.
        Errors reading the file are 400s that name the media, never the server's temporary path.
        """
        what = describe_url(plan.media.url)
        if plan.media.kind == "image":
            limits = self.config.limits
            counted = []

            def load_image():
                counted.append(1)
                return open_image(media.local_path(), limits.max_width, limits.max_height, what, plan.media.param)

            conversation = self.engine.open_image(load_image, media.sha256, name=what, generation=plan.generation,
                                                  system=plan.system, history=plan.history)
            if counted:
                self.count("image_encodes")
            return conversation, conversation.cached
        try:
            conversation = self.engine.open(
                media.local_path(), plan.session, question=plan.question, name=what, generation=plan.generation,
                system=plan.system, history=plan.history, temporal=plan.temporal, start=plan.start, end=plan.end,
                limits=self.config.limits, content_hash=media.sha256, max_auto_clips=self.config.max_clips)
        except VideoDecodeError as error:
            raise bad_request(str(error), plan.media.param, "invalid_video") from error
        except ConversationTooLong as error:
            raise bad_request(str(error), "messages", "context_length_exceeded") from error
        except ValueError as error:  # e.g. an empty time window
            raise bad_request(f"{what}: {error}", "mugstan", "invalid_video") from error
        if not conversation.cached and plan.select is None:  # this request decoded and encoded the video
            self.count("video_encodes")
        return conversation, conversation.cached

    def _check_context(self, session: Conversation, question: str) -> int:
        prompt_tokens = session.prompt_tokens(question)
        context = self.engine.context_length
        if prompt_tokens >= context:
            raise bad_request(f"This model's maximum context length is {context} tokens. However, your messages "
                              f"resulted in {prompt_tokens} tokens ({session.visual_tokens} of them for the video). "
                              "Please reduce the length of the messages.", "messages", "context_length_exceeded")
        return prompt_tokens

    def _generate(self, plan: Plan, job: Job, session: Conversation, cached: bool, fetch_ms: float,
                  started: float) -> Outcome:
        assembler = TextAssembler(plan.stop)
        pieces = []
        asked = time.perf_counter()
        try:
            for piece in session.ask_stream(plan.question, stop=job.stop):
                text = assembler.feed(piece)
                if text:
                    pieces.append(text)
                    job.emit("text", text)
                if assembler.stopped:
                    job.stop.set()  # a stop sequence ends generation, as in OpenAI's API
        except ConversationTooLong as error:
            raise bad_request(str(error), "messages", "context_length_exceeded") from error
        tail = assembler.finish()
        if tail:
            pieces.append(tail)
            job.emit("text", tail)
        stats = session.last_stats
        finish = "stop" if assembler.stopped or stats.new_tokens < stats.max_new_tokens else "length"
        finished = time.perf_counter()
        first = None if stats.first_token_ms is None else (asked - started) * 1000 + stats.first_token_ms
        timings = {
            "fetch": round(fetch_ms, 2),
            "decode": round(stats.decode_ms, 2),
            "encode": round(stats.encode_ms, 2),
            "first_token": None if first is None else round(first, 2),
            "total": round((finished - started) * 1000, 2),
        }
        selection = session.selection
        if selection is not None:  # what choosing the clips cost: embedding the candidates (0: cached), ranking
            timings.update(candidates=round(selection.embed_ms, 2), rank=round(selection.rank_ms, 2))
        info = {
            "timings_ms": timings,
            "cached_features": cached,
            "visual_tokens": stats.visual_tokens,
            "frames": plan.frames,
            "clips": session.clips,
            "temporal": plan.temporal,
            "max_new_tokens": stats.max_new_tokens,
            "clipped": stats.clipped,
            "notice": self.engine.notice,
            "clip_spans": [span.to_dict() for span in session.clip_spans],
            "references": [ref.to_dict() for ref in session.references("".join(pieces))],
            "selection": None if selection is None else selection.to_dict(),
            "selection_notice": session.selection_notice,
        }
        return Outcome("".join(pieces), finish, stats.prompt_tokens, stats.new_tokens, info)

    def health(self) -> dict:
        with self._lock:
            counters = dict(self.counters)
        return {"counters": counters, "feature_cache": self.engine.features.stats()}
