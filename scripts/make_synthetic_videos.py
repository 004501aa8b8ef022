"""Write synthetic time-order videos (forward/reverse pairs) plus annotations.csv.

Usage: python scripts/make_synthetic_videos.py OUT_DIR --num 8 --seed 0
"""

from __future__ import annotations

import argparse
import logging

from mugstan_chat.synthetic import make_synthetic_videos


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and generate the videos; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", help="output folder (created)")
    parser.add_argument("--num", type=int, default=8, help="number of videos (even: num/2 pairs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels (even)")
    parser.add_argument("--frames", type=int, default=24, help="frames per video (16-32 recommended)")
    args = parser.parse_args(argv)
    if args.num <= 0 or args.num % 2:
        parser.error("--num must be a positive even number")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    videos = make_synthetic_videos(args.out_dir, args.num, args.seed, size=args.size, frames=args.frames)
    print(f"wrote {len(videos)} videos and annotations.csv to {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
