"""Precision side by side on one model: fp32, bf16, 8-bit and 4-bit (bitsandbytes) language models.

For each precision it loads the same LLaVA directory through the one loader (``load_chat_model``,
the path ``--dtype`` / ``--load-8bit`` / ``--load-4bit`` take) and reports the weights' memory
(``get_memory_footprint``), the first turn's time to first token without video decoding (tower +
projector + prefill: the part ``--dtype`` changes) and decode tokens/s over a fixed answer length.
The quantised rows keep the tower and projector in the compute dtype (fp32 here, bf16 with
``--compute bf16``); only the language model's linear layers are quantised.

    mugstan-chat export-llava /tmp/small-llava --size small
    mugstan-chat bench precision --model /tmp/small-llava --out runs/bench/precision_small.json
    mugstan-chat bench precision --demo --runs 1                               # seconds, a smoke run
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
from pathlib import Path

from mugstan_chat.engine.conversation import ChatSession
from mugstan_chat.llava.loader import load_chat_model
from mugstan_chat.engine.engine import Engine

from . import common
from .chat import QUESTION, FixedLength, benchmark_video  # the chat benchmark's clip and answer length

CONFIGS = {  # name -> loader settings
    "fp32": dict(dtype="fp32"), "bf16": dict(dtype="bf16"),
    "8-bit": dict(dtype="fp32", load_8bit=True), "4-bit": dict(dtype="fp32", load_4bit=True),
}


def measure(chat_model, video: Path, frames: int, new_tokens: int) -> dict:
    session = ChatSession(Engine(chat_model), video, frames=frames, prepare=False,
                          generation=FixedLength(max_new_tokens=new_tokens))
    for _ in session.ask_stream(QUESTION):
        pass
    stats = session.last_stats
    decode_s = (stats.total_ms - stats.first_token_ms) / 1000
    return {"ttft_ms": stats.first_token_ms - stats.decode_ms, "encode_ms": stats.encode_ms,
            "decode_tok_s": (stats.new_tokens - 1) / decode_s, "prompt_tokens": stats.prompt_tokens}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mugstan-chat bench precision", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="LLaVA directory (e.g. from mugstan-chat export-llava --size small)")
    which.add_argument("--demo", action="store_true")
    parser.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS))
    parser.add_argument("--compute", choices=["fp32", "bf16"], default="fp32", help="dtype of the quantised rows")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=2, help="timed runs after one warm-up (medians)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    video = benchmark_video(str(common.REPO_ROOT / "runs" / "media"), 4, 224)
    rows = []
    for name in args.configs:
        settings = dict(CONFIGS[name])
        if "load_8bit" in settings or "load_4bit" in settings:
            settings["dtype"] = args.compute
        source = dict(demo=True) if args.demo else dict(model=args.model)
        chat_model = load_chat_model(**source, device="cpu", frames=args.frames, temporal="mean", **settings)
        runs = [measure(chat_model, video, args.frames, args.new_tokens) for _ in range(args.runs + 1)][1:]
        row = {"precision": name, "weights_mb": chat_model.model.get_memory_footprint() / 2**20}
        language = chat_model.model.model.language_model
        row["language_model_mb"] = sum(p.numel() * p.element_size() for p in language.parameters()) / 2**20
        for key in runs[0]:
            row[key] = statistics.median(r[key] for r in runs)
        rows.append(row)
        print(common.markdown_table([row], list(row)), file=sys.stderr, flush=True)
        del chat_model
        gc.collect()
    print(common.markdown_table(rows, list(rows[0])))
    common.write_json(args.out, {"machine": common.machine_description("cpu"), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
