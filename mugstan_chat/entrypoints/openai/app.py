"""The FastAPI routes of ``mugstan-chat serve``, thin over :class:`mugstan_chat.entrypoints.openai.worker.ChatService`.

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``. Every
error is OpenAI's JSON error shape, rendered here and nowhere else. The command line
is :mod:`mugstan_chat.entrypoints.openai.cli`. Details: docs/serve.md.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import (APIError, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice,
                       Delta, ModelCard, ModelList, MugstanInfo, ResponseMessage, Usage, bad_request, completion_id,
                       now)

logger = logging.getLogger(__name__)


def error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


class BodyLimit:
    """ASGI middleware: request bodies over ``max_bytes`` get 413 before the app parses them.

    The body is read here (declared length checked first, then counted as it arrives, so
    chunked uploads are bounded too) and handed on unchanged.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(scope, receive, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(scope, receive, send)
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later messages (a disconnect) come from the client

        return await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send):
        error = APIError(413, f"request body is larger than the limit of {self.max_bytes / 2**20:g} MiB "
                         "(--max-body-mb)", code="request_too_large")
        await error_response(error)(scope, receive, send)


def create_app(service, gate, api_key: str | None = None, max_body_bytes: int = 64 * 2**20):
    """The FastAPI app: routes, auth, body limit, error rendering.

    Args:
        service: :class:`mugstan_chat.entrypoints.openai.worker.ChatService`.
        gate: :class:`mugstan_chat.entrypoints.openai.jobs.Gate` (concurrency and queue).
        api_key: required as ``Authorization: Bearer KEY`` on /v1/* when set.
        max_body_bytes: larger request bodies get 413.
    """
    app = FastAPI(title="mugstan-chat", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    model_name = service.config.model_name
    started_at = now()

    @app.exception_handler(APIError)
    async def _api_error(request, error: APIError):
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, error: RequestValidationError):
        problems = error.errors()
        first = problems[0] if problems else {}
        where = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            message = "the request body is not valid JSON"
        else:
            message = f"{'.'.join(where) or 'body'}: {first.get('msg', 'invalid value')}"
            if len(problems) > 1:
                message += f" (and {len(problems) - 1} more problem(s))"
        return error_response(bad_request(message, ".".join(where) or None))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, error: StarletteHTTPException):
        return error_response(APIError(error.status_code, f"{request.method} {request.url.path}: {error.detail}"))

    @app.exception_handler(Exception)
    async def _unexpected(request, error: Exception):
        logger.exception("unexpected error")
        return error_response(APIError(500, f"internal error: {type(error).__name__}", "server_error"))

    async def authorized(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "missing or incorrect API key: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "running": gate.running, "waiting": gate.waiting,
                "concurrency": gate.concurrency, "queue_size": gate.queue_size, **service.health()}

    @app.get("/v1/models", dependencies=[Depends(authorized)])
    async def models():
        return ModelList(data=[ModelCard(id=model_name, created=started_at)]).model_dump()

    @app.post("/v1/chat/completions", dependencies=[Depends(authorized)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        plan = service.plan(body)
        await gate.acquire()
        loop = asyncio.get_running_loop()
        job = service.start(plan, loop, gate.release)
        watcher = asyncio.create_task(_watch_disconnect(request, job))
        kind, value = await job.next()
        if kind == "error":
            watcher.cancel()
            return error_response(value)
        rid, created = completion_id(), now()
        if plan.stream:
            watcher.cancel()  # a streaming response notices the disconnect itself
            return StreamingResponse(_sse(job, plan, rid, created, model_name), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            while True:
                kind, value = await job.next()
                if kind == "error":
                    return error_response(value)
                if kind == "done":
                    return JSONResponse(_completion(value, rid, created, model_name).model_dump())
        finally:
            watcher.cancel()

    return app


async def _watch_disconnect(request, job, poll_s: float = 0.25) -> None:
    """Cancels a non-streamed job whose client has gone away."""
    while not job.finished.is_set():
        if await request.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(poll_s)


def _usage(outcome) -> Usage:
    return Usage(prompt_tokens=outcome.prompt_tokens, completion_tokens=outcome.completion_tokens,
                 total_tokens=outcome.prompt_tokens + outcome.completion_tokens)


def _completion(outcome, rid: str, created: int, model: str) -> ChatCompletion:
    return ChatCompletion(id=rid, created=created, model=model, usage=_usage(outcome),
                          choices=[Choice(message=ResponseMessage(content=outcome.text),
                                          finish_reason=outcome.finish_reason)],
                          mugstan=MugstanInfo(**outcome.info))


async def _sse(job, plan, rid: str, created: int, model: str):
    """Server-sent events: a role chunk, content chunks, a finish chunk, [usage chunk], ``[DONE]``.

    If the client goes away, the response task is cancelled here: the job is cancelled,
    which ends generation after the current token and frees the slot.
    """
    def chunk(delta: Delta, finish=None, info=None, usage=None, choices=True) -> str:
        return ChatCompletionChunk(id=rid, created=created, model=model, usage=usage, mugstan=info,
                                   choices=[ChunkChoice(delta=delta, finish_reason=finish)] if choices else []).sse()

    try:
        yield chunk(Delta(role="assistant", content=""))
        while True:
            kind, value = await job.next()
            if kind == "text":
                yield chunk(Delta(content=value))
            elif kind == "error":  # after the stream began: OpenAI's error object as an event
                yield f"data: {json.dumps(value.body())}\n\n"
                break
            elif kind == "done":
                yield chunk(Delta(), finish=value.finish_reason, info=MugstanInfo(**value.info))
                if plan.include_usage:
                    yield chunk(Delta(), usage=_usage(value), choices=False)
                break
        yield "data: [DONE]\n\n"
    finally:
        if not job.finished.is_set():
            job.cancel()
