"""The trainer's smallest real run, shared by the training tests: tiny CLIP, 16 synthetic videos, 4 steps an epoch."""

from __future__ import annotations

from pathlib import Path


def tiny_training_args(videos: Path, out: Path, *extra: str) -> list[str]:
    """``mugstan-train`` arguments: 16 videos / batch 4 = 4 steps per epoch, drop-path on (RNG restore)."""
    return ["--backbone", "tiny", "--train-data", str(videos / "annotations.csv"), "--video-root", str(videos),
            "--frames", "4", "--batch-size", "4", "--workers", "0", "--output-dir", str(out),
            "--lr-backbone", "1e-3", "--lr-stan", "1e-3", "--warmup-steps", "1", "--log-interval", "1",
            "--stan-layers", "2", *extra]
