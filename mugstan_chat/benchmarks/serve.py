"""Serving throughput, side by side: ``mugstan-chat serve`` on our engine vs the same server with ``--llm-url`` (vLLM).

For 1, 4 and 16 concurrent conversations (each about its own video: a distinct one-second window of
one generated clip, so no two share features or a prefix; ``--videos same`` gives them one), both
routes answer with a fixed answer length (``max_tokens``; the actual tokens come from ``usage``) and
it reports requests/s, aggregate output tokens/s and median time to first token (streamed). Every
video's features are encoded in a warm-up round first (our feature cache, on both routes), so the
timed rounds measure the language model: per-request ``generate`` vs vLLM's continuous batching.

A second table: a first user asks about a new video, then a second user asks another question about
the same video. On the vLLM route the second prefill comes from vLLM's automatic prefix cache (its
``/metrics`` prefix-cache hit counters are shown); on our engine every session prefills its own prompt.

    bash scripts/setup_vllm_cpu.sh /work/vllm-venv
    mugstan-chat bench serve --size small --vllm-venv /work/vllm-venv --out runs/bench/serve_small.json
    mugstan-chat bench serve --demo --vllm-venv /work/vllm-venv --concurrency 1 4   # seconds, a smoke run

Both routes load the same exported directory (``mugstan-chat export-llava``): the same weights. ``--size
small`` has no trained STAN branch, so our server runs the tower in mean mode on both routes (the tower is
not what this compares).
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from mugstan_chat.llava.chat_template import IN_ORDER_TEMPLATE_FILE

from . import common

ROOT = common.REPO_ROOT
QUESTIONS = ["what happens in the video ?", "describe the scene", "what moves ?", "where is the box ?",
             "what colour is the background ?", "what happens first ?", "what happens last ?", "is it fast ?"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_up(process, url: str, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{url}: exited {process.returncode}\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} not up within {timeout_s} s\n{log.read_text()[-3000:]}")


def stop(process) -> None:
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def model_context(model_dir: Path) -> int:
    """The exported language model's context (its ``max_position_embeddings``): vLLM's --max-model-len."""
    import json

    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("text_config", config)["max_position_embeddings"])


def start_vllm(args, model_dir: Path, log: Path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gb),
           "VLLM_NO_USAGE_STATS": "1"}
    env.pop("PYTHONPATH", None)
    command = [str(Path(args.vllm_venv) / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--enable-mm-embeds",
               "--chat-template", str(model_dir / IN_ORDER_TEMPLATE_FILE), "--chat-template-content-format", "openai",
               "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[args.dtype], "--max-model-len", str(model_context(model_dir)),
               "--limit-mm-per-prompt", '{"image": 8}', "--max-num-seqs", str(max(args.concurrency))]
    if args.enforce_eager:
        command.append("--enforce-eager")
    process = subprocess.Popen(command, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=model_dir)
    wait_up(process, f"http://127.0.0.1:{port}/v1/models", log, args.startup_timeout)
    return process, f"http://127.0.0.1:{port}"


def start_ours(args, model_dir: Path, stan: Path | None, media: Path, log: Path, llm_url: str | None):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if args.our_threads:
        env["OMP_NUM_THREADS"] = str(args.our_threads)  # vLLM's CPU worker runs 1 torch thread on 2 cores
    command = [sys.executable, "-m", "mugstan_chat.entrypoints.openai", "--model", str(model_dir), "--device", "cpu",
               "--dtype", args.dtype, "--port", str(port), "--allowed-local-media-path", str(media),
               "--frames", str(args.frames), "--concurrency", str(max(args.concurrency)), "--queue-size", "64",
               "--max-new-tokens", str(args.new_tokens)]
    if stan is not None:
        command += ["--stan", str(stan)]
    if llm_url:
        command += ["--llm-url", llm_url + "/v1"]
    process = subprocess.Popen(command, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    wait_up(process, f"http://127.0.0.1:{port}/health", log, args.startup_timeout)
    return process, f"http://127.0.0.1:{port}/v1"


def ask(client, video: Path, window: tuple[float, float], question: str, new_tokens: int) -> dict:
    """One streamed request: TTFT from the client's side, tokens from usage."""
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model="", stream=True, stream_options={"include_usage": True}, max_tokens=new_tokens, temperature=0,
        messages=[{"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                               {"type": "text", "text": question}]}],
        extra_body={"mugstan": {"start": window[0], "end": window[1]}})
    first, tokens, text, info = None, 0, [], {}
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            first = first or time.perf_counter()
            text.append(chunk.choices[0].delta.content)
        if chunk.usage:
            tokens = chunk.usage.completion_tokens
        info = (chunk.model_extra or {}).get("mugstan") or info
    timings = info.get("timings_ms", {})
    return {"ttft_s": (first or time.perf_counter()) - started, "tokens": tokens, "text": "".join(text),
            "total_s": time.perf_counter() - started,
            "decode_encode_s": ((timings.get("decode") or 0) + (timings.get("encode") or 0)) / 1000}


def windows(count: int, same: bool) -> list[tuple[float, float]]:
    return [(0.0, 1.0) if same else (float(i), float(i + 1)) for i in range(count)]


def round_of(client, video: Path, concurrency: int, args, offset: int = 0) -> dict:
    spans = windows(max(args.concurrency), args.videos == "same")[:concurrency]
    jobs = [(video, spans[i], QUESTIONS[(i + offset) % len(QUESTIONS)], args.new_tokens) for i in range(concurrency)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda job: ask(client, *job), jobs))
    wall = time.perf_counter() - started
    return {"concurrency": concurrency, "wall_s": wall, "requests_s": concurrency / wall,
            "output_tok_s": sum(r["tokens"] for r in results) / wall,
            "median_ttft_s": statistics.median(r["ttft_s"] for r in results),
            "tokens": sum(r["tokens"] for r in results), "answers": [r["text"] for r in results]}


