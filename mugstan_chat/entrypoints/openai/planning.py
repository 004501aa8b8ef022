"""What a chat completion request means: request -> :class:`Plan`, refused (400/404) before any work.

The conversation is stateless, as in OpenAI's API: every request carries the whole
message list; earlier turns become the session's history, the last user message is
the question. A request carries one video or one image in its first user message, or
none: OpenAI chat front ends send text-only requests (a conversation's title, a question
before the video is attached), and the language model alone answers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ...options import DEFAULT_CANDIDATES, DEFAULT_MAX_NEW_TOKENS, DEFAULT_SELECTION
from ...engine.turns import GenerationSettings
from ...video import VideoLimits
from ...session_options import DEFAULTS, OptionError, SessionOptions
from .protocol import APIError, ChatCompletionRequest, MugstanOptions, bad_request


@dataclass
class ServiceConfig:
    """Defaults for requests that leave a setting out, and the limits on what they may ask."""

    model_name: str  # the id served in /v1/models and echoed in responses
    frames: int = DEFAULTS.frames  # T when media_io_kwargs.video.num_frames is absent
    clips: int = DEFAULTS.clips  # C when mugstan.clips is absent
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS  # when max_tokens / max_completion_tokens are absent
    temperature: float = 0.0  # when temperature is absent (greedy; OpenAI's own default is 1)
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    max_frames: int = 64  # largest num_frames a request may ask for
    max_clips: int = 8  # largest mugstan.clips and mugstan.select (options.CLIPS)
    clip_times: str = DEFAULTS.clip_times  # when mugstan.clip_times is absent
    select: int | None = None  # K when mugstan.select is absent (and mugstan.clips too): the server's --select
    candidates: int = DEFAULT_CANDIDATES  # M when mugstan.candidates is absent
    selection: str = DEFAULT_SELECTION  # how K are picked when mugstan.selection is absent: the server's --selection
    shortlist: int | None = None  # S when mugstan.shortlist is absent: the server's --shortlist (None: no coarse pass)
    max_candidates: int = 256  # largest mugstan.candidates (options.CANDIDATES)
    limits: VideoLimits = field(default_factory=VideoLimits)


@dataclass
class MediaRef:
    kind: str  # "video" or "image"
    url: str
    param: str  # where it sits in the request, for error messages


@dataclass
class Plan:
    """Everything needed to answer one request, checked."""

    media: MediaRef | None  # None: a text-only request
    system: str | None
    history: list[tuple[str, str]]
    question: str
    frames: int
    clips: int | str  # C, or "auto"
    temporal: str  # "stan", "mean", "image" or "text" (no media)
    start: float | None
    end: float | None
    generation: GenerationSettings  # carries the request's seed
    stop: list[str]
    stream: bool
    include_usage: bool
    session: SessionOptions = DEFAULTS  # how the session reads the video (validated; the server's defaults filled in)

    @property
    def clip_times(self) -> str:
        return self.session.clip_times

    @property
    def select(self) -> int | None:
        """K of ``candidates`` chosen per question; None: uniform clips."""
        return self.session.select

    @property
    def candidates(self) -> int | None:
        return self.session.candidate_count

    @property
    def selection(self) -> str | None:
        """With select: "topk" or "coverage"."""
        return self.session.strategy

    @property
    def shortlist(self) -> int | None:
        return self.session.shortlist


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


def plan_request(request: ChatCompletionRequest, config: ServiceConfig, tower) -> Plan:
    """Checks a request and reads its conversation; raises APIError (400/404) before any work.

    Args:
        request: the validated wire request.
        config: the server's defaults and limits.
        tower: the loaded ``VideoTower`` (its default and available temporal modes).
    """
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
    if len(media) > 1:
        raise bad_request("this server answers about one video or one image: put at most one video_url or "
                          f"image_url part in the first user message (found {len(media)})", "messages")
    if turns[0][0] != "user" or turns[-1][0] != "user":
        raise bad_request("the conversation must start and end with a user message", "messages")
    if not turns[-1][1].strip():
        raise bad_request("the last user message has no text (the question)",
                          f"messages[{len(request.messages) - 1}]")
    history = [(turns[k][1].strip(), turns[k + 1][1].strip()) for k in range(0, len(turns) - 1, 2)]
    ref = media[0] if media else None
    options = request.mugstan or MugstanOptions()
    session = _session_options(options, request, config)
    frames, clips, select = session.frames, session.select or session.clips, session.select
    temporal = options.temporal or tower.mode
    if temporal not in tower.available_modes:
        raise bad_request(f"temporal mode {temporal!r} is not available with this model (available: "
                          f"{', '.join(tower.available_modes)})", "mugstan.temporal")
    start, end = options.start, options.end
    if ref is None:  # the video settings (and mugstan's, for clients that always send them) do not apply
        frames, clips, temporal, start, end, select = 0, 0, "text", None, None, None
        session = SessionOptions(frames=1, clips=1, clip_times=session.clip_times)
    elif ref.kind == "image":
        if clips != 1 or start is not None or end is not None or options.select:
            raise bad_request("mugstan.clips, select, start and end apply to videos, not to an image", "mugstan")
        frames, clips, temporal, select = 1, 1, "image", None
        session = SessionOptions(frames=1, clips=1, clip_times=session.clip_times)
    generation = GenerationSettings(
        max_new_tokens=request.max_completion_tokens or request.max_tokens or config.max_new_tokens,
        temperature=config.temperature if request.temperature is None else request.temperature,
        top_p=config.top_p if request.top_p is None else request.top_p,
        repetition_penalty=config.repetition_penalty, seed=request.seed)
    try:
        generation.validate()
    except ValueError as error:
        raise bad_request(str(error)) from error
    include_usage = bool(request.stream_options and request.stream_options.include_usage)
    return Plan(ref, "\n".join(s for s in system if s.strip()) or None, history, turns[-1][1].strip(), frames,
                clips if select is None else select, temporal, start, end, generation, request.stop_strings(),
                request.stream, include_usage, session)


def api_name(field: str) -> str:
    """Where a session option sits in a request, for errors' ``param``."""
    return "media_io_kwargs.video.num_frames" if field == "frames" else f"mugstan.{field}"


