"""What a chat completion request means, and the work that answers it; no HTTP here.

* :meth:`ChatService.plan` turns a validated request into a :class:`Plan` (the video or
  image, the conversation, the settings), refusing what cannot be served (400) before
  any work is done.
* :class:`Gate` admits at most ``concurrency`` jobs at once and lets at most
  ``queue_size`` more wait; beyond that, 429.
* :meth:`ChatService.start` runs one plan in a worker thread: fetch the media, take
  its features from the :class:`~mugstan_chat.feature_cache.FeatureCache` or decode and
  encode it (through :class:`~mugstan_chat.chat.ChatSession`), then stream the answer.
  The job reports to the event loop through a queue; cancelling it (the client went
  away) stops generation after the current token, and the worker frees its slot only
  when generation has really ended.

The conversation is stateless, as in OpenAI's API: every request carries the whole
message list; earlier turns become the session's history, the last user message is
the question.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from dataclasses import dataclass, field

import torch

from ..chat import ChatSession, ConversationTooLong, GenerationSettings, encode_image
from ..feature_cache import FeatureCache, FeatureKey, model_identity
from ..video import VideoDecodeError, VideoLimits
from .media import MediaFetcher, describe_url, open_image
from .protocol import APIError, ChatCompletionRequest, bad_request

logger = logging.getLogger(__name__)


@dataclass
class ServiceConfig:
    """Defaults for requests that leave a setting out, and the limits on what they may ask."""

    model_name: str  # the id served in /v1/models and echoed in responses
    frames: int = 8  # T when media_io_kwargs.video.num_frames is absent
    clips: int = 1  # C when mugstan.clips is absent
    max_new_tokens: int = 512  # when max_tokens / max_completion_tokens are absent
    temperature: float = 0.0  # when temperature is absent (greedy; OpenAI's own default is 1)
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_frames: int = 64  # largest num_frames a request may ask for
    max_clips: int = 16  # largest mugstan.clips
    limits: VideoLimits = field(default_factory=VideoLimits)


@dataclass
class MediaRef:
    kind: str  # "video" or "image"
    url: str
    param: str  # where it sits in the request, for error messages


@dataclass
class Plan:
    """Everything needed to answer one request, checked."""

    media: MediaRef
    system: str | None
    history: list[tuple[str, str]]
    question: str
    frames: int
    clips: int
    temporal: str  # "stan", "mean" or "image"
    start: float | None
    end: float | None
    generation: GenerationSettings
    stop: list[str]
    seed: int | None
    stream: bool
    include_usage: bool


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
    (stripped, as :meth:`ChatSession.ask` returns it).
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


def _text(content, param: str, allow_media: bool):
    """(text, media parts with their params) of a message's content."""
    if content is None:
        return "", []
    if isinstance(content, str):
        return content, []
    texts, media = [], []
    for j, part in enumerate(content):
        where = f"{param}[{j}]"
        if part.type == "text":
            texts.append(part.text)
        elif not allow_media:
            raise bad_request(f"{part.type} parts are only allowed in user messages", where)
        elif part.type == "video_url":
            media.append(MediaRef("video", part.video_url.url, f"{where}.video_url"))
        else:
            media.append(MediaRef("image", part.image_url.url, f"{where}.image_url"))
    return "\n".join(texts), media


