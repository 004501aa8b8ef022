"""Mug-STAN video-text post-pretraining (docs/design.md section 3): the command-line entry point.

One process (CPU or one GPU)::

    python training/post_pretrain.py --backbone openai/clip-vit-large-patch14 \\
        --train-data webvid/results_10M_train.csv --preset webvid --video-root webvid/videos \\
        --frames 12 --text-length 64 --batch-size 128 --precision bf16 --output-dir runs/mugstan-l14

Several GPUs (global batch = 8 x 128 = 1024, the paper's)::

    torchrun --nproc_per_node 8 training/post_pretrain.py ... (same arguments)

Recognition fine-tuning (Kinetics-400, Something-Something v2) is ``--task recognition --class-names FILE``
(training/recognition.py). See docs/training.md for every setting, resume and evaluation.
"""

from __future__ import annotations

import logging
import os

from training.params import parse_args
from training.train import TrainResult, run


def train(argv: list[str] | None = None) -> TrainResult:
    """Parses ``argv`` and trains; returns the model, losses and final state (for tests and the probe)."""
    return run(parse_args(argv))


def main(argv: list[str] | None = None) -> int:
    rank = int(os.environ.get("RANK", 0))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s")
    result = train(argv)
    if rank == 0 and result.final_dir is not None:
        print(f"final model: {result.final_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
