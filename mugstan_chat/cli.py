"""``mugstan-chat``: ask LLaVA about a video from the command line (DESIGN.md section 4).

Usage::

    mugstan-chat ask VIDEO "what happens?" --model llava-hf/llava-1.5-7b-hf --stan PATH
    mugstan-chat ask VIDEO "what happens?" --temporal mean        # no branch: training-free baseline
    mugstan-chat ask VIDEO "what happens?" --demo --json          # offline toy model, one JSON object
    mugstan-chat chat VIDEO --demo                                 # multi-turn; /reset, /exit
    mugstan-chat eval QUESTIONS --video-root DIR --out DIR         # multiple-choice QA, stan/mean/concat
    mugstan-chat serve --demo                                      # OpenAI-compatible API (docs/serve.md)

Errors print one line to stderr and exit 1 (usage errors exit 2); ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import traceback

PROG = "mugstan-chat"
CHAT_COMMANDS = ("commands: /reset clears the conversation (the video stays encoded), /video PATH starts a "
                 "conversation about another video (videos seen before come from the feature cache), "
                 "/exit (or /quit) quits, /help shows this")
DEMO_MAX_NEW_TOKENS = 48  # the demo's answers are noise; keep them short unless asked otherwise


def model_options() -> argparse.ArgumentParser:
    """Shared flags; ranges come from :mod:`.options` (the web sliders use the same), checked here (exit 2)."""
    from .options import CLIPS, DEFAULT_MODEL, FRAMES, MAX_NEW_TOKENS, REPETITION_PENALTY, TEMPERATURE, TOP_P

    shared = argparse.ArgumentParser(add_help=False)
    model = shared.add_argument_group("model")
    model.add_argument("--model", default=DEFAULT_MODEL, help="LLaVA hub id or local directory (default: %(default)s)")
    model.add_argument("--stan", default=None, metavar="PATH",
                       help="STAN branch directory or hub id; without it 'stan' mode falls back to 'mean'")
    model.add_argument("--temporal", choices=["stan", "mean"], default="stan",
                       help="stan: fused temporal branch; mean: temporal mean of plain CLIP features")
    model.add_argument("--demo", action="store_true",
                       help="tiny offline model with random weights (answers are meaningless)")
    model.add_argument("--allow-resolution-mismatch", action="store_true",
                       help="accept a branch trained at another image size (e.g. 224 px on the 336 px tower)")
    model.add_argument("--device", choices=["auto", "cuda", "cpu", "mps"], default="auto")
    model.add_argument("--dtype", choices=["auto", "bf16", "fp16", "fp32"], default="auto",
                       help="auto: bf16/fp16 on GPU, fp32 on CPU")
    quant = model.add_mutually_exclusive_group()
    quant.add_argument("--load-4bit", action="store_true", help="4-bit language model (bitsandbytes, CUDA)")
    quant.add_argument("--load-8bit", action="store_true", help="8-bit language model (bitsandbytes, CUDA)")
    video = shared.add_argument_group("video")
    video.add_argument("--frames", type=FRAMES.parse, default=8,
                       help=f"frames per clip, T, {_span(FRAMES)} (default: %(default)s)")
    video.add_argument("--clips", type=CLIPS.parse, default=1,
                       help=f"clips per video, C, {_span(CLIPS)}; each fills one <image> (default: %(default)s)")
    gen = shared.add_argument_group("generation")
    gen.add_argument("--max-new-tokens", type=MAX_NEW_TOKENS.parse, default=None,
                     help=f"answer length limit, {_span(MAX_NEW_TOKENS)} (default: 512; {DEMO_MAX_NEW_TOKENS} with --demo)")
    gen.add_argument("--temperature", type=TEMPERATURE.parse, default=0.0,
                     help=f"{_span(TEMPERATURE)}; 0 = greedy (default)")
    gen.add_argument("--top-p", type=TOP_P.parse, default=1.0, help=f"{_span(TOP_P)} (default: %(default)s)")
    gen.add_argument("--repetition-penalty", type=REPETITION_PENALTY.parse, default=1.0,
                     help=f"{_span(REPETITION_PENALTY)}; 1 = off (default)")
    shared.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    return shared


def _span(allowed) -> str:
    return f"{allowed.low:g}..{allowed.high:g}"


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _cache_mb(text: str) -> float:
    value = float(text)
    if not 0 <= value < float("inf"):  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a finite number, 0 or more, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    shared = model_options()
    parser = argparse.ArgumentParser(prog=PROG, description="Zero-shot video chat: LLaVA with a Mug-STAN video tower.")
    commands = parser.add_subparsers(dest="command", required=True)
    ask = commands.add_parser("ask", parents=[shared], help="answer one question about a video")
    ask.add_argument("video", help="video file")
    ask.add_argument("question")
    ask.add_argument("--json", action="store_true", help="print one JSON object (answer, settings, timings)")
    chat = commands.add_parser("chat", parents=[shared], help="multi-turn chat about a video (/reset, /exit)")
    chat.add_argument("video", help="video file")
    chat.add_argument("--feature-cache-mb", type=_cache_mb, default=1024.0,
                      help="memory for encoded videos that /video returns to, least recently used out; "
                           "0 turns the cache off (default: %(default)s)")
    from .evaluation.cli import add_eval_command

    add_eval_command(commands, shared)  # multiple-choice video QA: docs/evaluation.md
    # listed for --help only: main() hands `serve` and its arguments to mugstan_chat.server
    commands.add_parser("serve", add_help=False, help="OpenAI-compatible API server (mugstan-chat serve --help)")
    return parser


def load_model_from_options(args, **overrides):
    """The ChatModel that the shared options of :func:`model_options` describe (the CLI, the web app,
    the server and eval all load through here); ``overrides`` replace single settings."""
    from .loader import load_chat_model

    settings = dict(
        model=args.model, stan=args.stan, temporal=args.temporal, device=args.device, dtype=args.dtype,
        load_4bit=args.load_4bit, load_8bit=args.load_8bit, frames=args.frames, clips=args.clips,
        demo=args.demo, allow_resolution_mismatch=args.allow_resolution_mismatch)
    return load_chat_model(**{**settings, **overrides})


def _session(args, chat_model, prepare: bool, video: str | None = None):
    from .chat import ChatSession, GenerationSettings

    max_new = args.max_new_tokens or (DEMO_MAX_NEW_TOKENS if args.demo else GenerationSettings.max_new_tokens)
    generation = GenerationSettings(max_new_tokens=max_new, temperature=args.temperature, top_p=args.top_p,
                                    repetition_penalty=args.repetition_penalty)
    generation.generate_kwargs()  # validates before any work
    return ChatSession(chat_model, video or args.video, frames=args.frames, clips=args.clips, generation=generation,
                       prepare=prepare)


def _check_video(path: str, debug: bool = False) -> None:
    """Fails fast, before the model loads, on a missing or undecodable video.

    Native decoders (decord's bundled FFmpeg, dmlc logging) write straight to file
    descriptor 2 when a file is corrupt; that is silenced here (unless ``--debug``) so
    the user sees the one line naming the file and the cause.
    """
    from .video import probe_video

    with _native_stderr_silenced(enabled=not debug):
        probe_video(path)


@contextlib.contextmanager
def _native_stderr_silenced(enabled: bool = True):
    if not enabled:
        yield
        return
    sys.stderr.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no real stderr (embedded interpreter)
        yield
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _run_ask(args) -> int:
    _check_video(args.video, args.debug)
    chat_model = load_model_from_options(args)
    if chat_model.notice and not args.json:
        print(f"note: {chat_model.notice}", file=sys.stderr)
    session = _session(args, chat_model, prepare=False)  # decode/encode inside the turn: part of its timings
    pieces = []
    for piece in session.ask_stream(args.question):
        if args.json:
            pieces.append(piece)
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()
    stats = session.last_stats
    if args.json:
        settings = chat_model.settings
        result = {
            "answer": "".join(pieces).strip(),
            "model": settings.model,
            "temporal": session.temporal,
            "stan": settings.stan if session.temporal == "stan" else None,
            "frames": session.frames,
            "clips": session.clips,
            "video": {"width": session.video_info.width, "height": session.video_info.height,
                      "rotation": session.video_info.rotation, "duration": round(session.video_info.duration, 3)},
            "prompt_tokens": stats.prompt_tokens,
            "visual_tokens": stats.visual_tokens,
            "new_tokens": stats.new_tokens,
            "timings_ms": {
                "decode": round(stats.decode_ms, 2),
                "encode": round(stats.encode_ms, 2),
                "first_token": None if stats.first_token_ms is None else round(stats.first_token_ms, 2),
                "total": round(stats.total_ms, 2),
            },
            "max_new_tokens": stats.max_new_tokens,
            "clipped": stats.clipped,
            "device": settings.device,
            "dtype": settings.dtype,
            "notice": chat_model.notice,
        }
        print(json.dumps(result))
    else:
        sys.stdout.write("\n")
    return 0


def _run_chat(args) -> int:
    from .chat import ConversationTooLong
    from .feature_cache import FeatureCache
    from .video import VideoDecodeError

    _check_video(args.video, args.debug)
    chat_model = load_model_from_options(args)
    if chat_model.notice:
        print(f"note: {chat_model.notice}", file=sys.stderr)
    cache = FeatureCache(int(args.feature_cache_mb * 2**20))
    session = _open_chat(args, chat_model, cache, args.video)
    interactive = sys.stdin.isatty()
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        question = line.strip()
        if not question:
            continue
        if question in ("/exit", "/quit"):
            break
        if question == "/reset":
            session.reset()
            print("(conversation cleared)", file=sys.stderr)
            continue
        if question.startswith("/video ") or question == "/video":
            path = question[len("/video"):].strip()
            try:
                if not path:
                    raise ValueError("/video needs a file: /video PATH")
                _check_video(path, args.debug)
                session = _open_chat(args, chat_model, cache, path)
            except (VideoDecodeError, ValueError, OSError) as error:  # one line; the chat goes on
                print(f"{PROG}: error: {' '.join(str(error).split())}", file=sys.stderr)
            continue
        if question in ("/help", "/?") or (question.startswith("/") and " " not in question):
            known = question in ("/help", "/?")
            print(("" if known else f"unknown command {question}; ") + CHAT_COMMANDS, file=sys.stderr)
            continue
        sys.stdout.write("assistant> ")
        try:
            for piece in session.ask_stream(question):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except ConversationTooLong as error:
            sys.stdout.write("\n")
            print(f"{PROG}: {error} (type /reset)", file=sys.stderr)
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
    return 0


def _open_chat(args, chat_model, cache, path: str):
    """A new conversation about ``path``; its features come from ``cache`` when this video was seen."""
    session = _session(args, chat_model, prepare=False, video=path)
    cached = cache.session_features(session)
    info = session.video_info
    print(f"video: {path} ({info.width}x{info.height}, {info.duration:.1f} s; {session.clips} clip(s) x "
          f"{session.frames} frames, {session.visual_tokens} visual tokens, temporal: {session.temporal}"
          + ("; features from the cache" if cached else "") + "); /help lists the commands", file=sys.stderr)
    return session


def _expected_errors() -> tuple[type[BaseException], ...]:
    from .chat import ConversationTooLong
    from .checkpoint import CheckpointError
    from .loader import ModelLoadError
    from .video import VideoDecodeError

    return (VideoDecodeError, CheckpointError, ModelLoadError, ConversationTooLong, ValueError, OSError)


def _configure_logging(debug: bool) -> None:
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not debug:
        logging.getLogger("mugstan_chat").setLevel(logging.ERROR)  # notices are printed once, by the CLI
        try:
            from transformers.utils import logging as hf_logging

            hf_logging.set_verbosity_error()
            hf_logging.disable_progress_bar()
        except ImportError:
            pass


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 1 error, 2 usage; 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from .server.app import main as serve

        return serve(argv[1:])
    args = build_parser().parse_args(argv)
    _configure_logging(args.debug)
    try:
        if args.command == "ask":
            return _run_ask(args)
        if args.command == "eval":
            from .evaluation.cli import run_eval

            return run_eval(args)
        return _run_chat(args)
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one line for users; the traceback with --debug
        if args.debug:
            traceback.print_exc()
        known = isinstance(error, _expected_errors())
        message = " ".join(str(error).split()) or type(error).__name__
        prefix = "" if known else f"unexpected {type(error).__name__}: "
        print(f"{PROG}: error: {prefix}{message}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
