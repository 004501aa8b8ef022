"""``mugstan-chat serve``: the command line of the OpenAI-compatible server (docs/serve.md).

Usage::

    mugstan-chat serve --demo                                      # http://127.0.0.1:8000/v1
    mugstan-chat serve --model llava-hf/llava-1.5-7b-hf --stan PATH --allowed-local-media-path /data/videos
    mugstan-chat serve --demo --host 0.0.0.0 --api-key "$KEY"      # other machines: a key is required
    python -m mugstan_chat.entrypoints.openai --demo                           # the same

The model, video and generation flags come from :class:`~mugstan_chat.entrypoints.ModelArgs`,
host, port, admission and cache budget from :class:`~mugstan_chat.entrypoints.ServingArgs`
(the same as ``app.py``); only the API key, body and media limits are the server's own.
Every argument is checked before the model loads.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import ModelArgs, ServingArgs, configure_logging, load_engine_or_report
from ..serving_args import ServingDefaults
from ..values import megabytes_to_bytes, positive_float
from ...options import CLIPS, FRAMES

logger = logging.getLogger(__name__)

PROG = "mugstan-chat serve"
API_KEY_ENV = "MUGSTAN_API_KEY"
AUTH_HINT = f"--api-key KEY (or set ${API_KEY_ENV})"
DEFAULTS = ServingDefaults(port=8000, max_video_seconds=3 * 3600.0)


def build_parser() -> argparse.ArgumentParser:
    """The shared model and server flags, plus the API's own."""
    parser = argparse.ArgumentParser(prog=PROG,
                                     description="OpenAI-compatible video chat API (POST /v1/chat/completions).")
    ModelArgs.add_cli_args(parser)
    ServingArgs.add_cli_args(parser, DEFAULTS, AUTH_HINT)
    api = parser.add_argument_group("API")
    api.add_argument("--api-key", default=None,
                     help=f"require 'Authorization: Bearer KEY' on /v1/* (default: ${API_KEY_ENV} if set)")
    api.add_argument("--served-model-name", default=None,
                     help="model id in /v1/models and responses (default: the --model value, 'demo' with --demo)")
    api.add_argument("--max-body-mb", type=positive_float, default=64.0,
                     help="largest request body; larger gets 413 (default: %(default)s)")
    media = parser.add_argument_group("media")
    media.add_argument("--allowed-local-media-path", action="append", default=[], metavar="DIR",
                       help="allow file:// URLs inside DIR (repeatable; default: none, file:// refused)")
    media.add_argument("--allowed-media-domains", nargs="+", default=[], metavar="HOST",
                       help="hosts whose http(s) URLs may be downloaded (default: none)")
    media.add_argument("--max-media-mb", type=positive_float, default=100.0,
                       help="largest video or image, from any source (default: %(default)s)")
    media.add_argument("--media-timeout", type=positive_float, default=30.0,
                       help="seconds for an http(s) download (default: %(default)s)")
    media.add_argument("--max-frames", type=FRAMES.parse, default=int(FRAMES.high),
                       help=f"largest num_frames a request may ask for, {FRAMES.low:g}..{FRAMES.high:g} "
                            "(default: %(default)s)")
    media.add_argument("--max-clips", type=CLIPS.parse, default=int(CLIPS.high),
                       help=f"largest mugstan.clips, {CLIPS.low:g}..{CLIPS.high:g} (default: %(default)s)")
    return parser


def parse_args(argv: list[str] | None = None):
    """(model args, serving args, the namespace); every problem is a usage error (exit 2) here."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    try:
        if args.api_key is not None and not args.api_key.strip():
            raise ValueError("--api-key must not be empty")
        if args.frames > args.max_frames or (args.clips != "auto" and args.clips > args.max_clips):
            raise ValueError("--frames/--clips exceed --max-frames/--max-clips")
        model_args = ModelArgs.from_cli_args(args)
        model_args.generation()
        serving = ServingArgs.from_cli_args(args).validate(authenticated=bool(args.api_key), auth_hint=AUTH_HINT)
    except ValueError as error:
        parser.error(str(error))
    return model_args, serving, args


def main(argv: list[str] | None = None) -> int:
    """Checks the arguments, loads the model and serves until interrupted; returns the exit status."""
    model_args, serving, args = parse_args(argv)
    from ...engine.feature_cache import FeatureCache
    from ...video import VideoLimits
    from .app import create_app
    from .jobs import Gate
    from .media import MediaFetcher, MediaPolicy
    from .planning import ServiceConfig
    from .worker import ChatService

    try:
        policy = MediaPolicy.create(args.allowed_local_media_path, args.allowed_media_domains,
                                    megabytes_to_bytes(args.max_media_mb), args.media_timeout)
    except ValueError as error:
        build_parser().error(str(error))
    configure_logging(model_args.debug)
    logger.setLevel(logging.INFO)
    engine = load_engine_or_report(model_args, PROG, FeatureCache(serving.feature_cache_bytes))
    if engine is None:
        return 1
    generation = model_args.generation()
    config = ServiceConfig(
        model_name=args.served_model_name or engine.model.settings.model, frames=model_args.frames,
        clips=model_args.clips if model_args.select is None else 1, max_new_tokens=generation.max_new_tokens,
        temperature=generation.temperature, top_p=generation.top_p, repetition_penalty=generation.repetition_penalty,
        max_frames=args.max_frames, max_clips=args.max_clips, limits=VideoLimits(max_seconds=serving.max_video_seconds),
        clip_times=model_args.clip_times, select=model_args.select,
        candidates=model_args.candidate_count or ServiceConfig.candidates,
        selection=model_args.selection or ServiceConfig.selection, shortlist=model_args.shortlist)
    service = ChatService(engine, config, MediaFetcher(policy), threads_per_request=serving.threads())
    app = create_app(service, Gate(serving.concurrency, serving.queue_size), api_key=args.api_key,
                     max_body_bytes=megabytes_to_bytes(args.max_body_mb))
    import uvicorn

    print(f"{PROG}: model {config.model_name!r} on http://{serving.host}:{serving.port}/v1"
          f"{' (API key required)' if args.api_key else ''}; {serving.concurrency} job(s) at once, "
          f"{service.threads_per_request} torch thread(s) each", file=sys.stderr, flush=True)
    uvicorn.run(app, host=serving.host, port=serving.port, log_level="info" if model_args.debug else "warning",
                timeout_graceful_shutdown=5)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
