"""Mug-STAN video-text post-pretraining (docs/design.md section 3): the command-line entry point.

``mugstan-train ARGS`` once installed; ``python training/post_pretrain.py ARGS`` from a checkout (a
shim that runs this module's :func:`main`). One process (CPU or one GPU)::

    python training/post_pretrain.py --backbone openai/clip-vit-large-patch14 \\
        --train-data webvid/results_10M_train.csv --preset webvid --video-root webvid/videos \\
        --frames 12 --text-length 64 --batch-size 128 --precision bf16 --output-dir runs/mugstan-l14

Several GPUs (global batch = 8 x 128 = 1024, the paper's)::

    torchrun --nproc_per_node 8 training/post_pretrain.py ... (same arguments)

Recognition fine-tuning (Kinetics-400, Something-Something v2) is ``--task recognition --class-names FILE``
(mugstan_train/recognition.py). See docs/training.md for every setting, resume and evaluation.
"""

from __future__ import annotations

import argparse
import logging
import os

from mugstan_chat.entrypoints.reporting import run_reporting_errors

from mugstan_train.checkpoints import TrainingCheckpointError
from mugstan_train.data import DataError
from mugstan_train.params import parse_args
from mugstan_train.train import TrainingDiverged, TrainResult, run

PROG = "mugstan-train"
#: The trainer's own errors whose message is for users (printed as one line, exit 1; --debug: the traceback).
EXPECTED_ERRORS = (DataError, TrainingCheckpointError, TrainingDiverged)


def train(argv: list[str] | None = None) -> TrainResult:
    """Parses ``argv`` and trains; returns the model, losses and final state (for tests and the probe)."""
    return run(parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    """Trains; bad arguments exit 2 (before any work), errors print one line and exit 1, Ctrl-C 130."""
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    prog = PROG if "RANK" not in os.environ else f"{PROG} [rank {rank}]"
    return run_reporting_errors(prog, args.debug, _train_and_report, args, expected=EXPECTED_ERRORS)


def _train_and_report(args: argparse.Namespace) -> int:
    result = run(args)
    if int(os.environ.get("RANK", 0)) == 0 and result.final_dir is not None:
        print(f"final model: {result.final_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
