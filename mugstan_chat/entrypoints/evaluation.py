"""``mugstan-chat eval``: multiple-choice video QA, the temporal modes side by side.

Usage::

    mugstan-chat eval mvbench/json --video-root mvbench/video --stan BRANCH --out runs/eval/mvbench
    mugstan-chat eval videomme/test-00000-of-00001.parquet --video-root videomme --modes stan mean --out runs/eval/videomme
    mugstan-chat eval questions.jsonl --video-root DIR --demo --answer-format text --out runs/eval/demo

Everything given on the command line (question files, videos, output folder, modes against the
branch) is checked before the model loads. The markdown summary goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import ModelArgs
from .progress import add_progress_flag
from .values import positive_int
from ..evaluation.modes import MODES, SELECT_SUFFIX
from ..evaluation.prompt import ANSWER_FORMATS, SCORINGS

EVAL_MAX_NEW_TOKENS = 16  # generate scoring: room for "B" or "(B) the option text"


def add_eval_command(commands) -> argparse.ArgumentParser:
    """Adds the ``eval`` subcommand (with the shared model/video options) to ``commands``."""
    parser = commands.add_parser(
        "eval", help="multiple-choice video QA accuracy, stan / mean / concat side by side",
        description="Multiple-choice video QA (MVBench, Video-MME, NExT-QA, EgoSchema, Perception Test, plain "
                    "JSON) with the temporal modes compared on the same questions and frames. --temporal is "
                    "ignored: --modes says what runs.")
    ModelArgs.add_cli_args(parser)
    parser.add_argument("questions", nargs="+", metavar="QUESTIONS",
                        help="question files (.json, .jsonl, .csv, .parquet) or folders of them; layout detected from the "
                             "fields")
    parser.add_argument("--video-root", required=True, metavar="DIR", help="folder the videos are found under")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES),
                        help="stan: STAN tower (needs --stan or --demo); mean: temporal mean; concat: every frame "
                             "as its own image (default: all three)")
    parser.add_argument("--scoring", choices=list(SCORINGS), default="likelihood",
                        help="likelihood: log-probability of each option (default); generate: greedy answer, "
                             "option letter parsed")
    parser.add_argument("--answer-format", choices=list(ANSWER_FORMATS), default="letter",
                        help="letter: score/ask for the option letter (default); text: the option text, "
                             "length-normalised (use it with the demo model, whose vocabulary has no letters)")
    parser.add_argument("--out", required=True, metavar="DIR", help="output folder: predictions.jsonl, summary.json")
    parser.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished questions")
    parser.add_argument("--limit", type=positive_int, default=None, metavar="N", help="only the first N questions")
    parser.add_argument("--bootstrap", type=positive_int, default=1000, help="bootstrap resamples (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    add_progress_flag(parser)
    parser.set_defaults(run=run_eval)
    return parser


def run_eval(args) -> int:
    """Runs ``mugstan-chat eval`` from parsed arguments; returns the exit status."""
    from ..evaluation.readers import read_questions, resolve_videos
    from ..evaluation.runner import EvalRun, EvalSettings, prepare_output
    from ..evaluation.summary import markdown_tables

    # ---- everything the user gave, checked before the model loads
    model_args = ModelArgs.from_cli_args(args)
    if "stan" in args.modes and args.stan is None and not args.demo:
        raise ValueError("mode 'stan' needs a STAN branch (--stan PATH); without one pass --modes mean concat")
    if args.temperature != 0 or args.top_p != 1.0 or args.repetition_penalty != 1.0:
        raise ValueError("eval decodes greedily: --temperature, --top-p and --repetition-penalty do not apply")
    questions = read_questions(args.questions)
    if args.limit:
        questions = questions[: args.limit]
    videos = resolve_videos(questions, args.video_root)
    if args.clips == "auto":
        raise ValueError("eval compares modes on the same clips: give --clips C (or --select K), not auto")
    modes = list(dict.fromkeys(args.modes))
    if args.select:  # uniform clips and selected clips side by side, K of each
        modes += [f"{m}{SELECT_SUFFIX}" for m in modes if m != "concat"]
    settings = EvalSettings(
        modes=modes, frames=args.frames, clips=args.select or args.clips, scoring=args.scoring,
        select=args.select, candidates=model_args.candidate_count, selection=model_args.selection,
        shortlist=model_args.shortlist,
        answer_format=args.answer_format, max_new_tokens=args.max_new_tokens or EVAL_MAX_NEW_TOKENS,
        bootstrap=args.bootstrap, seed=args.seed, model="demo" if args.demo else args.model, stan=args.stan)
    settings.validate()
    done = prepare_output(args.out, settings, args.resume)
    print(f"{len(questions)} questions on {len(set(videos.values()))} videos; modes: {', '.join(settings.modes)}; "
          f"scoring: {settings.scoring} ({settings.answer_format}); {len(done)} results already in {args.out}",
          file=sys.stderr)

    chat_model = model_args.load(temporal="stan" if "stan" in args.modes else "mean")
    if chat_model.notice:
        print(f"note: {chat_model.notice}", file=sys.stderr)
    run = EvalRun(chat_model, questions, videos, settings, args.out, done=done, progress=not args.no_progress)
    summary = run.run()
    print(markdown_tables(summary))
    print(f"\nper-question results: {args.out}/predictions.jsonl; summary: {args.out}/summary.json", file=sys.stderr)
    if args.debug:
        print(json.dumps({"encoded_videos": run.encodes}), file=sys.stderr)
    return 0
