"""What a chat completion request means: request -> :class:`Plan`, refused (400/404) before any work.

The conversation is stateless, as in OpenAI's API: every request carries the whole
message list; earlier turns become the session's history, the last user message is
the question. A request carries one video or one image in its first user message, or
none: OpenAI chat front ends send text-only requests (a conversation's title, a question
before the video is attached), and the language model alone answers them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..options import DEFAULT_SELECTION
from ..turns import GenerationSettings
from ..video import VideoLimits
from .protocol import APIError, ChatCompletionRequest, bad_request


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
    max_clips: int = 8  # largest mugstan.clips and mugstan.select (options.CLIPS)
    clip_times: str = "auto"  # when mugstan.clip_times is absent
    select: int | None = None  # K when mugstan.select is absent (and mugstan.clips too): the server's --select
    candidates: int = 32  # M when mugstan.candidates is absent
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
    clip_times: str = "auto"
    select: int | None = None  # K of ``candidates`` chosen per question; None: uniform clips
    candidates: int | None = None
    selection: str | None = None  # with select: "topk" or "coverage"
    shortlist: int | None = None  # with select: S candidates embedded in full after a one-frame pass


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
    options = request.mugstan
    video_io = request.media_io_kwargs.video if request.media_io_kwargs else None
    frames = (video_io.num_frames if video_io and video_io.num_frames else None) or config.frames
    clips = (options.clips if options and options.clips else None) or config.clips
    if frames > config.max_frames:
        raise bad_request(f"num_frames={frames} exceeds this server's limit of {config.max_frames}",
                          "media_io_kwargs.video.num_frames")
    if clips != "auto" and clips > config.max_clips:
        raise bad_request(f"clips={clips} exceeds this server's limit of {config.max_clips}", "mugstan.clips")
    select, candidates, selection, shortlist = _selection(options, config)
    temporal = (options.temporal if options and options.temporal else None) or tower.mode
    if temporal not in tower.available_modes:
        raise bad_request(f"temporal mode {temporal!r} is not available with this model (available: "
                          f"{', '.join(tower.available_modes)})", "mugstan.temporal")
    start = options.start if options else None
    end = options.end if options else None
    if ref is None:  # the video settings (and mugstan's, for clients that always send them) do not apply
        frames, clips, temporal, start, end, select, candidates = 0, 0, "text", None, None, None, None
    elif ref.kind == "image":
        if clips != 1 or start is not None or end is not None or (options and options.select):
            raise bad_request("mugstan.clips, select, start and end apply to videos, not to an image", "mugstan")
        frames, clips, temporal, select, candidates = 1, 1, "image", None, None
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
    clip_times = (options.clip_times if options and options.clip_times else None) or config.clip_times
    return Plan(ref, "\n".join(s for s in system if s.strip()) or None, history, turns[-1][1].strip(), frames,
                clips if select is None else select, temporal, start, end, generation, request.stop_strings(),
                request.stream, include_usage, clip_times, select, candidates, selection if select else None,
                shortlist if select else None)


def _selection(options, config: ServiceConfig) -> tuple[int | None, int | None, str | None, int | None]:
    """(K, M, how K are picked, S) of clip selection, or four Nones for uniform clips.

    The request's ``mugstan.select`` wins; a request that sets ``mugstan.clips`` alone asks for uniform
    clips even on a server started with ``--select``.
    """
    asked = options.select if options else None
    if options and options.candidates and not asked:
        raise bad_request("mugstan.candidates needs mugstan.select (the number of candidates to show)",
                          "mugstan.candidates")
    if options and options.selection and not asked and config.select is None:
        raise bad_request("mugstan.selection needs mugstan.select (the number of candidates to show)",
                          "mugstan.selection")
    if asked and options.clips:
        raise bad_request("mugstan.select K shows K clips: leave mugstan.clips out", "mugstan.clips")
    select = asked or (None if options and options.clips else config.select)
    if select is None:
        return None, None, None, None
    candidates = (options.candidates if options and options.candidates else None) or config.candidates
    if select > config.max_clips:
        raise bad_request(f"select={select} exceeds this server's limit of {config.max_clips}", "mugstan.select")
    if candidates > config.max_candidates:
        raise bad_request(f"candidates={candidates} exceeds this server's limit of {config.max_candidates}",
                          "mugstan.candidates")
    if candidates < select:
        raise bad_request(f"select={select} needs at least as many candidates (got {candidates})", "mugstan.candidates")
    shortlist = (options.shortlist if options and options.shortlist else None) or config.shortlist
    if shortlist is not None and not select <= shortlist < candidates:
        raise bad_request(f"shortlist={shortlist} must lie between select={select} and candidates={candidates} "
                          "(K <= S < M)", "mugstan.shortlist")
    return (select, candidates, (options.selection if options and options.selection else None) or config.selection,
            shortlist)
