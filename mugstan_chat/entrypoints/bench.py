"""``mugstan-chat bench NAME [ARGS...]``: runs one benchmark of :mod:`mugstan_chat.benchmarks`.

Each benchmark is a module with its own argument parser and ``main(argv)``; ``bench`` imports only the
one named, by name when it runs (the front ends sit below the benchmarks, which may drive them), and hands
it every argument after the name, so ``mugstan-chat bench chat --help`` is the chat
benchmark's own help, and ``mugstan-chat bench chat ARGS`` is ``python -m mugstan_chat.benchmarks.chat
ARGS``. ``mugstan-chat bench --help`` lists them.
"""

from __future__ import annotations

import argparse
import importlib

PACKAGE = "mugstan_chat.benchmarks"
#: command name -> (module of mugstan_chat.benchmarks, what it measures)
BENCHMARKS = {
    "chat": ("chat", "video chat: TTFT, tokens/s and memory; stan vs mean vs frame concatenation"),
    "serve": ("serve", "serving throughput at 1/4/16 users: our engine vs the vLLM route"),
    "batch": ("batch", "mugstan-chat batch videos/s at 1/4/16 in flight: our engine vs the vLLM route"),
    "selection": ("selection", "what question-aware clip selection costs, for M candidates"),
    "video": ("video", "video decoding: decord vs PyAV on a 720p H.264 file"),
    "precision": ("precision", "one model at fp32, bf16, 8-bit and 4-bit: memory, TTFT, tokens/s"),
    "feature-cache": ("feature_cache", "a repeated video in a new web-app session vs a follow-up (TTFT)"),
    "app-load": ("app_load", "the web app under N concurrent clients: TTFT percentiles, memory"),
    "threads": ("threads", "whether torch.set_num_threads in one thread changes another's OpenMP team"),
}


def _listing() -> str:
    width = max(map(len, BENCHMARKS))
    lines = [f"  {name:<{width}}  {about}" for name, (_, about) in BENCHMARKS.items()]
    return ("benchmarks:\n" + "\n".join(lines) + "\n\nmugstan-chat bench NAME --help: that benchmark's arguments."
            "\nThe trainer's own (training step, data loading): python -m mugstan_train.benchmarks.train|data."
            "\nMeasured figures and their commands: docs/performance.md.")


def add_bench_command(commands) -> None:
    """Adds ``bench`` to the ``mugstan-chat`` subcommands."""
    bench = commands.add_parser("bench", help="run a benchmark (mugstan-chat bench --help lists them)",
                                description="Runs one benchmark with its own arguments.", epilog=_listing(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    bench.add_argument("--debug", action="store_true", help="show the traceback of an error")
    bench.add_argument("name", choices=list(BENCHMARKS), metavar="NAME", help="the benchmark (listed below)")
    bench.add_argument("args", nargs=argparse.REMAINDER, metavar="ARGS", help="its own arguments (mugstan-chat bench NAME --help)")
    bench.set_defaults(run=run_bench)


def run_bench(args: argparse.Namespace) -> int:
    """Imports the named benchmark and runs its ``main`` on the remaining arguments."""
    module = importlib.import_module(f"{PACKAGE}.{BENCHMARKS[args.name][0]}")
    return module.main(list(args.args))