def _session_options(options: MugstanOptions, request: ChatCompletionRequest, config: ServiceConfig) -> SessionOptions:
    """The request's session options over the server's defaults, within the server's limits, validated.

    The request's ``mugstan.select`` wins; a request that sets ``mugstan.clips`` alone asks for uniform
    clips even on a server started with ``--select``; the server's M, selection and S apply to a selection.
    """
    video_io = request.media_io_kwargs.video if request.media_io_kwargs else None
    frames = (video_io.num_frames if video_io and video_io.num_frames else None) or config.frames
    select = options.select or (None if options.clips else config.select)
    clips = options.clips or (config.clips if select is None else None)
    candidates = options.candidates or (config.candidates if select is not None else None)
    if frames > config.max_frames:
        raise bad_request(f"num_frames={frames} exceeds this server's limit of {config.max_frames}", api_name("frames"))
    if clips not in (None, "auto") and clips > config.max_clips:
        raise bad_request(f"clips={clips} exceeds this server's limit of {config.max_clips}", "mugstan.clips")
    if select is not None and select > config.max_clips:
        raise bad_request(f"select={select} exceeds this server's limit of {config.max_clips}", "mugstan.select")
    if candidates is not None and candidates > config.max_candidates:
        raise bad_request(f"candidates={candidates} exceeds this server's limit of {config.max_candidates}",
                          "mugstan.candidates")
    session = SessionOptions(
        frames=frames, clips=clips, clip_times=options.clip_times or config.clip_times, select=select,
        candidates=candidates, selection=options.selection or (config.selection if select is not None else None),
        shortlist=options.shortlist or (config.shortlist if select is not None else None))
    try:
        return session.validate(api_name)
    except OptionError as error:
        raise bad_request(str(error), api_name(error.field)) from None
