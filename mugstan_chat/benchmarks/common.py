"""Shared helpers of the benchmarks (:mod:`mugstan_chat.benchmarks`): timing, peak memory, markdown tables, JSON.

Timings are medians of several runs after warm-up; on CUDA the device is
synchronised around every timed region. Peak memory is CUDA max-allocated on a
GPU, and on CPU the peak resident-set size sampled every few milliseconds during
the timed region, minus the size before it.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import torch

#: The folder holding the package: in a checkout, the repository (app.py, examples/, runs/).
REPO_ROOT = Path(__file__).resolve().parents[2]


def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def median_ms(fn, runs: int = 5, warmup: int = 1, device: str = "cpu") -> float:
    """Median wall time of ``fn()`` in milliseconds."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_memory(device: str = "cpu"):
    """Yields a dict whose ``"mb"`` is filled with the peak memory of the block on exit."""
    result = {"mb": None, "kind": "cuda_max_allocated" if torch.device(device).type == "cuda" else "rss_delta"}
    if result["kind"] == "cuda_max_allocated":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        yield result
        torch.cuda.synchronize()
        result["mb"] = torch.cuda.max_memory_allocated() / 2**20
        return
    base = _rss_bytes()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.002)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield result
    finally:
        stop.set()
        thread.join()
        peak[0] = max(peak[0], _rss_bytes())
        result["mb"] = (peak[0] - base) / 2**20


def machine_description(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores (torch {torch.__version__})"


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    def fmt(value):
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
        return str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(col, "")) for col in columns) + " |" for row in rows]
    return "\n".join(lines)


def write_json(path: str | os.PathLike | None, payload: dict) -> None:
    if path is None:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2))
    partial.replace(path)  # atomic: a reader never sees half a file
