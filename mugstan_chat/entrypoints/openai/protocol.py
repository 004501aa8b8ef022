"""The wire format of the OpenAI-compatible API: requests, responses, stream chunks, errors.

Only data and its validation live here; what a request means is the job of :mod:`mugstan_chat.entrypoints.openai.planning` and :mod:`mugstan_chat.entrypoints.openai.worker`.

Rules for fields a client may send:

* Unknown top-level fields are ignored (clients add vendor fields such as ``user``,
  ``store`` or ``metadata``).
* OpenAI fields that would change the answer and that this server does not implement
  (``n > 1``, penalties, ``logprobs``, ``tools``, JSON ``response_format``) are refused
  with 400 when set to anything but their neutral value (:meth:`ChatCompletionRequest.check_supported`).
* Our own extension objects (``media_io_kwargs``, ``mugstan``) refuse unknown keys, so a
  typo is an error rather than a silently ignored setting.
* Numbers are JSON numbers: an integer field refuses ``"2"``, ``true`` and ``2.5`` (:data:`Int`;
  pydantic's lax mode would take them, and ``bool`` is an ``int`` in Python), a number field
  refuses strings, booleans and non-finite values such as ``1e999`` (:data:`Number`).
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictInt

Int = StrictInt  # a JSON integer: not "2", not true, not 2.0
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # a finite JSON number (an integer is one)


class APIError(Exception):
    """An error that becomes one HTTP response in OpenAI's JSON shape.

    Raised wherever a request is found wanting; rendered in one place (the app's handler).
    """

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return ErrorResponse(error=ErrorDetail(message=self.message, type=self.type, param=self.param,
                                               code=self.code)).model_dump()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


# ----------------------------------------------------------------------------- errors


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {"message", "type", "param", "code"}}``, as OpenAI sends it."""

    error: ErrorDetail


# ----------------------------------------------------------------------------- requests


class _Open(BaseModel):
    model_config = ConfigDict(extra="ignore")


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(_Open):
    type: Literal["text"]
    text: str


class MediaURL(_Open):
    url: str
    detail: str | None = None  # image_url's detail: accepted, has no effect (LLaVA sees one fixed size)


class VideoURLPart(_Open):
    type: Literal["video_url"]
    video_url: MediaURL


class ImageURLPart(_Open):
    type: Literal["image_url"]
    image_url: MediaURL


ContentPart = Annotated[Union[TextPart, VideoURLPart, ImageURLPart], Field(discriminator="type")]


class Message(_Open):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class VideoIOKwargs(_Closed):
    num_frames: Int | None = Field(default=None, ge=1)  # T, frames per clip (vLLM / lmms-eval's name)


class MediaIOKwargs(_Closed):
    video: VideoIOKwargs | None = None


class MugstanOptions(_Closed):
    """Our request extension: how the video is read and encoded."""

    clips: Annotated[Int, Field(ge=1)] | Literal["auto"] | None = None  # C clips, each fills one <image>; "auto"
    clip_times: Literal["auto", "on", "off"] | None = None  # each clip's time span before its <image>
    select: Int | None = Field(default=None, ge=1)  # K: show the K candidate clips that best match the question
    candidates: Int | None = Field(default=None, ge=2)  # M candidates to rank (with select)
    selection: Literal["topk", "coverage"] | None = None  # how select picks its K (options.SELECTIONS)
    shortlist: Int | None = Field(default=None, ge=1)  # S: coarse pass first, S candidates embedded in full
    temporal: Literal["stan", "mean"] | None = None  # default: the server's --temporal
    start: Number | None = Field(default=None, ge=0)  # time window, seconds
    end: Number | None = Field(default=None, gt=0)


class StreamOptions(_Open):
    include_usage: bool = False


class ResponseFormat(_Open):
    type: str = "text"


class ChatCompletionRequest(_Open):
    """POST /v1/chat/completions."""

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: Int | None = Field(default=None, ge=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    temperature: Number | None = Field(default=None, ge=0, le=2)
    top_p: Number | None = Field(default=None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: Int | None = None
    n: Int | None = None
    # OpenAI fields accepted only at their neutral value (see check_supported)
    frequency_penalty: Number | None = None
    presence_penalty: Number | None = None
    logprobs: bool | None = None
    top_logprobs: Int | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: ResponseFormat | None = None
    # extensions
    media_io_kwargs: MediaIOKwargs | None = None
    mugstan: MugstanOptions | None = None

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def check_supported(self) -> None:
        """Refuses (400) settings this server would otherwise silently not honour."""
        if self.n not in (None, 1):
            raise bad_request(f"n={self.n} is not supported: this server returns exactly one choice (n=1)", "n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise bad_request(f"{name} is not supported (only 0)", name)
        if self.logprobs or self.top_logprobs:
            raise bad_request("logprobs are not supported", "logprobs")
        if self.logit_bias:
            raise bad_request("logit_bias is not supported", "logit_bias")
        if self.tools or self.tool_choice not in (None, "none"):
            raise bad_request("tools are not supported", "tools")
        if self.response_format is not None and self.response_format.type != "text":
            raise bad_request(f"response_format {self.response_format.type!r} is not supported (only 'text')",
                              "response_format")
        if len(self.stop_strings()) > 4:
            raise bad_request("at most 4 stop sequences", "stop")
        window = self.mugstan
        if window and window.start is not None and window.end is not None and window.end <= window.start:
            raise bad_request(f"mugstan.end ({window.end}) must be after mugstan.start ({window.start})", "mugstan.end")


# ----------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int  # whole prompt, visual placeholder tokens included
    completion_tokens: int  # generated tokens
    total_tokens: int


class MugstanInfo(BaseModel):
    """Our response extension: what the answer cost and how the video was read."""

    timings_ms: dict[str, float | None]  # fetch, decode, encode, first_token, total (all from request start)
    cached_features: bool  # the video's features came from the server's feature cache
    visual_tokens: int
    frames: int
    clips: int
    temporal: str  # "stan", "mean" or "image"
    max_new_tokens: int  # the limit this answer ran with, after clipping to the context
    clipped: bool  # max_new_tokens was reduced to fit the context
    notice: str = ""
    clip_spans: list[dict] = []  # the clips shown: number, start, end (seconds), candidate (with selection)
    references: list[dict] = []  # moments the answer names (with clip times shown): start, end, clip, text, offset
    selection: dict | None = None  # with mugstan.select: candidates, chosen, scores, candidate_spans, costs
    selection_notice: str | None = None  # why uniform clips were shown instead of selected ones


class ResponseMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: ResponseMessage
    finish_reason: Literal["stop", "length"]
    logprobs: None = None


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    mugstan: MugstanInfo


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    finish_reason: Literal["stop", "length"] | None = None
    logprobs: None = None


class ChatCompletionChunk(BaseModel):
    """One server-sent event of a streamed answer (``data: {...}``); the stream ends with ``data: [DONE]``."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None  # only in the last chunk, when stream_options.include_usage
    mugstan: MugstanInfo | None = None  # only in the chunk that carries finish_reason

    def sse(self) -> str:
        body = self.model_dump_json(exclude={k for k in ("usage", "mugstan") if getattr(self, k) is None})
        return f"data: {body}\n\n"


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mugstan-chat"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
