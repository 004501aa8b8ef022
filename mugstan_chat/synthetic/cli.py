"""The one command line for synthetic data: ``python -m mugstan_chat.synthetic {videos,questions,reversal} OUT_DIR``.

* ``videos``: the plain set (:mod:`.plain`), ``pair*_a/b.mp4`` and ``annotations.csv``;
* ``questions``: the plain set plus its multiple-choice ``questions.jsonl`` (:mod:`.questions`),
  for ``mugstan-chat eval``;
* ``reversal``: the eleven motion families of the temporal probe (:mod:`.families`).

Same arguments, same files, byte for byte. A progress bar shows on stderr when it is a terminal
(``--no-progress`` turns it off); a set that cannot be drawn is one line and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..entrypoints.progress import add_progress_flag
from .families import FAMILIES, make_time_reversal_dataset
from .plain import make_synthetic_videos
from .questions import make_synthetic_mc


def _integer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None


def _positive(text: str) -> int:
    value = _integer(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _positive_even(text: str) -> int:
    value = _integer(text)
    if value <= 0 or value % 2:
        raise argparse.ArgumentTypeError(f"must be a positive even number, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mugstan_chat.synthetic",
        description="Synthetic time-order videos (every clip beside its time reversal, with the opposite caption).")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, summary in (("videos", "plain forward/reverse pairs and annotations.csv"),
                          ("questions", "plain pairs, annotations.csv and questions.jsonl (multiple choice)")):
        sub = _subcommand(commands, name, summary)
        sub.add_argument("--num", type=_positive_even, default=8,
                         help="number of videos, even: num/2 pairs (default: %(default)s)")
        _common(sub)
    sub = _subcommand(commands, "reversal", "pairs of the eleven motion families (textured, noisy) and annotations.csv")
    sub.add_argument("--pairs-per-family", type=_positive, default=2,
                     help="pairs of every family (default: %(default)s)")
    sub.add_argument("--families", nargs="+", choices=FAMILIES, default=list(FAMILIES), metavar="FAMILY",
                     help=f"some of: {' '.join(FAMILIES)} (default: all)")
    _common(sub)
    return parser


def _subcommand(commands, name: str, summary: str) -> argparse.ArgumentParser:
    sub = commands.add_parser(name, help=summary, description=summary)
    sub.add_argument("out_dir", help="output folder (created)")
    return sub


def _common(sub: argparse.ArgumentParser) -> None:
    sub.add_argument("--seed", type=_integer, default=0, help="same seed, same files (default: %(default)s)")
    sub.add_argument("--size", type=_positive_even, default=64,
                     help="frame side in pixels, even for H.264 (default: %(default)s)")
    sub.add_argument("--frames", type=_positive, default=24, help="frames per video (default: %(default)s)")
    add_progress_flag(sub)


def main(argv: list[str] | None = None) -> int:
    """Parses ``argv`` and writes the chosen set; returns the exit status (argparse exits 2 on bad arguments)."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    shape = {"size": args.size, "frames": args.frames, "progress": not args.no_progress}
    try:
        if args.command == "videos":
            videos = make_synthetic_videos(args.out_dir, args.num, args.seed, **shape)
            print(f"wrote {len(videos)} videos and annotations.csv to {args.out_dir}")
        elif args.command == "questions":
            target = make_synthetic_mc(args.out_dir, args.num, args.seed, **shape)
            print(f"wrote {args.num} videos, annotations.csv and {target}")
        else:
            target = make_time_reversal_dataset(args.out_dir, args.pairs_per_family, args.seed,
                                                families=args.families, **shape)
            print(f"wrote {2 * args.pairs_per_family * len(args.families)} videos and {target}")
    except (ValueError, OSError) as error:  # a set that cannot be drawn, an output folder that cannot be written
        print(f"python -m mugstan_chat.synthetic: error: {error}", file=sys.stderr)
        return 1
    return 0
