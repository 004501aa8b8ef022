"""Run logging on rank 0: a tqdm progress bar, metrics as JSON lines, and optional TensorBoard."""

from __future__ import annotations

import json
import time
from pathlib import Path


class RunLogger:
    """Writes ``metrics.jsonl`` (one object per logged step or evaluation) and drives the progress bar.

    Every method is a no-op on ranks other than 0.
    """

    def __init__(self, output_dir: str | Path, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool = False):
        self.enabled = enabled
        self.bar = self.writer = self.handle = None
        if not enabled:
            return
        from tqdm import tqdm

        output_dir = Path(output_dir)
        self.handle = open(output_dir / "metrics.jsonl", "a", encoding="utf-8")
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # imported only when asked for

            self.writer = SummaryWriter(str(output_dir / "tensorboard"))

    def step(self, step: int, record: dict, show: bool) -> None:
        """Advances the bar; writes ``record`` when ``show`` (every log interval)."""
        if not self.enabled:
            return
        self.bar.update(1)
        if not show:
            return
        self.bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                             clips_s=f"{record['clips_per_s']:.1f}", refresh=False)
        self.write({"type": "train", "step": step, **record})

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.handle.write(json.dumps({"time": time.time(), **record}) + "\n")
        self.handle.flush()
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{record.get('type', 'train')}/{key}", value, record.get("step", 0))

    def close(self) -> None:
        for thing in (self.bar, self.writer, self.handle):
            if thing is not None:
                thing.close()