def prefix_counters(vllm_base: str) -> dict:
    text = httpx.get(f"{vllm_base}/metrics", timeout=10).text
    out = {}
    for name in ("prefix_cache_queries", "prefix_cache_hits"):
        found = re.findall(rf"^vllm:{name}(?:_total)?(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        out[name] = sum(float(v) for v in found)
    return out


def second_user(client, video: Path, args, vllm_base: str | None) -> dict:
    """User 1 asks about an unseen window (our side decodes and encodes it: reported, and subtracted in
    ``first_user_lm_ttft_s``), then user 2 asks another question about the same window."""
    window = (float(max(args.concurrency)) + 1, float(max(args.concurrency)) + 2)
    before = prefix_counters(vllm_base) if vllm_base else None
    first = ask(client, video, window, "what happens in the video ?", args.new_tokens)
    middle = prefix_counters(vllm_base) if vllm_base else None
    second = ask(client, video, window, "describe the scene", args.new_tokens)
    after = prefix_counters(vllm_base) if vllm_base else None
    row = {"first_user_ttft_s": first["ttft_s"], "first_user_decode_encode_s": first["decode_encode_s"],
           "first_user_lm_ttft_s": first["ttft_s"] - first["decode_encode_s"], "second_user_ttft_s": second["ttft_s"]}
    if vllm_base:
        for who, (a, b) in (("first", (before, middle)), ("second", (middle, after))):
            row[f"{who}_user_prefix_hit_tokens"] = b["prefix_cache_hits"] - a["prefix_cache_hits"]
            row[f"{who}_user_prefix_query_tokens"] = b["prefix_cache_queries"] - a["prefix_cache_queries"]
    return row


def run_route(name: str, args, model_dir, stan, video, work: Path) -> dict:
    vllm = None
    llm_url = None
    try:
        if name == "vllm":
            started = time.perf_counter()
            vllm, llm_url = start_vllm(args, model_dir, work / "vllm.log")
            print(f"vLLM up in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        ours, base = start_ours(args, model_dir, stan, video.parent, work / f"ours_{name}.log", llm_url)
        try:
            client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=3600)
            round_of(client, video, max(args.concurrency), args)  # warm-up: every window encoded once
            rows = []
            for concurrency in args.concurrency:
                row = round_of(client, video, concurrency, args, offset=1)
                row["route"] = name
                rows.append(row)
                print(f"{name} x{concurrency}: {row['output_tok_s']:.1f} tok/s, {row['requests_s']:.3f} req/s, "
                      f"TTFT {row['median_ttft_s']:.2f} s", file=sys.stderr, flush=True)
            prefix = {"route": name, **second_user(client, video, args, llm_url)}
        finally:
            stop(ours)
    finally:
        if vllm is not None:
            stop(vllm)
    return {"rows": rows, "prefix": prefix}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mugstan-chat bench serve", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--size", choices=["small", "7b"], default=None)
    which.add_argument("--demo", action="store_true", help="the exported demo model (a smoke run)")
    parser.add_argument("--vllm-venv", default=os.environ.get("MUGSTAN_VLLM_VENV"), required=False)
    parser.add_argument("--routes", nargs="+", choices=["ours", "vllm"], default=["ours", "vllm"])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--new-tokens", type=int, default=32, help="answer length (max_tokens)")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--videos", choices=["distinct", "same"], default="distinct")
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="bf16")
    parser.add_argument("--our-threads", type=int, default=None,
                        help="OMP_NUM_THREADS of our server (default: torch's choice)")
    parser.add_argument("--kv-cache-gb", type=float, default=2)
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (starts faster)")
    parser.add_argument("--startup-timeout", type=float, default=900)
    parser.add_argument("--export-dir", default=None, help="reuse this export (default: a temporary one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    if "vllm" in args.routes and not args.vllm_venv:
        parser.error("--vllm-venv (or $MUGSTAN_VLLM_VENV) is needed for the vLLM route")
    from .chat import benchmark_video  # the generated benchmark clip

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        work = Path(scratch)
        model_dir = Path(args.export_dir) if args.export_dir else work / "llava"
        which = ["--demo"] if args.demo else ["--size", args.size or "small"]
        if not (model_dir / "config.json").exists():
            subprocess.run([sys.executable, "-m", "mugstan_chat", "export-llava", str(model_dir), *which],
                           check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        stan = model_dir / "stan" if (model_dir / "stan").exists() else None
        seconds = max(args.concurrency) + 3
        video = benchmark_video(str(work / "media"), seconds, 224)
        results = {name: run_route(name, args, model_dir, stan, video, work) for name in args.routes}
    rows = [row for r in results.values() for row in r["rows"]]
    for row in rows:
        row.pop("answers")
    print(f"load average at the end: {os.getloadavg()}")
    print(common.markdown_table(rows, ["route", "concurrency", "requests_s", "output_tok_s", "median_ttft_s",
                                         "tokens", "wall_s"]))
    prefix_rows = [r["prefix"] for r in results.values()]
    print()
    print(common.markdown_table(prefix_rows, list(prefix_rows[-1])))
    speedup = None
    if {"ours", "vllm"} <= set(results):
        top = max(args.concurrency)
        by = {(r["route"], r["concurrency"]): r for r in rows}
        speedup = by[("vllm", top)]["output_tok_s"] / by[("ours", top)]["output_tok_s"]
        print(f"\nvLLM / ours, aggregate output tokens/s at {top} concurrent: {speedup:.2f}x (target >= 4x)")
    common.write_json(args.out, {"machine": common.machine_description("cpu"), "args": vars(args), "rows": rows,
                                   "second_user": prefix_rows, "speedup_at_max_concurrency": speedup})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