class ChatService:
    """Answers chat completion requests with one loaded model.

    Args:
        chat_model: from :func:`mugstan_chat.loader.load_chat_model`.
        config: :class:`ServiceConfig`.
        fetcher: :class:`media.MediaFetcher` (its policy decides which URLs are allowed).
        cache: :class:`FeatureCache` shared by all requests.
    """

    def __init__(self, chat_model, config: ServiceConfig, fetcher: MediaFetcher, cache: FeatureCache):
        self.chat_model = chat_model
        self.config = config
        self.fetcher = fetcher
        self.cache = cache
        self.model_identity = model_identity(chat_model)  # the same identity the app and the CLI key by
        self._lock = threading.Lock()
        self.counters = {"requests": 0, "completed": 0, "cancelled": 0, "failed": 0, "video_encodes": 0,
                         "image_encodes": 0, "completion_tokens": 0}

    def count(self, name: str, value: int = 1) -> None:
        with self._lock:
            self.counters[name] += value

    # ------------------------------------------------------------------ planning (cheap, on the loop)

    def plan(self, request: ChatCompletionRequest) -> Plan:
        """Checks a request and reads its conversation; raises APIError (400/404)."""
        config = self.config
        if request.model not in (None, "", config.model_name):
            raise APIError(404, f"the model {request.model!r} does not exist; this server serves "
                           f"{config.model_name!r} (see /v1/models)", param="model", code="model_not_found")
        request.check_supported()
        system, turns, media = [], [], []
        for i, message in enumerate(request.messages):
            param = f"messages[{i}].content"
            text, found = _text(message.content, param, allow_media=message.role == "user")
            if message.role in ("system", "developer"):
                system.append(text)
                continue
            if found and turns:
                raise bad_request("the video or image must be in the first user message", found[0].param)
            media.extend(found)
            if turns and turns[-1][0] == message.role:  # consecutive messages of one role: one turn
                turns[-1] = (message.role, turns[-1][1] + "\n" + text)
            else:
                turns.append((message.role, text))
        if len(media) != 1:
            raise bad_request("this server answers about one video or one image: put exactly one video_url or "
                              f"image_url part in the first user message (found {len(media)})", "messages")
        if turns[0][0] != "user" or turns[-1][0] != "user":
            raise bad_request("the conversation must start and end with a user message", "messages")
        if not turns[-1][1].strip():
            raise bad_request("the last user message has no text (the question)",
                              f"messages[{len(request.messages) - 1}]")
        history = [(turns[k][1].strip(), turns[k + 1][1].strip()) for k in range(0, len(turns) - 1, 2)]
        ref = media[0]
        options = request.mugstan
        video_io = request.media_io_kwargs.video if request.media_io_kwargs else None
        frames = (video_io.num_frames if video_io and video_io.num_frames else None) or config.frames
        clips = (options.clips if options and options.clips else None) or config.clips
        if frames > config.max_frames:
            raise bad_request(f"num_frames={frames} exceeds this server's limit of {config.max_frames}",
                              "media_io_kwargs.video.num_frames")
        if clips > config.max_clips:
            raise bad_request(f"clips={clips} exceeds this server's limit of {config.max_clips}", "mugstan.clips")
        tower = self.chat_model.tower
        temporal = (options.temporal if options and options.temporal else None) or tower.mode
        if temporal not in tower.available_modes:
            raise bad_request(f"temporal mode {temporal!r} is not available with this model (available: "
                              f"{', '.join(tower.available_modes)})", "mugstan.temporal")
        start = options.start if options else None
        end = options.end if options else None
        if ref.kind == "image":
            if clips != 1 or start is not None or end is not None:
                raise bad_request("mugstan.clips, start and end apply to videos, not to an image", "mugstan")
            frames, clips, temporal = 1, 1, "image"
        generation = GenerationSettings(
            max_new_tokens=request.max_completion_tokens or request.max_tokens or config.max_new_tokens,
            temperature=config.temperature if request.temperature is None else request.temperature,
            top_p=config.top_p if request.top_p is None else request.top_p,
            repetition_penalty=config.repetition_penalty)
        try:
            generation.generate_kwargs()
        except ValueError as error:
            raise bad_request(str(error)) from error
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return Plan(ref, "\n".join(s for s in system if s.strip()) or None, history, turns[-1][1].strip(), frames,
                    clips, temporal, start, end, generation, request.stop_strings(), request.seed, request.stream,
                    include_usage)

    # ------------------------------------------------------------------ running (worker thread)

    def start(self, plan: Plan, loop: asyncio.AbstractEventLoop, on_finish) -> Job:
        """Runs ``plan`` in a new thread; ``on_finish`` is called on the loop once it has ended."""
        job = Job(loop)
        self.count("requests")

        def work():
            try:
                self._run(plan, job)
            finally:
                job.finished.set()
                try:
                    loop.call_soon_threadsafe(on_finish)
                except RuntimeError:  # the loop is closed (shutdown): there is no slot left to free
                    pass

        job.thread = threading.Thread(target=work, name="mugstan-serve-job", daemon=True)
        job.thread.start()
        return job

    def _run(self, plan: Plan, job: Job) -> None:
        started = time.perf_counter()
        media = None
        try:
            media = self.fetcher.fetch(plan.media.url, plan.media.kind, plan.media.param)
            session, cached = self._session(plan, media)
            prompt_tokens = self._check_context(session, plan.question)
            job.emit("ready", {"prompt_tokens": prompt_tokens})
            outcome = self._generate(plan, job, session, cached, media.fetch_ms, started)
        except APIError as error:
            self.count("failed")
            job.emit("error", error)
            return
        except Exception as error:  # noqa: BLE001 - the server survives whatever one request does
            logger.exception("request failed")
            self.count("failed")
            job.emit("error", APIError(500, f"internal error: {type(error).__name__}: {error}", "server_error"))
            return
        finally:
            if media is not None:
                media.close()
        self.count("cancelled" if job.cancelled else "completed")
        self.count("completion_tokens", outcome.completion_tokens)
        job.emit("done", outcome)

    def _session(self, plan: Plan, media) -> tuple[ChatSession, bool]:
        """A session for this request, with features from the cache or freshly decoded and encoded."""
        key = FeatureKey(media.sha256, plan.frames, plan.clips, plan.temporal, plan.start, plan.end,
                         self.model_identity)
        what = describe_url(plan.media.url)
        session = ChatSession(self.chat_model, what, frames=plan.frames, clips=plan.clips,
                              generation=plan.generation,
                              temporal=None if plan.media.kind == "image" else plan.temporal,
                              system=plan.system, start=plan.start, end=plan.end, limits=self.config.limits,
                              prepare=False)
        session.history = list(plan.history)
        features = self.cache.get(key)
        if features is not None:
            session.attach_features(features)
            return session, True
        if plan.media.kind == "image":
            limits = self.config.limits
            image = open_image(media.local_path(), limits.max_width, limits.max_height, what, plan.media.param)
            features = encode_image(self.chat_model, image)
            session.attach_features(features, cached=False)
            self.count("image_encodes")
        else:
            session.video_path = media.local_path()
            try:
                session.prepare()
            except VideoDecodeError as error:
                message = str(error).replace(session.video_path, what)  # never show server-side temp paths
                raise bad_request(message, plan.media.param, "invalid_video") from error
            except ValueError as error:  # e.g. an empty time window
                raise bad_request(f"{what}: {error}", "mugstan", "invalid_video") from error
            features = session.video_features
            self.count("video_encodes")
        self.cache.put(key, features)
        return session, False

    def _check_context(self, session: ChatSession, question: str) -> int:
        prompt_tokens = int(session.build_prompt(question)["input_ids"].shape[1])
        context = self.chat_model.context_length
        if prompt_tokens >= context:
            raise bad_request(f"This model's maximum context length is {context} tokens. However, your messages "
                              f"resulted in {prompt_tokens} tokens ({session.visual_tokens} of them for the video). "
                              "Please reduce the length of the messages.", "messages", "context_length_exceeded")
        return prompt_tokens

    def _generate(self, plan: Plan, job: Job, session: ChatSession, cached: bool, fetch_ms: float,
                  started: float) -> Outcome:
        if plan.seed is not None:
            torch.manual_seed(plan.seed)
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
        info = {
            "timings_ms": {
                "fetch": round(fetch_ms, 2),
                "decode": round(stats.decode_ms, 2),
                "encode": round(stats.encode_ms, 2),
                "first_token": None if first is None else round(first, 2),
                "total": round((finished - started) * 1000, 2),
            },
            "cached_features": cached,
            "visual_tokens": stats.visual_tokens,
            "frames": plan.frames,
            "clips": plan.clips,
            "temporal": plan.temporal,
            "max_new_tokens": stats.max_new_tokens,
            "clipped": stats.clipped,
            "notice": self.chat_model.notice,
        }
        return Outcome("".join(pieces), finish, stats.prompt_tokens, stats.new_tokens, info)

    def health(self) -> dict:
        with self._lock:
            counters = dict(self.counters)
        return {"counters": counters, "feature_cache": self.cache.stats()}
