"""Time to first token of a repeated video in a new web-app session (shared feature cache) vs a follow-up's.

Each round, through the web app's own callbacks (:class:`mugstan_chat.entrypoints.web.ChatApp`, no server
and no browser), with a fresh app so its feature cache starts empty:

* visitor A loads the video (a miss: probe, hash, decode, encode), asks a question, then a
  follow-up (``followup_ttft_ms``: the conversation's second answer);
* visitor B, a new session, loads the same video (a hit: probe, hash, cache lookup;
  ``hit_load_ms``) and asks the same first question (``new_session_ttft_ms``).

The issue's target (issue 13): a repeated video in a new session, TTFT <= 1.1 x a follow-up's.
TTFT is the app's own figure (``TurnStats.first_token_ms``: question -> first token); the
ratio is also given with the new session's video load added (``hit_load_ms``), since a
visitor waits for that too. Warm-up round first, then medians of ``--runs``.

    mugstan-chat bench feature-cache --demo --threads 1 --out runs/bench/feature_cache_demo.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from mugstan_chat.llava.loader import load_chat_model
from mugstan_chat.engine.engine import Engine

from . import common

QUESTION = "what happens in the video ?"
FOLLOW_UP = "what happens after that ?"
COLUMNS = ["round", "miss_load_ms", "hit_load_ms", "first_ttft_ms", "followup_ttft_ms", "new_session_ttft_ms",
           "new_vs_followup", "new_with_load_vs_followup"]


def _import_app():
    """The web app's module (its callbacks are what this measures)."""
    from mugstan_chat.entrypoints import web

    return web


def _timed_load(app, video: str, frames: int, temporal: str):
    started = time.perf_counter()
    state, _, status = app.load_video(video, frames, 1, temporal, None)
    if state.chat is None:
        raise RuntimeError(f"the video was not loaded: {status}")
    return state, (time.perf_counter() - started) * 1000, "from the cache" in status


def _ttft(app, state, question: str, max_new_tokens: int) -> float:
    for _ in app.respond(question, state, max_new_tokens, 0.0, 1.0):
        pass
    stats = state.chat.last_stats
    if stats is None or stats.first_token_ms is None:
        raise RuntimeError(f"no answer: {state.messages[-1]['content']}")
    return stats.first_token_ms


def one_round(app_module, chat_model, settings, video: str, args) -> dict:
    app = app_module.ChatApp(Engine(chat_model), settings)  # empty cache
    first, miss_ms, first_hit = _timed_load(app, video, args.frames, args.temporal)
    first_ttft = _ttft(app, first, QUESTION, args.new_tokens)
    followup_ttft = _ttft(app, first, FOLLOW_UP, args.new_tokens)
    second, hit_ms, second_hit = _timed_load(app, video, args.frames, args.temporal)
    new_ttft = _ttft(app, second, QUESTION, args.new_tokens)
    if first_hit or not second_hit or not second.chat.last_stats.cached_features:
        raise RuntimeError("expected a miss for the first visitor and a hit for the second")
    return {"miss_load_ms": miss_ms, "hit_load_ms": hit_ms, "first_ttft_ms": first_ttft,
            "followup_ttft_ms": followup_ttft, "new_session_ttft_ms": new_ttft,
            "new_vs_followup": new_ttft / followup_ttft,
            "new_with_load_vs_followup": (hit_ms + new_ttft) / followup_ttft}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="mugstan-chat bench feature-cache", description=__doc__.split("\n")[0])
    parser.add_argument("--demo", action="store_true", help="tiny offline demo model (the only model offered "
                        "without --model)")
    parser.add_argument("--model", default=None, help="LLaVA hub id or directory (instead of --demo)")
    parser.add_argument("--stan", default=None, help="STAN branch for --model")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--video", default=str(common.REPO_ROOT / "examples" / "red_triangle_growing.mp4"))
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--temporal", choices=["stan", "mean"], default="stan")
    parser.add_argument("--new-tokens", type=int, default=8, help="answer length (only the first token is timed)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--out", default=None, help="JSON output path")
    args = parser.parse_args(argv)
    if not args.demo and not args.model:
        parser.error("pass --demo or --model")
    if args.runs < 1 or args.frames < 1 or args.new_tokens < 1:
        parser.error("--runs, --frames and --new-tokens must be positive")
    if not os.path.isfile(args.video):
        parser.error(f"--video: no such file: {args.video}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    app_module = _import_app()
    chat_model = load_chat_model(model=args.model or "demo", stan=args.stan, demo=args.demo, device=args.device,
                                 temporal=args.temporal, frames=args.frames)
    settings = app_module.AppSettings(frames=args.frames, max_new_tokens=args.new_tokens,
                                      examples_dir=None)
    one_round(app_module, chat_model, settings, args.video, args)  # warm-up
    rows = [{"round": i + 1, **one_round(app_module, chat_model, settings, args.video, args)}
            for i in range(args.runs)]
    median = {"round": "median", **{c: statistics.median(r[c] for r in rows) for c in COLUMNS[1:]}}
    machine = common.machine_description(str(chat_model.device))
    print(f"## Repeated video in a new session vs a follow-up ({chat_model.settings.model}, {machine}, "
          f"{torch.get_num_threads()} torch threads, {args.frames} frames, {args.temporal})\n")
    print(common.markdown_table(rows + [median], COLUMNS))
    met = median["new_vs_followup"] <= 1.1
    quartiles = statistics.quantiles([r["new_vs_followup"] for r in rows], n=4) if len(rows) > 1 else [None] * 3
    spread = "" if quartiles[0] is None else f"; rounds' quartiles {quartiles[0]:.3g} / {quartiles[2]:.3g}"
    print(f"\ntarget: new-session TTFT <= 1.1 x follow-up TTFT: {median['new_vs_followup']:.3g}{spread} -> "
          f"{'met' if met else 'NOT met'} (with the hit's video load: {median['new_with_load_vs_followup']:.3g})")
    common.write_json(args.out, {"machine": machine, "torch_threads": torch.get_num_threads(),
                                   "model": chat_model.settings.model, "args": vars(args), "rows": rows,
                                   "median": median, "ratio_quartiles": quartiles, "target_met": met,
                                   "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
