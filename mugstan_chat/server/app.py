"""``mugstan-chat serve``: thin FastAPI routes over :class:`.service.ChatService`, and the command line.

Usage::

    mugstan-chat serve --demo                                      # http://127.0.0.1:8000/v1
    mugstan-chat serve --model llava-hf/llava-1.5-7b-hf --stan PATH --allowed-local-media-path /data/videos
    mugstan-chat serve --demo --host 0.0.0.0 --api-key "$KEY"      # other machines: a key is required
    python -m mugstan_chat.server --demo                           # the same

Routes: ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``. Every
error is OpenAI's JSON error shape, rendered here and nowhere else. Arguments are
checked before the model loads. Details: docs/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import ipaddress
import json
import logging
import os
import socket
import sys

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .protocol import (APIError, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChunkChoice,
                       Delta, ModelCard, ModelList, MugstanInfo, ResponseMessage, Usage, bad_request, completion_id,
                       now)

logger = logging.getLogger(__name__)

PROG = "mugstan-chat serve"
API_KEY_ENV = "MUGSTAN_API_KEY"


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
        service: :class:`.service.ChatService`.
        gate: :class:`.service.Gate` (concurrency and queue).
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


# ----------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    """The CLI's model/video/generation options (same names), plus the server's."""
    from ..cli import model_options

    parser = argparse.ArgumentParser(prog=PROG, parents=[model_options()],
                                     description="OpenAI-compatible video chat API (POST /v1/chat/completions).")
    server = parser.add_argument_group("server")
    server.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: %(default)s); any other address needs --api-key")
    server.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    server.add_argument("--api-key", default=None,
                        help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set)")
    server.add_argument("--served-model-name", default=None,
                        help="model id in /v1/models and responses (default: the --model value, 'demo' with --demo)")
    server.add_argument("--concurrency", type=int, default=1,
                        help="requests answered at once; 1 per GPU (default: %(default)s)")
    server.add_argument("--queue-size", type=int, default=16,
                        help="requests waiting beyond those; more get 429 (default: %(default)s)")
    server.add_argument("--max-body-mb", type=float, default=64.0,
                        help="largest request body; larger gets 413 (default: %(default)s)")
    media = parser.add_argument_group("media")
    media.add_argument("--allowed-local-media-path", action="append", default=[], metavar="DIR",
                       help="allow file:// URLs inside DIR (repeatable; default: none, file:// refused)")
    media.add_argument("--allowed-media-domains", nargs="+", default=[], metavar="HOST",
                       help="hosts whose http(s) URLs may be downloaded (default: none)")
    media.add_argument("--max-media-mb", type=float, default=100.0,
                       help="largest video or image, from any source (default: %(default)s)")
    media.add_argument("--media-timeout", type=float, default=30.0,
                       help="seconds for an http(s) download (default: %(default)s)")
    media.add_argument("--max-video-seconds", type=float, default=3 * 3600.0,
                       help="longest accepted video (default: %(default)s)")
    media.add_argument("--max-frames", type=int, default=64,
                       help="largest num_frames a request may ask for (default: %(default)s)")
    media.add_argument("--max-clips", type=int, default=16, help="largest mugstan.clips (default: %(default)s)")
    media.add_argument("--feature-cache-mb", type=float, default=1024.0,
                       help="memory for cached video features, LRU; 0 disables (default: %(default)s)")
    return parser


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_args(parser: argparse.ArgumentParser, args) -> None:
    """Every argument problem is found here, before the model loads."""
    if not 1 <= args.port <= 65535:
        parser.error(f"--port {args.port} is not a port number (1-65535)")
    for name in ("concurrency", "max_frames", "max_clips"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.queue_size < 0:
        parser.error("--queue-size must be 0 or more")
    for name in ("max_body_mb", "max_media_mb", "media_timeout", "max_video_seconds"):
        if not getattr(args, name) > 0:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.feature_cache_mb < 0:
        parser.error("--feature-cache-mb must be 0 or more")
    if args.frames > args.max_frames or args.clips > args.max_clips:
        parser.error("--frames/--clips exceed --max-frames/--max-clips")
    from ..chat import GenerationSettings

    try:
        GenerationSettings(max_new_tokens=args.max_new_tokens or 1, temperature=args.temperature, top_p=args.top_p,
                           repetition_penalty=args.repetition_penalty).generate_kwargs()
    except ValueError as error:
        parser.error(str(error))
    if args.api_key is not None and not args.api_key.strip():
        parser.error("--api-key must not be empty")
    if not is_loopback(args.host) and not args.api_key:
        parser.error(f"--host {args.host} exposes the server to other machines: pass --api-key KEY "
                     f"(or set ${API_KEY_ENV})")
    try:  # a busy port is found now, not after minutes of loading weights
        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
    except OSError as error:
        parser.error(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}")


def main(argv: list[str] | None = None) -> int:
    """Checks the arguments, loads the model and serves until interrupted; returns the exit status."""
    from ..cli import DEMO_MAX_NEW_TOKENS, _configure_logging
    from ..video import VideoLimits
    from .media import MediaFetcher, MediaPolicy

    parser = build_parser()
    args = parser.parse_args(argv)
    args.api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    _check_args(parser, args)
    try:
        policy = MediaPolicy.create(args.allowed_local_media_path, args.allowed_media_domains,
                                    int(args.max_media_mb * 2**20), args.media_timeout)
    except ValueError as error:
        parser.error(str(error))
    _configure_logging(args.debug)
    logger.setLevel(logging.INFO)

    from ..checkpoint import CheckpointError
    from ..feature_cache import FeatureCache
    from ..cli import load_model_from_options
    from ..loader import ModelLoadError
    from .service import ChatService, Gate, ServiceConfig

    try:
        chat_model = load_model_from_options(args)
    except (ModelLoadError, CheckpointError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    if chat_model.notice:
        print(f"note: {chat_model.notice}", file=sys.stderr)
    config = ServiceConfig(
        model_name=args.served_model_name or chat_model.settings.model, frames=args.frames, clips=args.clips,
        max_new_tokens=args.max_new_tokens or (DEMO_MAX_NEW_TOKENS if args.demo else 512),
        temperature=args.temperature, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
        max_frames=args.max_frames, max_clips=args.max_clips,
        limits=VideoLimits(max_seconds=args.max_video_seconds))
    service = ChatService(chat_model, config, MediaFetcher(policy), FeatureCache(int(args.feature_cache_mb * 2**20)))
    app = create_app(service, Gate(args.concurrency, args.queue_size), api_key=args.api_key,
                     max_body_bytes=int(args.max_body_mb * 2**20))
    import uvicorn

    print(f"{PROG}: model {config.model_name!r} on http://{args.host}:{args.port}/v1"
          f"{' (API key required)' if args.api_key else ''}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="info" if args.debug else "warning",
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
