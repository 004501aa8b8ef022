"""``mugstan-chat ask`` and ``mugstan-chat chat``: questions about a video in a terminal (docs/chat.md).

Usage::

    mugstan-chat ask VIDEO "what happens?" --model llava-hf/llava-1.5-7b-hf --stan PATH
    mugstan-chat ask VIDEO "what happens?" --temporal mean        # no branch: training-free baseline
    mugstan-chat ask VIDEO "what happens?" --demo --json          # offline toy model, one JSON object
    mugstan-chat chat VIDEO --demo                                 # multi-turn; /reset, /video, /exit

The model, video and generation flags come from :class:`~mugstan_chat.entrypoints.ModelArgs`
(the same as every other front end); :mod:`mugstan_chat.entrypoints.cli` dispatches here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys

from . import ModelArgs
from .values import megabytes_to_bytes, non_negative_float

PROG = "mugstan-chat"
CHAT_COMMANDS = ("commands: /reset clears the conversation (the video stays encoded), /video PATH starts a "
                 "conversation about another video (videos seen before come from the feature cache), "
                 "/exit (or /quit) quits, /help shows this")


def add_commands(commands) -> None:
    """Adds ``ask`` and ``chat`` (with the shared model flags) to a subparsers object."""
    ask = commands.add_parser("ask", help="answer one question about a video")
    ModelArgs.add_cli_args(ask)
    ask.add_argument("video", help="video file")
    ask.add_argument("question")
    ask.add_argument("--json", action="store_true",
                     help="print one JSON object (answer, settings, clip spans, selection, timings)")
    ask.add_argument("--verbose", action="store_true",
                     help="print the clips shown (times; with --select, the candidates chosen and what ranking cost)")
    ask.set_defaults(run=run_ask)
    chat = commands.add_parser("chat", help="multi-turn chat about a video (/reset, /video, /exit)")
    ModelArgs.add_cli_args(chat)
    chat.add_argument("video", help="video file")
    chat.add_argument("--verbose", action="store_true",
                      help="after each answer, print the clips it was based on (times, selection and its cost)")
    chat.add_argument("--feature-cache-mb", type=non_negative_float, default=1024.0,
                      help="memory for encoded videos that /video returns to, least recently used out; "
                           "0 turns the cache off (default: %(default)s)")
    chat.set_defaults(run=run_chat)


def _session(model_args: ModelArgs, chat_model, video: str, feature_cache=None):
    return model_args.open_session(chat_model, video, feature_cache=feature_cache)


def describe_clips(session) -> str:
    """One line: the clips an answer was based on, with their times, and what selecting them cost."""
    from ..timeline import format_time, precise_times

    spans = session.clip_spans
    if not spans:
        return "clips: none"
    precise = precise_times(session.video_info.duration)
    shown = ", ".join(f"{s.number} {format_time(s.start, precise)}-{format_time(s.end, precise)}"
                      + (f" (candidate {s.candidate + 1})" if s.candidate is not None else "") for s in spans)
    line = f"clips: {shown}"
    selection = session.selection
    if selection is not None:
        embedded = "candidates from the cache" if selection.cached else f"embedding {selection.embed_ms:.0f} ms"
        line += (f"; selected {len(spans)} of {selection.candidates} candidates by {selection.mode} "
                 f"(ranking {selection.rank_ms:.0f} ms, {embedded}; {selection.tokens_saved} visual tokens saved)")
        if selection.capped:
            asked = selection.capped
            line += (f"; the video holds {asked['distinct_clips']} distinct clip(s) of {session.frames} frames: "
                     f"--candidates {asked['candidates']} and --select {asked['select']} capped to it")
    if session.selection_notice:
        line += f"; {session.selection_notice}"
    return line


def check_video(path: str, debug: bool = False) -> None:
    """Fails fast, before the model loads, on a missing or undecodable video.

    Native decoders (decord's bundled FFmpeg, dmlc logging) write straight to file
    descriptor 2 when a file is corrupt; that is silenced here (unless ``--debug``) so
    the user sees the one line naming the file and the cause.
    """
    from ..video import probe_video

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


def run_ask(args: argparse.Namespace) -> int:
    model_args = ModelArgs.from_cli_args(args)
    model_args.generation()  # checked before the model loads
    check_video(args.video, args.debug)
    chat_model = model_args.load()
    if chat_model.notice and not args.json:
        print(f"note: {chat_model.notice}", file=sys.stderr)
    session = _session(model_args, chat_model, args.video)  # decode/encode inside the turn: part of its timings
    pieces = []
    for piece in session.ask_stream(args.question):
        if args.json:
            pieces.append(piece)
        else:
            sys.stdout.write(piece)
            sys.stdout.flush()
    if args.json:
        print(json.dumps(_ask_json(session, chat_model, "".join(pieces))))
    else:
        sys.stdout.write("\n")
        if args.verbose:
            print(describe_clips(session), file=sys.stderr)
        elif session.selection_notice:
            print(f"note: {session.selection_notice}", file=sys.stderr)
    return 0


def _ask_json(session, chat_model, answer: str) -> dict:
    stats, settings = session.last_stats, chat_model.settings
    return {
        "answer": answer.strip(),
        "model": settings.model,
        "temporal": session.temporal,
        "stan": settings.stan if session.temporal == "stan" else None,
        "frames": session.frames,
        "clips": session.clips,
        "clips_auto": session.auto_clips,
        "clip_spans": [span.to_dict() for span in session.clip_spans],
        "references": [ref.to_dict() for ref in session.references(answer.strip())],
        "selection": None if session.selection is None else session.selection.to_dict(),
        "selection_notice": session.selection_notice,
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


def run_chat(args: argparse.Namespace) -> int:
    from ..engine.feature_cache import FeatureCache
    from ..engine.turns import ConversationTooLong
    from ..video import VideoDecodeError

    model_args = ModelArgs.from_cli_args(args)
    model_args.generation()  # checked before the model loads
    check_video(args.video, args.debug)
    chat_model = model_args.load()
    if chat_model.notice:
        print(f"note: {chat_model.notice}", file=sys.stderr)
    cache = FeatureCache(megabytes_to_bytes(args.feature_cache_mb))
    session = _open_chat(model_args, chat_model, cache, args.video)
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
                check_video(path, args.debug)
                session = _open_chat(model_args, chat_model, cache, path)
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
        if args.verbose:
            print(describe_clips(session), file=sys.stderr)
    return 0


def _open_chat(model_args: ModelArgs, chat_model, cache, path: str):
    """A new conversation about ``path``; its features come from ``cache`` when this video was seen."""
    session = _session(model_args, chat_model, path, feature_cache=cache)
    cached = cache.session_features(session)
    info = session.video_info
    shown = (f"{session.clips} of {session.candidates} candidate clips chosen per question" if session.selects
             else f"{session.clips} clip(s)")
    if session.selection_notice:
        print(f"note: {session.selection_notice}", file=sys.stderr)
    print(f"video: {path} ({info.width}x{info.height}, {info.duration:.1f} s; {shown} x "
          f"{session.frames} frames, {session.clips * session.tokens_per_image} visual tokens, temporal: {session.temporal}"
          + ("; features from the cache" if cached else "") + "); /help lists the commands", file=sys.stderr)
    return session
