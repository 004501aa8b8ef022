"""``mugstan-chat``: the one command; it dispatches each subcommand to its front end.

Usage::

    mugstan-chat ask VIDEO "what happens?" --demo                  # mugstan_chat.entrypoints.terminal
    mugstan-chat chat VIDEO --demo                                 # mugstan_chat.entrypoints.terminal
    mugstan-chat eval QUESTIONS --video-root DIR --out DIR         # mugstan_chat.entrypoints.evaluation
    mugstan-chat serve --demo                                      # mugstan_chat.entrypoints.openai.cli (docs/serve.md)
    mugstan-chat export-llava DIR --demo                           # mugstan_chat.llava.export (for vLLM)
    mugstan-chat batch VIDEOS --prompt "..." --out rows.jsonl      # mugstan_chat.entrypoints.batch (docs/batch.md)
    mugstan-chat convert-official IN.pth OUT_DIR                   # mugstan_chat.entrypoints.convert
    mugstan-chat bench chat --demo                                 # mugstan_chat.benchmarks (bench --help)
    python -m mugstan_chat ...                                     # the same

Every front end takes the shared flags from :mod:`mugstan_chat.entrypoints`; none imports
another. Errors print one line to stderr and exit 1 (usage errors exit 2); ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import sys

from . import bench as bench_cli
from ..llava import export
from . import batch as batch_cli
from . import convert
from . import evaluation as evaluation_cli
from . import terminal
from . import ModelArgs, configure_logging, run_reporting_errors
from .openai import cli as server_cli

PROG = "mugstan-chat"
MODEL_COMMANDS = ("ask", "chat", "eval", "batch")  # the subcommands that take ModelArgs' flags


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Zero-shot video chat: LLaVA with a Mug-STAN video tower.")
    commands = parser.add_subparsers(dest="command", required=True)
    terminal.add_commands(commands)
    evaluation_cli.add_eval_command(commands)  # multiple-choice video QA: docs/evaluation.md
    export.add_export_command(commands)  # a LLaVA directory for vLLM: docs/serve.md
    batch_cli.add_batch_command(commands)  # many videos, one JSONL row each: docs/batch.md
    convert.add_convert_command(commands)  # the authors' released checkpoints: docs/training.md
    bench_cli.add_bench_command(commands)  # mugstan-chat bench NAME ARGS: a benchmark's own main(ARGS)
    # listed for --help only: main() hands `serve` and its arguments to the server's own parser
    commands.add_parser("serve", add_help=False, help="OpenAI-compatible API server (mugstan-chat serve --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 1 error, 2 usage; 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        return server_cli.main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command in MODEL_COMMANDS:
        try:  # the checks across flags (--select with --clips ...): usage errors, as in serve and app.py
            ModelArgs.from_cli_args(args)
        except ValueError as error:
            parser.error(str(error))
    configure_logging(args.debug)
    return run_reporting_errors(PROG, args.debug, args.run, args)


if __name__ == "__main__":
    raise SystemExit(main())
