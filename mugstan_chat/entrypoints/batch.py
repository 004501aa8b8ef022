"""``mugstan-chat batch``: one question (or each video's own) over a folder, a list or tar shards of videos.

Usage::

    mugstan-chat batch videos/ --prompt "Describe the video." --out captions.jsonl --demo
    mugstan-chat batch list.csv --questions questions.jsonl --out answers.jsonl --stan BRANCH
    mugstan-chat batch "shards/{00000..00009}.tar" --prompt "..." --out part.jsonl --shard 0/4
    mugstan-chat batch videos/ --prompt "..." --out rows.jsonl --captions-out captions.jsonl   # for the trainer

Everything given (input, questions, output, shard) is checked before the model loads. Rerunning
the same command continues an interrupted run (docs/batch.md); the summary goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import ModelArgs
from .progress import add_progress_flag, progress_bar
from .values import positive_int
from ..batch.inputs import InputError, parse_shard, read_items, shard_items, this_shard
from ..batch.results import ResultsError, ResultsFile, write_captions

PROG = "mugstan-chat batch"


def add_batch_command(commands) -> argparse.ArgumentParser:
    """Adds ``batch`` (with the shared model/video flags) to ``commands``."""
    parser = commands.add_parser(
        "batch", help="answer one question about every video of a folder, list or shards (JSONL rows)",
        description="Caption or question many videos: one JSONL row per video (answer, clip spans, timings, or "
                    "an error), resumable, split across machines with --shard.")
    ModelArgs.add_cli_args(parser)
    parser.add_argument("input", metavar="INPUT",
                        help="a folder of videos, a .csv/.jsonl list (column video; optional id, question), or "
                             "tar shards (shards/{00000..00009}.tar)")
    asked = parser.add_mutually_exclusive_group(required=True)
    asked.add_argument("--prompt", metavar="TEXT", help="the question for every video (e.g. 'Describe the video.')")
    asked.add_argument("--questions", metavar="FILE",
                       help="a .jsonl of {\"id\": ..., \"question\": ...} (ids as the input names them), or use the "
                            "list's own question column with --prompt as the default")
    parser.add_argument("--out", required=True, metavar="FILE", help="results, one JSON row per video (.jsonl)")
    parser.add_argument("--overwrite", action="store_true", help="start over instead of continuing --out")
    parser.add_argument("--shard", type=parse_shard, default=None, metavar="I/N",
                        help="take every N-th video from the I-th (default: torchrun's RANK/WORLD_SIZE or SLURM's "
                             "SLURM_PROCID/SLURM_NTASKS when set, else all)")
    parser.add_argument("--workers", type=positive_int, default=2, metavar="N",
                        help="threads reading and decoding videos ahead of the model (default: %(default)s)")
    parser.add_argument("--in-flight", type=positive_int, default=1, metavar="N",
                        help="videos answered at once (more with --llm-url: the vLLM server batches them; "
                             "default: %(default)s)")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N",
                        help="answer N videos together: one tower call for their clips and, on our engine, one padded "
                             "generate (uniform clips only; greedy answers can differ from ask's at near-ties, "
                             "docs/batch.md; default: %(default)s, each video alone)")
    parser.add_argument("--captions-out", metavar="FILE", default=None,
                        help="also write the answered rows as the trainer's annotations ({video, caption} .jsonl; "
                             "folder and list inputs)")
    add_progress_flag(parser)
    parser.set_defaults(run=run_batch)
    return parser


def _questions(path: str) -> dict[str, str]:
    try:
        rows = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InputError(f"--questions {path}: cannot read ({' '.join(str(error).split())})") from None
    out = {}
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict) or not row.get("id") or not row.get("question"):
            raise InputError(f"--questions {path} row {number}: needs \"id\" and \"question\"")
        out[str(row["id"])] = str(row["question"])
    return out


def plan(args: argparse.Namespace, model_args: ModelArgs):
    """(items this shard takes, the opened-to-be results file): every check before the model loads."""
    items = read_items(args.input)
    if args.questions:
        asked = _questions(args.questions)
        unknown = sorted(set(asked) - {item.id for item in items})
        if unknown:
            raise InputError(f"--questions {args.questions}: ids not in the input: {', '.join(unknown[:3])}"
                             + (" ..." if len(unknown) > 3 else ""))
        items = [type(item)(item.id, item.video, asked.get(item.id, item.question), item.shard, item.member)
                 for item in items]
        missing = [item.id for item in items if not item.question]
        if missing:
            raise InputError(f"--questions {args.questions}: no question for {missing[0]}"
                             + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    shard = this_shard(args.shard)
    mine = shard_items(items, shard)
    settings = {"input": str(Path(args.input).resolve()) if Path(args.input).exists() else args.input,
                "prompt": args.prompt, "questions": args.questions, "shard": list(shard),
                "model": "demo" if model_args.demo else model_args.model, "stan": model_args.stan,
                "session": {k: v for k, v in model_args.session_kwargs().items()},
                "generation": {k: getattr(model_args.generation(), k) for k in
                               ("max_new_tokens", "temperature", "top_p", "repetition_penalty")}}
    results = ResultsFile(args.out, settings, overwrite=args.overwrite)
    results.check()
    if args.captions_out and Path(args.captions_out).is_dir():
        raise InputError(f"--captions-out {args.captions_out} is a folder; name a .jsonl file")
    return mine, results, shard


def run_batch(args: argparse.Namespace) -> int:
    """Runs ``mugstan-chat batch``; returns the exit status (0 even when some videos failed: their rows say why)."""
    from ..batch.run import BatchRunner

    model_args = ModelArgs.from_cli_args(args)
    try:
        items, results, shard = plan(args, model_args)
    except (InputError, ResultsError) as error:  # usage errors: one line, exit 2, before the model loads
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    engine = model_args.load_engine()
    if engine.notice:
        print(f"note: {engine.notice}", file=sys.stderr)
    done = results.open()
    print(f"{PROG}: {len(items)} videos in shard {shard[0]}/{shard[1]}, {len(done & {i.id for i in items})} already "
          f"in {args.out}", file=sys.stderr)
    bar = progress_bar(not args.no_progress, total=len(items), initial=len(done & {i.id for i in items}),
                       unit="video", desc="batch")
    try:
        runner = BatchRunner(engine, model_args.session_options(), model_args.generation(), args.prompt, results,
                             workers=args.workers, in_flight=args.in_flight, progress=bar,
                             batch_size=args.batch_size)
        summary = runner.run(items, done)
    finally:
        bar.close()
        results.close()
    print(f"{PROG}: {summary.line()}", file=sys.stderr)
    if args.captions_out:
        count = write_captions(results.rows, args.captions_out)
        print(f"{PROG}: {count} captions in {args.captions_out} (mugstan-train --train-data {args.captions_out})",
              file=sys.stderr)
    return 0
