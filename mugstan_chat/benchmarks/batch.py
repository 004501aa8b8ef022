"""Batch throughput: ``mugstan-chat batch`` videos/s at 1, 4 and 16 videos in flight, our engine vs the vLLM route.

    mugstan-chat bench batch --demo --vllm-venv /work/vllm-venv --out runs/bench/batch_demo.json
    mugstan-chat bench batch --size small --videos 8 --routes ours --out runs/bench/batch_small.json
    mugstan-chat bench batch --size small --routes ours --in-flight 1 --batch-size 1 4 8   # batched tower + generate

Each cell is one ``mugstan-chat batch`` process over its own N synthetic videos, seen by no other cell
(cold: a fresh process, so no video's features are cached on our side; on the vLLM route one vLLM
server serves every cell, and since no cell repeats another's videos its prefix cache can only reuse
the few template tokens before the first image). videos/s is the
batch's own count (finished rows over the loop's wall time: model loading excluded), from its
summary line. ``--batch-size B`` cells run ``batch --batch-size B`` (our engine: B videos' clips in one
tower call and one padded ``generate``; the vLLM route: one tower call, then B requests); their
``encode_ms`` column is the mean per-video share of the tower call as the rows report it. Both routes
load the same exported directory (``mugstan-chat export-llava``). Our
engine's torch threads are OMP_NUM_THREADS (``--our-threads``, default torch's choice: every core);
vLLM's CPU worker binds its own (printed in its log); the load average is recorded with the table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from . import common, serve  # serve: its vLLM launcher and flags


ROOT = common.REPO_ROOT
RATE = re.compile(r"([0-9.]+) videos/s")


def make_videos(folder: Path, count: int, cells: int) -> list[Path]:
    """``cells`` folders of ``count`` distinct videos each (one synthetic run: every video distinct)."""
    from mugstan_chat.synthetic import make_synthetic_videos

    made = make_synthetic_videos(folder, num=2 * ((count * cells + 1) // 2), seed=0, size=64, frames=16)
    folders = []
    for cell in range(cells):
        target = folder / f"cell{cell}"
        target.mkdir()
        for path, _ in made[cell * count:(cell + 1) * count]:
            path.rename(target / path.name)
        folders.append(target)
    return folders


def run_cell(route: str, in_flight: int, batch_size: int, args, model_dir: Path, videos: Path, work: Path,
             llm_url: str | None) -> dict:
    out = work / f"{route}-{in_flight}-{batch_size}.jsonl"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if args.our_threads:
        env["OMP_NUM_THREADS"] = str(args.our_threads)
    command = [sys.executable, "-m", "mugstan_chat", "batch", str(videos), "--prompt", "Describe the video.",
               "--out", str(out), "--model", str(model_dir), "--device", "cpu", "--dtype", args.dtype,
               "--frames", str(args.frames), "--max-new-tokens", str(args.new_tokens), "--in-flight", str(in_flight),
               "--batch-size", str(batch_size), "--workers", str(args.workers), "--no-progress", "--overwrite"]
    if (model_dir / "stan").exists():
        command += ["--stan", str(model_dir / "stan")]
    if llm_url:
        command += ["--llm-url", llm_url + "/v1"]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{route} x{in_flight}: exit {done.returncode}\n{done.stderr[-3000:]}")
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    tokens = sum(r.get("new_tokens") or 0 for r in rows)
    rate = float(RATE.findall(done.stderr)[-1])
    encode = [r["timings_ms"]["encode"] for r in rows if r.get("timings_ms")]
    return {"route": route, "in_flight": in_flight, "batch_size": batch_size, "videos": len(rows),
            "failed": sum(r["error"] is not None for r in rows), "videos_s": rate, "new_tokens": tokens,
            "encode_ms": round(sum(encode) / len(encode), 1) if encode else None,
            "load_average_1m": round(os.getloadavg()[0], 2)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mugstan-chat bench batch", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--size", choices=["small", "7b"], default=None)
    which.add_argument("--demo", action="store_true", help="the exported demo model")
    parser.add_argument("--routes", nargs="+", choices=["ours", "vllm"], default=["ours", "vllm"])
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--batch-size", type=int, nargs="+", default=[1],
                        help="batch --batch-size values (each with every --in-flight value)")
    parser.add_argument("--videos", type=int, default=32, help="distinct synthetic videos per cell")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="batch's decoding threads")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--our-threads", type=int, default=None, help="OMP_NUM_THREADS of the batch process")
    serve.add_vllm_server_args(parser)  # the same vLLM flags as bench serve
    parser.add_argument("--export-dir", default=None, help="reuse this export (default: a temporary one)")
    parser.add_argument("--out", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "vllm" in args.routes and not args.vllm_venv:
        parser.error("--vllm-venv (or $MUGSTAN_VLLM_VENV) is needed for the vLLM route")
    # what serve.start_vllm sizes --max-num-seqs by
    args.concurrency = [n * b for n in args.in_flight for b in args.batch_size]
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as scratch:
        work = Path(scratch)
        model_dir = Path(args.export_dir) if args.export_dir else work / "llava"
        if not (model_dir / "config.json").exists():
            which_model = ["--demo"] if args.demo else ["--size", args.size or "small"]
            subprocess.run([sys.executable, "-m", "mugstan_chat", "export-llava", str(model_dir), *which_model],
                           check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        cells = [(route, n, b) for route in args.routes for n in args.in_flight for b in args.batch_size]
        folders = make_videos(work / "videos", args.videos, len(cells))
        vllm = base = None
        try:
            if "vllm" in args.routes:
                vllm, base = serve.start_vllm(args, model_dir, work / "vllm.log")
            for (route, in_flight, batch_size), videos in zip(cells, folders):
                rows.append(run_cell(route, in_flight, batch_size, args, model_dir, videos, work,
                                     base if route == "vllm" else None))
                print(common.markdown_table(rows[-1:], list(rows[-1])), flush=True)
        finally:
            if vllm is not None:
                serve.stop(vllm)
    print(common.markdown_table(rows, ["route", "in_flight", "batch_size", "videos", "failed", "videos_s",
                                         "new_tokens", "encode_ms", "load_average_1m"]))
    common.write_json(args.out, {"machine": common.machine_description("cpu"), "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
